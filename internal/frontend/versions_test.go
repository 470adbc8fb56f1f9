package frontend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

const fnARN = "arn:aws:lambda:us-east-1:000000000000:function:"

func TestPublishVersionThroughSDK(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	c := e.fake.put(&function.Config{Name: "f", Runtime: "provided.al2023"}, testZip)

	out, err := e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{
		FunctionName: aws.String("f"), Description: aws.String("first"),
		CodeSha256: aws.String(c.CodeSha256), RevisionId: aws.String(c.RevisionID),
	})
	if err != nil {
		t.Fatalf("PublishVersion: %v", err)
	}
	if aws.ToString(out.Version) != "1" || aws.ToString(out.FunctionArn) != fnARN+"f:1" || aws.ToString(out.Description) != "first" {
		t.Errorf("published Version %q FunctionArn %q Description %q", aws.ToString(out.Version), aws.ToString(out.FunctionArn), aws.ToString(out.Description))
	}
	e.fake.locked(func() {
		p := e.fake.lastPublish
		if p == nil || p.CodeSha256 != c.CodeSha256 || p.RevisionID != c.RevisionID || p.Description != "first" {
			t.Errorf("control plane got %+v", p)
		}
	})

	_, err = e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f"), RevisionId: aws.String("stale")})
	var pf *types.PreconditionFailedException
	if !errors.As(err, &pf) {
		t.Errorf("stale RevisionId: %v, want PreconditionFailedException", err)
	}
	_, err = e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f"), CodeSha256: aws.String("b3RoZXI=")})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) || !strings.Contains(aws.ToString(ipv.Message), "different from current CodeSHA256") {
		t.Errorf("wrong CodeSha256: %v, want InvalidParameterValueException", err)
	}
	_, err = e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f:1")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Errorf("publishing a version of a version: %v, want ResourceNotFoundException", err)
	}

	// Lambda answers 201; a request without a body is an empty one.
	resp, err := http.Post(e.srv.URL+"/2015-03-31/functions/f/versions", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated || !strings.Contains(string(body), `"Version":"1"`) {
		t.Errorf("POST without a body = %d %s", resp.StatusCode, body)
	}
}

func TestListVersionsByFunctionThroughSDK(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.fake.put(&function.Config{Name: "f", Runtime: "provided.al2023"}, testZip)
	for i := range 3 {
		if _, err := e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f")}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.sdk.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
			FunctionName: aws.String("f"), Description: aws.String(fmt.Sprint(i))}); err != nil {
			t.Fatal(err)
		}
	}
	var versions, arns []string
	pages := 0
	p := lambda.NewListVersionsByFunctionPaginator(e.sdk, &lambda.ListVersionsByFunctionInput{FunctionName: aws.String("f"), MaxItems: aws.Int32(2)})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			t.Fatalf("ListVersionsByFunction: %v", err)
		}
		pages++
		for _, v := range page.Versions {
			versions = append(versions, aws.ToString(v.Version))
			arns = append(arns, aws.ToString(v.FunctionArn))
		}
	}
	if want := "$LATEST 1 2 3"; strings.Join(versions, " ") != want || pages != 2 {
		t.Errorf("listed %v in %d pages, want %s in 2", versions, pages, want)
	}
	if arns[0] != fnARN+"f:$LATEST" || arns[3] != fnARN+"f:3" {
		t.Errorf("FunctionArns %v must be qualified", arns)
	}
	e.fake.locked(func() {
		if e.fake.lastLimit != 2 {
			t.Errorf("control plane asked for %d items, want 2", e.fake.lastLimit)
		}
	})
	_, err := e.sdk.ListVersionsByFunction(ctx, &lambda.ListVersionsByFunctionInput{FunctionName: aws.String("ghost")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Errorf("ListVersionsByFunction of a missing function: %v", err)
	}
}

