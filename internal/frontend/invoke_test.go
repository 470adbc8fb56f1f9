package frontend

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsmiddleware "github.com/aws/aws-sdk-go-v2/aws/middleware"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
	"github.com/aws/smithy-go/middleware"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
)

func statusOf(t *testing.T, err error) int {
	t.Helper()
	var re *awshttp.ResponseError
	if !errors.As(err, &re) {
		t.Fatalf("err %v is not an HTTP response error", err)
	}
	return re.HTTPStatusCode()
}

func TestInvokeRequestResponse(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "echo"}, testZip)
	out, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName:  aws.String("echo"),
		Payload:       []byte(`{"hello":"world"}`),
		ClientContext: aws.String(base64.StdEncoding.EncodeToString([]byte(`{"custom":{"a":1}}`))),
	})
	if err != nil {
		t.Fatalf("Invoke: %v", err)
	}
	if out.StatusCode != 200 || string(out.Payload) != `{"hello":"world"}` {
		t.Errorf("status %d payload %q", out.StatusCode, out.Payload)
	}
	if aws.ToString(out.ExecutedVersion) != "$LATEST" || out.FunctionError != nil || out.LogResult != nil {
		t.Errorf("version %q error %v log %v", aws.ToString(out.ExecutedVersion), out.FunctionError, out.LogResult)
	}
	reqID, _ := awsmiddlewareRequestID(out.ResultMetadata)
	e.fake.locked(func() {
		in := e.fake.lastInvoke
		if in == nil || in.Function != "echo" || in.Qualifier != "" {
			t.Fatalf("invoke input = %+v", in)
		}
		if reqID == "" || in.RequestID != reqID {
			t.Errorf("RequestID passed %q, X-Amzn-RequestId %q", in.RequestID, reqID)
		}
		if in.ClientContext == "" {
			t.Error("client context not passed")
		}
	})

	// A qualifier travels to the control plane, from the query or an ARN.
	if _, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName: aws.String("000000000000:function:echo:$LATEST"), Payload: []byte(`1`)}); err != nil {
		t.Fatalf("Invoke partial ARN: %v", err)
	}
	e.fake.locked(func() {
		if in := e.fake.lastInvoke; in.Function != "echo" || in.Qualifier != "$LATEST" {
			t.Errorf("partial ARN resolved to %q %q", in.Function, in.Qualifier)
		}
	})
}

// awsmiddlewareRequestID reads the X-Amzn-RequestId the SDK recorded.
func awsmiddlewareRequestID(md middleware.Metadata) (string, bool) {
	return awsmiddleware.GetRequestIDMetadata(md)
}

func TestInvokeTailLogIsLast4KB(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "loud"}, testZip)
	var log bytes.Buffer
	for i := 0; log.Len() < 10000; i++ {
		fmt.Fprintf(&log, "line %05d of the function's output\n", i)
	}
	e.fake.setInvoke(func(in *controlplane.InvokeInput) *harness.InvokeResult {
		return &harness.InvokeResult{Payload: []byte(`"ok"`), Log: log.Bytes()}
	})
	out, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName: aws.String("loud"), LogType: types.LogTypeTail})
	if err != nil {
		t.Fatalf("Invoke: %v", err)
	}
	got, err := base64.StdEncoding.DecodeString(aws.ToString(out.LogResult))
	if err != nil {
		t.Fatalf("LogResult is not base64: %v", err)
	}
	want := log.Bytes()[log.Len()-4096:]
	if !bytes.Equal(got, want) {
		t.Errorf("LogResult has %d bytes ending %q, want the last 4096 ending %q", len(got), got[max(0, len(got)-40):], want[len(want)-40:])
	}
}

func TestInvokeFunctionError(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "boom"}, testZip)
	doc := `{"errorMessage":"boom","errorType":"Error","stackTrace":[]}`
	e.fake.setInvoke(func(in *controlplane.InvokeInput) *harness.InvokeResult {
		return &harness.InvokeResult{Payload: []byte(doc), FunctionError: "Unhandled", ErrorType: "Error"}
	})
	out, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("boom")})
	if err != nil {
		t.Fatalf("a function error must not be an API error: %v", err)
	}
	if out.StatusCode != 200 || aws.ToString(out.FunctionError) != "Unhandled" || string(out.Payload) != doc {
		t.Errorf("status %d function error %q payload %q", out.StatusCode, aws.ToString(out.FunctionError), out.Payload)
	}
}

