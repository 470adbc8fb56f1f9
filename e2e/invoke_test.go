package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/client"
)

func TestFunctionFailuresAreUnhandledAndTheNextInvokeWorks(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "failing", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(1) })
	cases := []struct {
		name       string
		event      map[string]any
		wantInBody string
	}{
		{"timeout", map[string]any{"action": "sleep", "ms": 3000}, "Task timed out after 1.00 seconds"},
		{"crash", map[string]any{"action": "exit", "code": 3}, "Runtime exited with error: exit status 3"},
		{"returned error", map[string]any{"action": "error", "message": "boom-42"}, "boom-42"},
		{"panic", map[string]any{"action": "panic"}, "errorMessage"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := invoke(t, s, "failing", tc.event, true)
			if aws.ToString(out.FunctionError) != "Unhandled" {
				t.Fatalf("FunctionError = %q, payload %s", aws.ToString(out.FunctionError), out.Payload)
			}
			if !strings.Contains(string(out.Payload), tc.wantInBody) {
				t.Fatalf("payload %s lacks %q", out.Payload, tc.wantInBody)
			}
			if log := tailLog(t, out); !strings.Contains(log, "REPORT RequestId:") {
				t.Errorf("failed invocation's log lacks REPORT:\n%s", log)
			}
			next := invoke(t, s, "failing", map[string]any{"action": "echo", "after": tc.name}, false)
			if next.FunctionError != nil || !strings.Contains(string(next.Payload), tc.name) {
				t.Fatalf("invoke after %s: error %q payload %s", tc.name, aws.ToString(next.FunctionError), next.Payload)
			}
		})
	}
}

func TestMemoryLimitIsEnforced(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "hungry", func(in *lambda.CreateFunctionInput) {
		in.MemorySize = aws.Int32(128)
		in.Timeout = aws.Int32(30)
	})
	out := invoke(t, s, "hungry", map[string]any{"action": "alloc", "mb": 600}, false)
	if aws.ToString(out.FunctionError) != "Unhandled" {
		t.Fatalf("allocating 600 MB in a 128 MB function: FunctionError=%q payload %s", aws.ToString(out.FunctionError), out.Payload)
	}
	if next := invoke(t, s, "hungry", map[string]any{"action": "echo"}, false); next.FunctionError != nil {
		t.Fatalf("invoke after OOM: %s", next.Payload)
	}
}

func TestHugeOutputIsCappedAndCounted(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "chatty", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(60) })
	const spam = 1 << 30 // a function that prints a gigabyte
	out := invoke(t, s, "chatty", map[string]any{"action": "spam", "bytes": spam}, true)
	if out.FunctionError != nil {
		t.Fatalf("spam: %s", out.Payload)
	}
	if log := tailLog(t, out); len(log) > 4096 || !strings.Contains(log, "REPORT RequestId:") {
		t.Errorf("tail is %d bytes (want <= 4096) and must end with REPORT:\n%.300s", len(log), log)
	}
	rec := record(t, s, requestID(t, out))
	if rec.LogBytes < spam {
		t.Errorf("LogBytes = %d, want >= %d", rec.LogBytes, spam)
	}
	if len(rec.Log) > 512<<10 {
		t.Errorf("stored log is %d bytes: not capped", len(rec.Log))
	}
}

func TestEventInvocationsRunAndAreRecorded(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "async")
	out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{
		FunctionName:   aws.String("async"),
		InvocationType: types.InvocationTypeEvent,
		Payload:        []byte(`{"action":"print","lines":["async-ran"]}`),
	})
	if err != nil {
		t.Fatal(err)
	}
	if out.StatusCode != 202 {
		t.Fatalf("Event invoke status %d, want 202", out.StatusCode)
	}
	id := requestID(t, out)
	eventually(t, time.Minute, func() error {
		rec, err := client.New(s.endpoint).GetInvocation(ctxT(t), id)
		if err != nil {
			return err
		}
		if rec.Status != "Succeeded" {
			return errors.New("status " + rec.Status)
		}
		if !strings.Contains(rec.Log, "async-ran") {
			t.Fatalf("async record log lacks the function's output:\n%s", rec.Log)
		}
		return nil
	})

	dry, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("async"), InvocationType: types.InvocationTypeDryRun})
	if err != nil || dry.StatusCode != 204 {
		t.Fatalf("DryRun: status %v err %v", dry, err)
	}
}

