package e2e

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/client"
)

const versionsARN = "arn:aws:lambda:us-east-1:000000000000:function:ver"

// invokeAt invokes the function at a qualifier (in the Qualifier
// parameter, or in name itself when qualifier is "") with a JSON event.
func invokeAt(t *testing.T, s *server, name, qualifier string, event any) *lambda.InvokeOutput {
	t.Helper()
	payload, _ := json.Marshal(event)
	in := &lambda.InvokeInput{FunctionName: aws.String(name), Payload: payload}
	if qualifier != "" {
		in.Qualifier = aws.String(qualifier)
	}
	out, err := s.sdk().Invoke(ctxT(t), in)
	if err != nil {
		t.Fatalf("Invoke %s (qualifier %q): %v", name, qualifier, err)
	}
	if out.FunctionError != nil {
		t.Fatalf("Invoke %s (qualifier %q): function error %s: %s", name, qualifier, aws.ToString(out.FunctionError), out.Payload)
	}
	return out
}

// echoedVersion is AWS_LAMBDA_FUNCTION_VERSION as the probe saw it.
func echoedVersion(t *testing.T, out *lambda.InvokeOutput) string {
	t.Helper()
	var resp struct {
		Facts struct {
			Env map[string]string `json:"env"`
		} `json:"facts"`
	}
	if err := json.Unmarshal(out.Payload, &resp); err != nil || resp.Facts.Env == nil {
		t.Fatalf("not a probe echo: %s (%v)", out.Payload, err)
	}
	return resp.Facts.Env["AWS_LAMBDA_FUNCTION_VERSION"]
}

// waitActive waits for a published version to leave Pending (SnapStart
// versions are Pending while a host takes their snapshot) and returns it.
func waitActive(t *testing.T, s *server, version string) *lambda.GetFunctionConfigurationOutput {
	t.Helper()
	var cfg *lambda.GetFunctionConfigurationOutput
	eventually(t, 2*time.Minute, func() error {
		var err error
		cfg, err = s.sdk().GetFunctionConfiguration(ctxT(t), &lambda.GetFunctionConfigurationInput{
			FunctionName: aws.String("ver"), Qualifier: aws.String(version)})
		if err != nil {
			return err
		}
		if cfg.State == types.StatePending {
			return errNotYet
		}
		return nil
	})
	if cfg.State != types.StateActive {
		t.Fatalf("version %s is %s (%s: %s), want Active", version, cfg.State, cfg.StateReasonCode, aws.ToString(cfg.StateReason))
	}
	return cfg
}