func TestInvokeOversizeResponseIsAFunctionError(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxSyncPayload = 1024 })
	e.fake.put(&function.Config{Name: "big"}, testZip)
	big := []byte(`"` + strings.Repeat("x", 2000) + `"`)
	e.fake.setInvoke(func(in *controlplane.InvokeInput) *harness.InvokeResult {
		return &harness.InvokeResult{Payload: big}
	})
	out, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("big")})
	if err != nil {
		t.Fatalf("Invoke: %v", err)
	}
	if aws.ToString(out.FunctionError) != "Unhandled" {
		t.Errorf("FunctionError = %q, want Unhandled", aws.ToString(out.FunctionError))
	}
	var doc struct{ ErrorMessage, ErrorType string }
	if err := json.Unmarshal(out.Payload, &doc); err != nil {
		t.Fatalf("payload %q is not the error document: %v", out.Payload, err)
	}
	if doc.ErrorType != "Function.ResponseSizeTooLarge" || !strings.Contains(doc.ErrorMessage, "Response payload size exceeded maximum allowed payload size (1024 bytes)") {
		t.Errorf("error document = %+v", doc)
	}
	if bytes.Contains(out.Payload, []byte("xxxx")) {
		t.Error("part of the oversized payload was sent")
	}
}

func TestInvokeEventAndDryRun(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "later"}, testZip)
	out, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName: aws.String("later"), InvocationType: types.InvocationTypeEvent, Payload: []byte(`{"n":1}`)})
	if err != nil {
		t.Fatalf("Event: %v", err)
	}
	if out.StatusCode != 202 || len(out.Payload) != 0 {
		t.Errorf("Event status %d payload %q", out.StatusCode, out.Payload)
	}
	reqID, _ := awsmiddlewareRequestID(out.ResultMetadata)
	e.fake.locked(func() {
		in := e.fake.lastAsync
		if in == nil || in.Function != "later" || string(in.Payload) != `{"n":1}` || in.RequestID != reqID {
			t.Errorf("async input = %+v (request id %q)", in, reqID)
		}
		if e.fake.calls["Invoke"] != 0 {
			t.Error("Event ran synchronously")
		}
	})

	out, err = e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName: aws.String("later"), InvocationType: types.InvocationTypeDryRun, Qualifier: aws.String("$LATEST")})
	if err != nil {
		t.Fatalf("DryRun: %v", err)
	}
	if out.StatusCode != 204 {
		t.Errorf("DryRun status %d", out.StatusCode)
	}
	e.fake.locked(func() {
		if e.fake.lastCheck != [2]string{"later", "$LATEST"} || e.fake.calls["Invoke"] != 0 {
			t.Errorf("CheckInvoke got %v, Invoke calls %d", e.fake.lastCheck, e.fake.calls["Invoke"])
		}
	})

	_, err = e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
		FunctionName: aws.String("missing"), InvocationType: types.InvocationTypeDryRun})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Errorf("DryRun of a missing function: %v", err)
	}
}

func TestInvokeBodyOverLimitNeverReachesTheAPI(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.MaxSyncPayload = 2048; c.MaxAsyncPayload = 512 })
	e.fake.put(&function.Config{Name: "f"}, testZip)
	cases := []struct {
		typ   types.InvocationType
		size  int
		limit int
	}{
		{types.InvocationTypeRequestResponse, 2049, 2048},
		{types.InvocationTypeEvent, 513, 512},
		{types.InvocationTypeDryRun, 4000, 2048},
	}
	for _, c := range cases {
		t.Run(string(c.typ), func(t *testing.T) {
			payload := []byte(`"` + strings.Repeat("a", c.size-2) + `"`)
			_, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{
				FunctionName: aws.String("f"), InvocationType: c.typ, Payload: payload})
			var tl *types.RequestTooLargeException
			if !errors.As(err, &tl) {
				t.Fatalf("err = %v, want RequestTooLargeException", err)
			}
			if statusOf(t, err) != 413 {
				t.Errorf("status = %d", statusOf(t, err))
			}
			want := fmt.Sprintf("Request must be smaller than %d bytes for the InvokeFunction operation", c.limit)
			if aws.ToString(tl.Message) != want {
				t.Errorf("message = %q, want %q", aws.ToString(tl.Message), want)
			}
		})
	}
	// Exactly at the limit is fine.
	if _, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("f"),
		InvocationType: types.InvocationTypeEvent, Payload: []byte(`"` + strings.Repeat("a", 510) + `"`)}); err != nil {
		t.Errorf("payload at the limit: %v", err)
	}
	e.fake.locked(func() {
		if e.fake.calls["Invoke"]+e.fake.calls["CheckInvoke"] != 0 || e.fake.calls["InvokeAsync"] != 1 {
			t.Errorf("calls = %v, want only the at-limit InvokeAsync", e.fake.calls)
		}
	})

	// A body without Content-Length (chunked) is cut off by the reader too.
	req, _ := http.NewRequest(http.MethodPost, e.srv.URL+"/2015-03-31/functions/f/invocations", strings.NewReader(`"`+strings.Repeat("b", 3000)+`"`))
	req.ContentLength = -1
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 413 || resp.Header.Get("X-Amzn-ErrorType") != "RequestTooLargeException" {
		t.Errorf("chunked: %d %q", resp.StatusCode, resp.Header.Get("X-Amzn-ErrorType"))
	}
	if n := e.fake.count("Invoke"); n != 0 {
		t.Errorf("Invoke called %d times", n)
	}
}