func TestReservedConcurrencyThrottles(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "capped", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(30) })
	c := s.sdk()
	if _, err := c.PutFunctionConcurrency(ctxT(t), &lambda.PutFunctionConcurrencyInput{FunctionName: aws.String("capped"), ReservedConcurrentExecutions: aws.Int32(0)}); err != nil {
		t.Fatal(err)
	}
	_, err := c.Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("capped"), Payload: []byte(`{"action":"echo"}`)})
	var tm *types.TooManyRequestsException
	if !errors.As(err, &tm) || tm.Reason != types.ThrottleReasonReservedFunctionConcurrentInvocationLimitExceeded {
		t.Fatalf("with reserved concurrency 0: %v, want TooManyRequestsException(ReservedFunctionConcurrentInvocationLimitExceeded)", err)
	}

	// With one slot, a second invocation while the first runs is throttled.
	if _, err := c.PutFunctionConcurrency(ctxT(t), &lambda.PutFunctionConcurrencyInput{FunctionName: aws.String("capped"), ReservedConcurrentExecutions: aws.Int32(1)}); err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() {
		out, err := c.Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("capped"), Payload: []byte(`{"action":"sleep","ms":4000}`)})
		if err == nil && out.FunctionError != nil {
			err = errors.New(string(out.Payload))
		}
		first <- err
	}()
	throttled := false
	for !throttled {
		select {
		case err := <-first:
			t.Fatalf("the first invocation ended (%v) before a second one was throttled", err)
		case <-time.After(200 * time.Millisecond):
		}
		_, err := c.Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("capped"), Payload: []byte(`{"action":"echo"}`)})
		throttled = errors.As(err, &tm)
	}
	if err := <-first; err != nil {
		t.Fatalf("first invocation: %v", err)
	}
	if _, err := c.DeleteFunctionConcurrency(ctxT(t), &lambda.DeleteFunctionConcurrencyInput{FunctionName: aws.String("capped")}); err != nil {
		t.Fatal(err)
	}
	if out := invoke(t, s, "capped", map[string]any{"action": "echo"}, false); out.FunctionError != nil {
		t.Fatal(string(out.Payload))
	}
}

func TestPayloadLimits(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "limits", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(30) })
	c := s.sdk()
	var tooLarge *types.RequestTooLargeException
	big := []byte(`"` + strings.Repeat("x", 6*1024*1024) + `"`)
	if _, err := c.Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("limits"), Payload: big}); !errors.As(err, &tooLarge) {
		t.Errorf("sync payload over 6 MB: %v, want RequestTooLargeException", err)
	}
	bigAsync := []byte(`"` + strings.Repeat("x", 256*1024) + `"`)
	if _, err := c.Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("limits"), InvocationType: types.InvocationTypeEvent, Payload: bigAsync}); !errors.As(err, &tooLarge) {
		t.Errorf("async payload over 256 KB: %v, want RequestTooLargeException", err)
	}
	out := invoke(t, s, "limits", map[string]any{"action": "big-response", "bytes": 7 << 20}, false)
	if aws.ToString(out.FunctionError) != "Unhandled" || !strings.Contains(string(out.Payload), "Function.ResponseSizeTooLarge") {
		t.Errorf("response over 6 MB: FunctionError %q, payload %.200s", aws.ToString(out.FunctionError), out.Payload)
	}
	if out := invoke(t, s, "limits", map[string]any{"action": "big-response", "bytes": 5 << 20}, false); out.FunctionError != nil || len(out.Payload) < 5<<20 {
		t.Errorf("5 MB response: error %q, %d bytes", aws.ToString(out.FunctionError), len(out.Payload))
	}
}

func TestClientDisconnectReleasesTheSandbox(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "walkaway", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(30) })
	var before probeEcho
	json.Unmarshal(invoke(t, s, "walkaway", map[string]any{"action": "echo"}, false).Payload, &before)

	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	_, err := s.sdk().Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("walkaway"), Payload: []byte(`{"action":"sleep","ms":1500}`)})
	cancel()
	if err == nil {
		t.Fatal("the client gave up after 500 ms, yet Invoke returned a response")
	}
	// The abandoned invocation runs to its end and is recorded with what the
	// function really did; its instance then goes back to the pool.
	eventually(t, time.Minute, func() error {
		recs, err := client.New(s.endpoint).ListInvocations(ctxT(t), "walkaway", 10)
		if err != nil {
			return err
		}
		for _, r := range recs {
			if strings.Contains(r.Log, "REPORT") && r.DurationMs >= 1500 {
				if r.Status != "Succeeded" {
					t.Fatalf("abandoned invocation recorded as %s %s", r.Status, r.ErrorType)
				}
				return nil
			}
		}
		return errors.New("abandoned invocation not recorded yet")
	})
	out := invoke(t, s, "walkaway", map[string]any{"action": "echo"}, false)
	var after probeEcho
	json.Unmarshal(out.Payload, &after)
	if record(t, s, requestID(t, out)).Cold || after.Hostname != before.Hostname {
		t.Fatalf("after the disconnect the function ran in a new environment (%s, before %s): the sandbox was not released to the pool", after.Hostname, before.Hostname)
	}
}