func TestVersionsThroughSDK(t *testing.T) {
	s := startServer(t, "")
	ctx := ctxT(t)
	c := s.sdk()

	created := createProbe(t, s, "ver", func(in *lambda.CreateFunctionInput) {
		in.SnapStart = &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions}
	})
	if created.SnapStart == nil || created.SnapStart.ApplyOn != types.SnapStartApplyOnPublishedVersions ||
		created.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOff {
		t.Fatalf("CreateFunction SnapStart = %+v, want PublishedVersions/Off", created.SnapStart)
	}

	// Version 1: the probe.
	v1, err := c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver"), Description: aws.String("the probe")})
	if err != nil {
		t.Fatalf("PublishVersion: %v", err)
	}
	if aws.ToString(v1.Version) != "1" || aws.ToString(v1.FunctionArn) != versionsARN+":1" || aws.ToString(v1.Description) != "the probe" ||
		aws.ToString(v1.CodeSha256) != aws.ToString(created.CodeSha256) || aws.ToString(v1.RevisionId) == aws.ToString(created.RevisionId) {
		t.Fatalf("PublishVersion returned Version %q FunctionArn %q Description %q CodeSha256 %q RevisionId %q",
			aws.ToString(v1.Version), aws.ToString(v1.FunctionArn), aws.ToString(v1.Description), aws.ToString(v1.CodeSha256), aws.ToString(v1.RevisionId))
	}
	if v1.SnapStart == nil || v1.SnapStart.ApplyOn != types.SnapStartApplyOnPublishedVersions {
		t.Fatalf("version SnapStart = %+v", v1.SnapStart)
	}
	active := waitActive(t, s, "1")
	t.Logf("version 1: State %s, SnapStart OptimizationStatus %s", active.State, active.SnapStart.OptimizationStatus)
	latestCfg, err := c.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("ver")})
	if err != nil {
		t.Fatal(err)
	}
	if latestCfg.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOff {
		t.Fatalf("$LATEST SnapStart = %+v, want Off", latestCfg.SnapStart)
	}
	// $LATEST has not changed: Lambda returns version 1 again.
	again, err := c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver")})
	if err != nil || aws.ToString(again.Version) != "1" {
		t.Fatalf("publishing an unchanged $LATEST: %v %v", again, err)
	}

	// $LATEST and version 1 run the same code in separate sandboxes: each
	// sandbox was started with its own AWS_LAMBDA_FUNCTION_VERSION.
	for _, step := range []struct{ name, qualifier, want string }{
		{"ver", "1", "1"}, {"ver", "", "$LATEST"}, {"ver:1", "", "1"}, {versionsARN + ":1", "", "1"}, {"ver", "$LATEST", "$LATEST"},
	} {
		out := invokeAt(t, s, step.name, step.qualifier, map[string]string{"action": "echo"})
		if got := echoedVersion(t, out); got != step.want {
			t.Errorf("%s (qualifier %q) ran in a sandbox of version %q, want %q", step.name, step.qualifier, got, step.want)
		}
		if got := aws.ToString(out.ExecutedVersion); got != step.want {
			t.Errorf("%s (qualifier %q): X-Amz-Executed-Version %q, want %q", step.name, step.qualifier, got, step.want)
		}
	}

	// Version 2: hello-go, published with Lambda's checks.
	updated, err := c.UpdateFunctionCode(ctx, &lambda.UpdateFunctionCodeInput{FunctionName: aws.String("ver"), ZipFile: helloGoZip(t)})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver"), RevisionId: created.RevisionId})
	var pf *types.PreconditionFailedException
	if !errors.As(err, &pf) {
		t.Fatalf("PublishVersion with a stale RevisionId: %v, want PreconditionFailedException", err)
	}
	_, err = c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver"), CodeSha256: created.CodeSha256})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) {
		t.Fatalf("PublishVersion with the old CodeSha256: %v, want InvalidParameterValueException", err)
	}
	v2, err := c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver"),
		CodeSha256: updated.CodeSha256, RevisionId: updated.RevisionId})
	if err != nil || aws.ToString(v2.Version) != "2" {
		t.Fatalf("PublishVersion after the update: %v %v", v2, err)
	}
	waitActive(t, s, "2")

	// Each version runs its own code; version 1 is unaffected by the update.
	hello := invokeAt(t, s, "ver", "2", map[string]string{"name": "v2"})
	if !strings.Contains(string(hello.Payload), "Hello, v2!") || aws.ToString(hello.ExecutedVersion) != "2" {
		t.Fatalf("version 2 answered %s (version %q)", hello.Payload, aws.ToString(hello.ExecutedVersion))
	}
	if got := echoedVersion(t, invokeAt(t, s, "ver", "1", map[string]string{"action": "echo"})); got != "1" {
		t.Fatalf("version 1 after the update ran as %q", got)
	}
	if out := invokeAt(t, s, "ver", "", map[string]string{"name": "latest"}); !strings.Contains(string(out.Payload), "Hello, latest!") {
		t.Fatalf("$LATEST answered %s", out.Payload)
	}
	_, err = c.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("ver"), Qualifier: aws.String("7")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Fatalf("Invoke of version 7: %v, want ResourceNotFoundException", err)
	}

	// An Event invoke of version 1 keeps its qualifier through the queue.
	ev, err := c.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("ver:1"), InvocationType: types.InvocationTypeEvent,
		Payload: []byte(`{"action":"print","lines":["event-of-v1"]}`)})
	if err != nil || ev.StatusCode != http.StatusAccepted {
		t.Fatalf("Event invoke of ver:1: %v %v", ev, err)
	}
	id := requestID(t, ev)
	eventually(t, time.Minute, func() error {
		rec, err := client.New(s.endpoint).GetInvocation(ctxT(t), id)
		if err != nil {
			return err
		}
		if rec.Status != "Succeeded" {
			return fmt.Errorf("status %s: %w", rec.Status, errNotYet)
		}
		if rec.Version != "1" || rec.RevisionId != aws.ToString(v1.RevisionId) || !strings.Contains(rec.Log, "event-of-v1") ||
			!strings.Contains(rec.Log, "Version: 1") {
			t.Fatalf("the event's record: Version %q RevisionId %q log:\n%s", rec.Version, rec.RevisionId, rec.Log)
		}
		return nil
	})

	// ListVersionsByFunction: $LATEST first, then the versions, paged.
	var listed []string
	p := lambda.NewListVersionsByFunctionPaginator(c, &lambda.ListVersionsByFunctionInput{FunctionName: aws.String("ver"), MaxItems: aws.Int32(1)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Fatalf("ListVersionsByFunction: %v", err)
		}
		for _, v := range page.Versions {
			listed = append(listed, aws.ToString(v.Version)+"="+aws.ToString(v.FunctionArn))
		}
	}
	want := []string{"$LATEST=" + versionsARN + ":$LATEST", "1=" + versionsARN + ":1", "2=" + versionsARN + ":2"}
	if strings.Join(listed, " ") != strings.Join(want, " ") {
		t.Fatalf("ListVersionsByFunction = %v, want %v", listed, want)
	}

	// GetFunction of version 1 points at version 1's code.
	got, err := c.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("ver"), Qualifier: aws.String("1")})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(got.Configuration.Version) != "1" || aws.ToString(got.Configuration.CodeSha256) != aws.ToString(created.CodeSha256) {
		t.Fatalf("GetFunction ver:1: Version %q CodeSha256 %q", aws.ToString(got.Configuration.Version), aws.ToString(got.Configuration.CodeSha256))
	}
	resp, err := http.Get(aws.ToString(got.Code.Location))
	if err != nil {
		t.Fatal(err)
	}
	zip, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := sha256.Sum256(zip)
	if base64.StdEncoding.EncodeToString(sum[:]) != aws.ToString(created.CodeSha256) {
		t.Fatalf("version 1's Code.Location serves other code (%d bytes, status %d)", len(zip), resp.StatusCode)
	}

	// DeleteFunction with a qualifier deletes only that version.
	_, err = c.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("ver"), Qualifier: aws.String("$LATEST")})
	if !errors.As(err, &ipv) {
		t.Fatalf("DeleteFunction of $LATEST alone: %v, want InvalidParameterValueException", err)
	}
	if _, err := c.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("ver"), Qualifier: aws.String("1")}); err != nil {
		t.Fatalf("DeleteFunction ver:1: %v", err)
	}
	if _, err := c.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("ver:1")}); !errors.As(err, &nf) {
		t.Fatalf("GetFunction of the deleted version: %v, want ResourceNotFoundException", err)
	}
	if _, err := c.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("ver:1")}); !errors.As(err, &nf) {
		t.Fatalf("Invoke of the deleted version: %v, want ResourceNotFoundException", err)
	}
	if out := invokeAt(t, s, "ver", "2", map[string]string{"name": "still"}); !strings.Contains(string(out.Payload), "Hello, still!") {
		t.Fatalf("version 2 after deleting version 1 answered %s", out.Payload)
	}
	// Numbers are never reused.
	if _, err := c.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("ver"), Description: aws.String("third")}); err != nil {
		t.Fatal(err)
	}
	v3, err := c.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("ver")})
	if err != nil || aws.ToString(v3.Version) != "3" {
		t.Fatalf("the version after 1 and 2: %v %v, want 3", v3, err)
	}

	// Deleting the function deletes every version.
	if _, err := c.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("ver")}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{"2", "3"} {
		if _, err := c.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{
			FunctionName: aws.String("ver"), Qualifier: aws.String(q)}); !errors.As(err, &nf) {
			t.Fatalf("version %s after DeleteFunction: %v, want ResourceNotFoundException", q, err)
		}
	}
}

func TestVersionsPublishOnCreateThroughSDK(t *testing.T) {
	s := startServer(t, "")
	ctx := ctxT(t)
	out, err := s.sdk().CreateFunction(ctx, &lambda.CreateFunctionInput{
		FunctionName: aws.String("pub"), Runtime: types.RuntimeProvidedal2023, Handler: aws.String("bootstrap"),
		Role: aws.String("arn:aws:iam::000000000000:role/test"), Code: &types.FunctionCode{ZipFile: helloGoZip(t)}, Publish: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(out.Version) != "1" || !strings.HasSuffix(aws.ToString(out.FunctionArn), ":function:pub:1") {
		t.Fatalf("CreateFunction with Publish: Version %q FunctionArn %q", aws.ToString(out.Version), aws.ToString(out.FunctionArn))
	}
	res := invokeAt(t, s, "pub:1", "", map[string]string{"name": "one"})
	if !strings.Contains(string(res.Payload), "Hello, one!") || aws.ToString(res.ExecutedVersion) != "1" {
		t.Fatalf("pub:1 answered %s (version %q)", res.Payload, aws.ToString(res.ExecutedVersion))
	}
}
