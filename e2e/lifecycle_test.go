package e2e

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
)

// createProbe creates a function running the probe (an aws-lambda-go binary).
func createProbe(t *testing.T, s *server, name string, mut ...func(*lambda.CreateFunctionInput)) *lambda.CreateFunctionOutput {
	t.Helper()
	in := &lambda.CreateFunctionInput{
		FunctionName: aws.String(name),
		Runtime:      types.RuntimeProvidedal2023,
		Handler:      aws.String("bootstrap"),
		Role:         aws.String("arn:aws:iam::000000000000:role/test"),
		Code:         &types.FunctionCode{ZipFile: probeZip(t)},
	}
	for _, m := range mut {
		m(in)
	}
	out, err := s.sdk().CreateFunction(ctxT(t), in)
	if err != nil {
		t.Fatalf("CreateFunction %s: %v", name, err)
	}
	return out
}

// invoke calls the function synchronously with a JSON event.
func invoke(t *testing.T, s *server, name string, event any, tail bool) *lambda.InvokeOutput {
	t.Helper()
	payload, _ := json.Marshal(event)
	in := &lambda.InvokeInput{FunctionName: aws.String(name), Payload: payload}
	if tail {
		in.LogType = types.LogTypeTail
	}
	out, err := s.sdk().Invoke(ctxT(t), in)
	if err != nil {
		t.Fatalf("Invoke %s: %v", name, err)
	}
	return out
}

func tailLog(t *testing.T, out *lambda.InvokeOutput) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(aws.ToString(out.LogResult))
	if err != nil {
		t.Fatalf("LogResult is not base64: %v", err)
	}
	return string(b)
}

func TestFunctionLifecycleThroughSDK(t *testing.T) {
	s := startServer(t, "")
	ctx := ctxT(t)
	c := s.sdk()
	created := createProbe(t, s, "lifecycle", func(in *lambda.CreateFunctionInput) {
		in.Environment = &types.Environment{Variables: map[string]string{"GREETING": "hi"}}
		in.MemorySize = aws.Int32(256)
		in.Timeout = aws.Int32(10)
	})
	if created.State != types.StateActive || aws.ToString(created.RevisionId) == "" || aws.ToString(created.CodeSha256) == "" {
		t.Fatalf("CreateFunction returned State=%s RevisionId=%q CodeSha256=%q", created.State, aws.ToString(created.RevisionId), aws.ToString(created.CodeSha256))
	}
	if got := aws.ToString(created.FunctionArn); got != "arn:aws:lambda:us-east-1:000000000000:function:lifecycle" {
		t.Errorf("FunctionArn = %q", got)
	}

	got, err := c.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("lifecycle")})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToInt32(got.Configuration.MemorySize) != 256 || aws.ToInt32(got.Configuration.Timeout) != 10 || got.Code == nil || aws.ToString(got.Code.Location) == "" {
		t.Fatalf("GetFunction = %+v, code %+v", got.Configuration, got.Code)
	}
	cfg, err := c.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: created.FunctionArn})
	if err != nil {
		t.Fatalf("GetFunctionConfiguration by ARN: %v", err)
	}
	if aws.ToString(cfg.CodeSha256) != aws.ToString(created.CodeSha256) {
		t.Errorf("CodeSha256 changed: %s vs %s", aws.ToString(cfg.CodeSha256), aws.ToString(created.CodeSha256))
	}

	// Cold start: Init Duration in the REPORT line; the runtime sees its env.
	out := invoke(t, s, "lifecycle", map[string]any{"action": "echo", "marker": "first"}, true)
	if out.FunctionError != nil {
		t.Fatalf("function error: %s", out.Payload)
	}
	if aws.ToString(out.ExecutedVersion) != "$LATEST" {
		t.Errorf("ExecutedVersion = %q", aws.ToString(out.ExecutedVersion))
	}
	var echo probeEcho
	if err := json.Unmarshal(out.Payload, &echo); err != nil {
		t.Fatalf("echo payload %s: %v", out.Payload, err)
	}
	if echo.Event["marker"] != "first" || echo.Env["GREETING"] != "hi" || echo.Env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] != "256" || echo.Env["AWS_LAMBDA_FUNCTION_NAME"] != "lifecycle" {
		t.Fatalf("echo = %+v", echo)
	}
	log := tailLog(t, out)
	for _, want := range []string{"START RequestId: ", "END RequestId: ", "REPORT RequestId: ", "Init Duration: ", "Memory Size: 256 MB"} {
		if !strings.Contains(log, want) {
			t.Errorf("cold invoke log lacks %q:\n%s", want, log)
		}
	}
	// Warm: same instance, no Init Duration.
	out = invoke(t, s, "lifecycle", map[string]any{"action": "echo"}, true)
	if log := tailLog(t, out); strings.Contains(log, "Init Duration") || !strings.Contains(log, "REPORT RequestId: ") {
		t.Errorf("warm invoke log:\n%s", log)
	}
	var echo2 probeEcho
	json.Unmarshal(out.Payload, &echo2)
	if echo2.Pid != echo.Pid || echo2.Hostname != echo.Hostname {
		t.Errorf("warm invoke ran in a new environment (pid %d host %s, before pid %d host %s)", echo2.Pid, echo2.Hostname, echo.Pid, echo.Hostname)
	}

	// Configuration update: only the given field changes, new revision, new env.
	upd, err := c.UpdateFunctionConfiguration(ctx, &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("lifecycle"),
		Environment:  &types.Environment{Variables: map[string]string{"GREETING": "hello"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(upd.RevisionId) == aws.ToString(created.RevisionId) || aws.ToInt32(upd.MemorySize) != 256 {
		t.Fatalf("UpdateFunctionConfiguration: revision %s (was %s), memory %d", aws.ToString(upd.RevisionId), aws.ToString(created.RevisionId), aws.ToInt32(upd.MemorySize))
	}
	out = invoke(t, s, "lifecycle", map[string]any{"action": "echo"}, false)
	var echo3 probeEcho
	json.Unmarshal(out.Payload, &echo3)
	if echo3.Env["GREETING"] != "hello" {
		t.Fatalf("after config update the function sees GREETING=%q", echo3.Env["GREETING"])
	}

	// Code update: the next invoke runs the new code.
	code, err := c.UpdateFunctionCode(ctx, &lambda.UpdateFunctionCodeInput{FunctionName: aws.String("lifecycle"), ZipFile: helloGoZip(t)})
	if err != nil {
		t.Fatal(err)
	}
	if aws.ToString(code.CodeSha256) == aws.ToString(created.CodeSha256) {
		t.Error("UpdateFunctionCode kept the old CodeSha256")
	}
	out = invoke(t, s, "lifecycle", map[string]any{"name": "e2e"}, false)
	if !strings.Contains(string(out.Payload), "Hello, e2e") {
		t.Fatalf("after code update: %s", out.Payload)
	}

	// Delete: gone for Get and Invoke, as Lambda's typed exception.
	if _, err := c.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String("lifecycle")}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("lifecycle")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Fatalf("Invoke after delete: %v, want ResourceNotFoundException", err)
	}
	if _, err := c.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("lifecycle")}); !errors.As(err, &nf) {
		t.Fatalf("GetFunction after delete: %v", err)
	}
}