func TestSandboxIsolation(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "jail")
	var echo probeEcho
	json.Unmarshal(invoke(t, s, "jail", map[string]any{"action": "echo"}, false).Payload, &echo)
	if echo.UID == 0 {
		t.Error("the function runs as root")
	}
	if echo.Cwd != "/var/task" {
		t.Errorf("cwd = %q, want /var/task", echo.Cwd)
	}
	checks := []struct {
		event map[string]any
		what  string
	}{
		{map[string]any{"action": "read-file", "path": s.dataDir + "/invokex.db"}, "the server's database"},
		{map[string]any{"action": "write-file", "path": "/var/task/x"}, "the code directory"},
		{map[string]any{"action": "write-file", "path": "/usr/x"}, "the runtime root"},
		{map[string]any{"action": "dial", "addr": s.addr}, "the InvokeX API"},
	}
	for _, c := range checks {
		out := invoke(t, s, "jail", c.event, false)
		var res struct {
			Error string `json:"error"`
		}
		json.Unmarshal(out.Payload, &res)
		if out.FunctionError == nil && res.Error == "" {
			t.Errorf("the function reached %s: %s", c.what, out.Payload)
		}
	}
	// /tmp is writable.
	if out := invoke(t, s, "jail", map[string]any{"action": "write-file", "path": "/tmp/ok"}, false); out.FunctionError != nil || strings.Contains(string(out.Payload), `"error":"`) {
		t.Errorf("writing /tmp failed: %s", out.Payload)
	}
}

func TestScaleToZeroAfterKeepAlive(t *testing.T) {
	s := startServer(t, "", "--keep-alive", "1s")
	createProbe(t, s, "sleepy")
	first := invoke(t, s, "sleepy", map[string]any{"action": "echo"}, false)
	if !record(t, s, requestID(t, first)).Cold {
		t.Fatal("first invocation was not a cold start")
	}
	eventually(t, time.Minute, func() error {
		time.Sleep(1500 * time.Millisecond)
		out := invoke(t, s, "sleepy", map[string]any{"action": "echo"}, false)
		if !record(t, s, requestID(t, out)).Cold {
			return errors.New("instance still warm")
		}
		return nil
	})
}

func TestPythonAndNodeExamples(t *testing.T) {
	s := startServer(t, "")
	rts, err := client.New(s.endpoint).ListRuntimes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	avail := map[string]string{}
	for _, rt := range rts {
		if rt.Available {
			avail[rt.Family] = rt.Id
		}
	}
	for _, ex := range []struct{ dir, family, handler string }{
		{"hello-python", "python", "app.handler"},
		{"hello-node", "nodejs", "index.handler"},
	} {
		t.Run(ex.dir, func(t *testing.T) {
			rt, ok := avail[ex.family]
			if !ok {
				t.Skipf("no %s runtime on this host", ex.family)
			}
			_, err := s.sdk().CreateFunction(ctxT(t), &lambda.CreateFunctionInput{
				FunctionName: aws.String(ex.dir), Runtime: types.Runtime(rt), Handler: aws.String(ex.handler),
				Role: aws.String("arn:aws:iam::000000000000:role/x"), Code: &types.FunctionCode{ZipFile: exampleZip(t, ex.dir)},
			})
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 2; i++ { // cold, then warm
				out := invoke(t, s, ex.dir, map[string]any{"name": "e2e"}, true)
				if out.FunctionError != nil || !strings.Contains(string(out.Payload), "Hello, e2e") {
					t.Fatalf("invoke %d: error %q payload %s log %s", i, aws.ToString(out.FunctionError), out.Payload, tailLog(t, out))
				}
			}
		})
	}
}

func requestID(t *testing.T, out *lambda.InvokeOutput) string {
	t.Helper()
	id, ok := middlewareRequestID(out)
	if !ok || id == "" {
		t.Fatal("no request id in the Invoke response metadata")
	}
	return id
}

func record(t *testing.T, s *server, id string) *client.Invocation {
	t.Helper()
	var rec *client.Invocation
	eventually(t, 30*time.Second, func() error {
		var err error
		rec, err = client.New(s.endpoint).GetInvocation(ctxT(t), id)
		return err
	})
	return rec
}