func TestGetAndDeleteWithQualifier(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.fake.put(&function.Config{Name: "f", Runtime: "provided.al2023"}, testZip)
	if _, err := e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f")}); err != nil {
		t.Fatal(err)
	}
	newZip := []byte("PK\x03\x04 second code")
	if _, err := e.sdk.UpdateFunctionCode(ctx, &lambda.UpdateFunctionCodeInput{FunctionName: aws.String("f"), ZipFile: newZip}); err != nil {
		t.Fatal(err)
	}

	// Three spellings of version 1.
	for _, in := range []*lambda.GetFunctionInput{
		{FunctionName: aws.String("f"), Qualifier: aws.String("1")},
		{FunctionName: aws.String("f:1")},
		{FunctionName: aws.String(fnARN + "f:1")},
	} {
		got, err := e.sdk.GetFunction(ctx, in)
		if err != nil {
			t.Fatalf("GetFunction %s %s: %v", aws.ToString(in.FunctionName), aws.ToString(in.Qualifier), err)
		}
		if aws.ToString(got.Configuration.Version) != "1" || aws.ToString(got.Configuration.FunctionArn) != fnARN+"f:1" ||
			aws.ToString(got.Configuration.CodeSha256) != sha(testZip) {
			t.Errorf("version 1: Version %q FunctionArn %q", aws.ToString(got.Configuration.Version), aws.ToString(got.Configuration.FunctionArn))
		}
		loc := aws.ToString(got.Code.Location)
		if !strings.HasSuffix(loc, "/invokex/v1/functions/f/code?Qualifier=1") {
			t.Fatalf("Code.Location = %q", loc)
		}
		resp, err := e.srv.Client().Get(loc)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != string(testZip) {
			t.Fatalf("version 1's code is %q, want the first zip", body)
		}
	}
	latest, err := e.sdk.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("f"), Qualifier: aws.String("$LATEST")})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(latest.FunctionArn) != fnARN+"f:$LATEST" || aws.ToString(latest.CodeSha256) != sha(newZip) {
		t.Errorf("$LATEST: FunctionArn %q CodeSha256 %q", aws.ToString(latest.FunctionArn), aws.ToString(latest.CodeSha256))
	}

	// DeleteFunction with a qualifier deletes only that version.
	var ipv *types.InvalidParameterValueException
	_, err = e.sdk.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("f"), Qualifier: aws.String("$LATEST")})
	if !errors.As(err, &ipv) {
		t.Errorf("deleting $LATEST alone: %v, want InvalidParameterValueException", err)
	}
	if _, err := e.sdk.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("f"), Qualifier: aws.String("1")}); err != nil {
		t.Fatalf("DeleteFunction f:1: %v", err)
	}
	e.fake.locked(func() {
		if e.fake.lastDelete != [2]string{"f", "1"} || e.fake.calls["DeleteFunction"] != 0 || e.fake.fns["f"] == nil {
			t.Errorf("deleting version 1 deleted %v (DeleteFunction called %d times)", e.fake.lastDelete, e.fake.calls["DeleteFunction"])
		}
	})
	_, err = e.sdk.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("f:1")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Errorf("GetFunction of a deleted version: %v", err)
	}
}

func TestInvokeWithQualifier(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	e.fake.put(&function.Config{Name: "f", Runtime: "provided.al2023"}, testZip)
	if _, err := e.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String("f")}); err != nil {
		t.Fatal(err)
	}
	for _, in := range []*lambda.InvokeInput{
		{FunctionName: aws.String("f"), Qualifier: aws.String("1")},
		{FunctionName: aws.String("f:1")},
		{FunctionName: aws.String(fnARN + "f:1")},
	} {
		out, err := e.sdk.Invoke(ctx, in)
		if err != nil {
			t.Fatalf("Invoke: %v", err)
		}
		if aws.ToString(out.ExecutedVersion) != "1" {
			t.Errorf("ExecutedVersion = %q, want 1", aws.ToString(out.ExecutedVersion))
		}
		e.fake.locked(func() {
			if e.fake.lastInvoke.Function != "f" || e.fake.lastInvoke.Qualifier != "1" {
				t.Errorf("control plane got %s:%s", e.fake.lastInvoke.Function, e.fake.lastInvoke.Qualifier)
			}
		})
	}
	out, err := e.sdk.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("f")})
	if err != nil || aws.ToString(out.ExecutedVersion) != "$LATEST" {
		t.Fatalf("unqualified: %v %v", out, err)
	}
	_, err = e.sdk.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("f"), Qualifier: aws.String("9")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Errorf("unknown version: %v, want ResourceNotFoundException", err)
	}
	if _, err := e.sdk.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("f:1"), InvocationType: types.InvocationTypeEvent}); err != nil {
		t.Fatal(err)
	}
	e.fake.locked(func() {
		if e.fake.lastAsync.Qualifier != "1" {
			t.Errorf("Event invoke of f:1 reached the control plane with qualifier %q", e.fake.lastAsync.Qualifier)
		}
	})

	// A Pending version is a conflict, with Lambda's message.
	e.fake.setErr(fmt.Errorf("The operation cannot be performed at this time. The function is currently in the following state: Pending: %w", errdefs.ErrConflict))
	_, err = e.sdk.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("f:1")})
	var rc *types.ResourceConflictException
	if !errors.As(err, &rc) || aws.ToString(rc.Message) != "The operation cannot be performed at this time. The function is currently in the following state: Pending" {
		t.Errorf("pending version: %v, want ResourceConflictException", err)
	}
}