// probeEcho is the probe's answer to {"action":"echo"}.
type probeEcho struct {
	Event      map[string]any `json:"event"`
	probeFacts `json:"facts"`
}

type probeFacts struct {
	Env      map[string]string `json:"env"`
	Pid      int               `json:"pid"`
	UID      int               `json:"uid"`
	Hostname string            `json:"hostname"`
	Cwd      string            `json:"cwd"`
	Task     []string          `json:"task"`
}

func TestListFunctionsPaginates(t *testing.T) {
	s := startServer(t, "")
	want := map[string]bool{}
	for i := 0; i < 7; i++ {
		name := fmt.Sprintf("page-%d", i)
		createProbe(t, s, name)
		want[name] = true
	}
	p := lambda.NewListFunctionsPaginator(s.sdk(), &lambda.ListFunctionsInput{MaxItems: aws.Int32(3)})
	pages := 0
	for p.HasMorePages() {
		page, err := p.NextPage(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, f := range page.Functions {
			name := aws.ToString(f.FunctionName)
			if !want[name] {
				t.Errorf("unexpected or duplicate function %q", name)
			}
			delete(want, name)
		}
	}
	if len(want) != 0 || pages != 3 {
		t.Fatalf("missing %v after %d pages (want 3)", want, pages)
	}
}

func TestSixtyFourConcurrentInvokes(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "fanout")
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			// Sleeping keeps every instance busy, so all 64 run at once.
			payload, _ := json.Marshal(map[string]any{"action": "sleep", "ms": 300, "id": i})
			out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("fanout"), Payload: payload})
			if err != nil {
				errs <- fmt.Errorf("invoke %d: %w", i, err)
				return
			}
			if out.FunctionError != nil {
				errs <- fmt.Errorf("invoke %d: function error %s", i, out.Payload)
				return
			}
			var got struct {
				Event map[string]any `json:"event"`
			}
			if err := json.Unmarshal(out.Payload, &got); err != nil || got.Event["id"] != float64(i) {
				errs <- fmt.Errorf("invoke %d got a crossed or bad response: %s", i, out.Payload)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestInvokeWithoutPayloadSendsEmptyObject(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "nopayload")
	out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("nopayload")})
	if err != nil {
		t.Fatal(err)
	}
	// The probe decodes the event; with "{}" it reports an unknown (empty)
	// action as its own error, with an empty body aws-lambda-go fails with EOF.
	if strings.Contains(string(out.Payload), "EOF") || !strings.Contains(string(out.Payload), `unknown action \"\"`) {
		t.Fatalf("invoke without payload: %s", out.Payload)
	}
}