func TestInvokeRefusesBadInput(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "f"}, testZip)
	cases := map[string]*lambda.InvokeInput{
		"client context too large": {FunctionName: aws.String("f"),
			ClientContext: aws.String(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("c"), 3000)))},
		"client context not base64": {FunctionName: aws.String("f"), ClientContext: aws.String("not base64!")},
		"unknown invocation type":   {FunctionName: aws.String("f"), InvocationType: "Later"},
		"unknown log type":          {FunctionName: aws.String("f"), LogType: "Everything"},
		"bad qualifier":             {FunctionName: aws.String("f"), Qualifier: aws.String("a.b")},
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := e.sdk.Invoke(context.Background(), in)
			var ipv *types.InvalidParameterValueException
			if !errors.As(err, &ipv) {
				t.Fatalf("err = %v, want InvalidParameterValueException", err)
			}
		})
	}
	_, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("f"), Payload: []byte(`{not json`)})
	var irc *types.InvalidRequestContentException
	if !errors.As(err, &irc) {
		t.Errorf("non-JSON payload err = %v, want InvalidRequestContentException", err)
	}
	if n := e.fake.totalCalls(); n != 0 {
		t.Errorf("control plane called %d times, want 0", n)
	}
}

func TestNamePathTricksNeverReachTheAPI(t *testing.T) {
	e := newEnv(t)
	names := []string{"..%2F..", "../..", "a/b", strings.Repeat("n", 65), "a b", "arn:aws:lambda:us-east-1:000000000000:function:../x", "%00", "."}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			_, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String(name), Payload: []byte(`{}`)})
			var ipv *types.InvalidParameterValueException
			if !errors.As(err, &ipv) {
				t.Errorf("Invoke(%q) err = %v, want InvalidParameterValueException", name, err)
			}
			_, err = e.sdk.GetFunction(context.Background(), &lambda.GetFunctionInput{FunctionName: aws.String(name)})
			if !errors.As(err, &ipv) {
				t.Errorf("GetFunction(%q) err = %v, want InvalidParameterValueException", name, err)
			}
			_, err = e.sdk.DeleteFunction(context.Background(), &lambda.DeleteFunctionInput{FunctionName: aws.String(name)})
			if !errors.As(err, &ipv) {
				t.Errorf("DeleteFunction(%q) err = %v, want InvalidParameterValueException", name, err)
			}
		})
	}
	// Raw paths the SDK would never send.
	for _, p := range []string{"/2015-03-31/functions/../functions/x/invocations", "/2015-03-31/functions/x/./invocations", "/2015-03-31//functions/x/invocations"} {
		resp, err := http.Post(e.srv.URL+p, "application/json", strings.NewReader(`{}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 || resp.Header.Get("X-Amzn-ErrorType") != "InvalidParameterValueException" {
			t.Errorf("POST %s = %d %q", p, resp.StatusCode, resp.Header.Get("X-Amzn-ErrorType"))
		}
	}
	if n := e.fake.totalCalls(); n != 0 {
		t.Errorf("control plane called %d times, want 0", n)
	}
}

func TestClientGoneIsNotLoggedAsAnInternalError(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "slow"}, testZip)
	started := make(chan struct{})
	e.fake.locked(func() {
		e.fake.gate = func(ctx context.Context) error {
			close(started)
			<-ctx.Done() // the client hangs up; the control plane honours it
			return ctx.Err()
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := e.sdk.Invoke(ctx, &lambda.InvokeInput{FunctionName: aws.String("slow")})
		done <- err
	}()
	<-started
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("client err = %v", err)
	}
	// The server logs the request once its handler returns; wait for it.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(e.log.String(), "operation=Invoke") {
		if time.Now().After(deadline) {
			t.Fatalf("request never logged:\n%s", e.log.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	log := e.log.String()
	if strings.Contains(log, "level=ERROR") || !strings.Contains(log, "context canceled") {
		t.Errorf("a client hang-up must be an Info line, not an internal error:\n%s", log)
	}
}