func TestSnapStartThroughSDK(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	out, err := e.sdk.CreateFunction(ctx, &lambda.CreateFunctionInput{
		FunctionName: aws.String("s"), Runtime: types.RuntimeProvidedal2023, Role: aws.String("arn:aws:iam::000000000000:role/r"),
		Code: &types.FunctionCode{ZipFile: testZip}, SnapStart: &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions},
	})
	if err != nil {
		t.Fatal(err)
	}
	if out.SnapStart == nil || out.SnapStart.ApplyOn != types.SnapStartApplyOnPublishedVersions || out.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOff {
		t.Errorf("created SnapStart = %+v", out.SnapStart)
	}
	e.fake.locked(func() {
		if got := e.fake.fns["s"].SnapStart.ApplyOn; got != function.SnapStartPublishedVersions {
			t.Errorf("control plane got ApplyOn %q", got)
		}
	})

	// A version whose snapshot is in use shows On; $LATEST never does.
	e.fake.locked(func() {
		v := e.fake.fns["s"].Clone()
		v.Version, v.SnapStart.OptimizationStatus = "1", function.OptimizationOn
		e.fake.vers["s"] = append(e.fake.vers["s"], v)
		e.fake.fns["s"].SnapStart.OptimizationStatus = function.OptimizationOn
	})
	v, err := e.sdk.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("s:1")})
	if err != nil {
		t.Fatal(err)
	}
	if v.SnapStart == nil || v.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOn {
		t.Errorf("version SnapStart = %+v, want On", v.SnapStart)
	}
	latest, err := e.sdk.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("s")})
	if err != nil {
		t.Fatal(err)
	}
	if latest.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOff {
		t.Errorf("$LATEST SnapStart = %+v, want Off", latest.SnapStart)
	}

	upd, err := e.sdk.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("s"), SnapStart: &types.SnapStart{ApplyOn: types.SnapStartApplyOnNone}})
	if err != nil {
		t.Fatal(err)
	}
	if upd.SnapStart.ApplyOn != types.SnapStartApplyOnNone {
		t.Errorf("updated SnapStart = %+v", upd.SnapStart)
	}
	_, err = e.sdk.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("s"), SnapStart: &types.SnapStart{ApplyOn: "Always"}})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) || !strings.Contains(aws.ToString(ipv.Message), "snapStart.applyOn") {
		t.Errorf("bad ApplyOn: %v, want InvalidParameterValueException", err)
	}
	// Without SnapStart the setting does not change.
	e.fake.locked(func() { e.fake.lastUpdate = nil })
	if _, err := e.sdk.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("s"), Description: aws.String("d")}); err != nil {
		t.Fatal(err)
	}
	e.fake.locked(func() {
		if e.fake.lastUpdate.SnapStart != nil {
			t.Errorf("an update without SnapStart sent %q", *e.fake.lastUpdate.SnapStart)
		}
	})
}

func TestPublishOnCreateAndUpdate(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	out, err := e.sdk.CreateFunction(ctx, &lambda.CreateFunctionInput{
		FunctionName: aws.String("p"), Runtime: types.RuntimeProvidedal2023, Role: aws.String("arn:aws:iam::000000000000:role/r"),
		Code: &types.FunctionCode{ZipFile: testZip}, Publish: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(out.Version) != "1" || aws.ToString(out.FunctionArn) != fnARN+"p:1" {
		t.Errorf("CreateFunction with Publish returned Version %q FunctionArn %q", aws.ToString(out.Version), aws.ToString(out.FunctionArn))
	}
	upd, err := e.sdk.UpdateFunctionCode(ctx, &lambda.UpdateFunctionCodeInput{
		FunctionName: aws.String("p"), ZipFile: []byte("PK\x03\x04 two"), Publish: true})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(upd.Version) != "2" || aws.ToString(upd.CodeSha256) != sha([]byte("PK\x03\x04 two")) {
		t.Errorf("UpdateFunctionCode with Publish returned Version %q CodeSha256 %q", aws.ToString(upd.Version), aws.ToString(upd.CodeSha256))
	}
	e.fake.locked(func() {
		// The publish named the revision the update stored.
		if e.fake.lastPublish == nil || e.fake.lastPublish.RevisionID != e.fake.fns["p"].RevisionID {
			t.Errorf("publish after update checked revision %+v, want %s", e.fake.lastPublish, e.fake.fns["p"].RevisionID)
		}
	})
}
