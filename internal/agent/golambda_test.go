package agent

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/protocol"
)

// buildGoLambda builds testdata/golambda as a provided-runtime bootstrap.
func buildGoLambda(t *testing.T) string {
	t.Helper()
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go toolchain not in PATH")
	}
	dir := t.TempDir()
	cmd := exec.Command(goBin, "build", "-o", filepath.Join(dir, "bootstrap"), "./testdata/golambda")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building golambda: %v\n%s", err, out)
	}
	return dir
}

// TestRealGoLambdaFunction runs an unmodified aws-lambda-go function: its
// client uses chunked uploads, trailers and one keep-alive connection.
func TestRealGoLambdaFunction(t *testing.T) {
	t.Parallel()
	dir := buildGoLambda(t)
	ta := startAgent(t)
	cfg := protocol.Init{
		FunctionName: "golambda",
		FunctionARN:  "arn:aws:lambda:us-east-1:123456789012:function:golambda",
		TimeoutSec:   10,
		Command:      []string{filepath.Join(dir, "bootstrap")},
		Env:          []string{"PATH=/usr/bin:/bin", "AWS_LAMBDA_FUNCTION_NAME=golambda", "TZ=:UTC"},
		Dir:          dir,
	}
	d, body := ta.init(cfg)
	if d.Error != nil || d.InitDuration <= 0 {
		t.Fatalf("init: %+v %v\n%s", d.Error, d.InitDuration, body)
	}

	// Cold start: INIT output, then the invocation with Init Duration.
	r := ta.invoke(map[string]string{"do": "echo", "text": "hi"})
	mustSucceed(t, r)
	resp := decodeJSON[map[string]string](t, r.payload)
	if resp["requestId"] != r.RequestID || resp["text"] != "hi" {
		t.Errorf("echo = %s", r.payload)
	}
	if r.InitDuration != d.InitDuration || !strings.Contains(r.log, "\tInit Duration: ") ||
		strings.Index(r.log, "golambda cold start") > strings.Index(r.log, "START RequestId: "+r.RequestID) {
		t.Errorf("cold start log:\n%s", r.log)
	}
	if r.MaxMemoryMB < 2 {
		t.Errorf("MaxMemoryMB = %d", r.MaxMemoryMB)
	}

	// Output before the response is in this invocation's log.
	for _, text := range []string{"one", "two", "three"} {
		r = ta.invoke(map[string]string{"do": "print", "text": text})
		mustSucceed(t, r)
		inner := between(r.log, "START RequestId: "+r.RequestID, "END RequestId: "+r.RequestID)
		if !strings.Contains(inner, "golambda says "+text) || !strings.Contains(inner, "golambda warns "+text) {
			t.Errorf("print %s: output not attributed:\n%s", text, r.log)
		}
		if r.InitDuration != 0 {
			t.Errorf("warm invocation has InitDuration %v", r.InitDuration)
		}
	}

	// A handled error: aws-lambda-go posts it to /error and logs it first.
	r = ta.invoke(map[string]string{"do": "fail", "text": "x1"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "errorString" || r.Reset {
		t.Fatalf("handled error: %+v", r.Result)
	}
	ei := decodeJSON[protocol.ErrorInfo](t, r.payload)
	if ei.ErrorMessage != "handled failure: x1" || ei.ErrorType != "errorString" {
		t.Errorf("error payload = %s", r.payload)
	}
	if !strings.Contains(between(r.log, "START", "END"), "handled failure: x1") {
		t.Errorf("the runtime's error log line is not in the invocation log:\n%s", r.log)
	}
	mustSucceed(t, ta.invoke(map[string]string{"do": "echo"}))

	// A panic is reported, then the process exits: reset and re-INIT.
	r = ta.invoke(map[string]string{"do": "panic"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "string" {
		t.Fatalf("panic: %+v %s", r.Result, r.payload)
	}
	r = ta.invoke(map[string]string{"do": "echo", "text": "after panic"})
	mustSucceed(t, r)

	// A response over 6 MB.
	r = ta.invoke(map[string]any{"do": "big", "n": 7 << 20})
	if r.FunctionError != "Unhandled" || r.ErrorType != "Function.ResponseSizeTooLarge" || !r.Reset {
		t.Fatalf("oversize: %+v", r.Result)
	}
	r = ta.invoke(map[string]string{"do": "echo", "text": "after big"})
	mustSucceed(t, r)
	if r.InitDuration <= 0 {
		t.Errorf("no re-INIT after the oversize response: %+v", r.Result)
	}
}
