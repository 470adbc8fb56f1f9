package frontend

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
	smithy "github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

func isA[T error](err error) bool {
	var target T
	return errors.As(err, &target)
}

func TestEveryErrorKindMapsToTheSDKsException(t *testing.T) {
	cases := []struct {
		kind   error
		status int
		is     func(error) bool
	}{
		{errdefs.ErrNotFound, 404, isA[*types.ResourceNotFoundException]},
		{errdefs.ErrAlreadyExists, 409, isA[*types.ResourceConflictException]},
		{errdefs.ErrConflict, 409, isA[*types.ResourceConflictException]},
		{errdefs.ErrPreconditionFailed, 412, isA[*types.PreconditionFailedException]},
		{errdefs.ErrInvalidParameter, 400, isA[*types.InvalidParameterValueException]},
		{errdefs.ErrInvalidRequestContent, 400, isA[*types.InvalidRequestContentException]},
		{errdefs.ErrTooLarge, 413, isA[*types.RequestTooLargeException]},
		{errdefs.ErrUnsupportedMediaType, 415, isA[*types.UnsupportedMediaTypeException]},
		{errdefs.ErrThrottled, 429, isA[*types.TooManyRequestsException]},
		{errdefs.ErrNotReady, 502, isA[*types.ResourceNotReadyException]},
		{errdefs.ErrInvalidRuntime, 502, isA[*types.InvalidRuntimeException]},
		{errdefs.ErrUnavailable, 503, isA[*types.ServiceException]},
	}
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "f"}, testZip)
	for _, c := range cases {
		t.Run(c.kind.Error(), func(t *testing.T) {
			e.fake.setErr(fmt.Errorf("detail for %s: %w", c.kind, c.kind))
			_, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("f")})
			if !c.is(err) {
				t.Fatalf("err = %T %v, not the expected exception", err, err)
			}
			if got := statusOf(t, err); got != c.status {
				t.Errorf("status = %d, want %d", got, c.status)
			}
			var ae smithy.APIError
			if !errors.As(err, &ae) || ae.ErrorMessage() != "detail for "+c.kind.Error() {
				t.Errorf("message = %q, want the wrapped message without its kind", ae.ErrorMessage())
			}
		})
	}
}

func TestThrottleCarriesReasonAndRetryAfter(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "f"}, testZip)
	e.fake.setErr(fmt.Errorf("invoking f: %w", errdefs.Throttled(errdefs.ReasonReservedFunctionConcurrency, "Rate Exceeded.")))
	_, err := e.sdk.Invoke(context.Background(), &lambda.InvokeInput{FunctionName: aws.String("f")})
	var tm *types.TooManyRequestsException
	if !errors.As(err, &tm) {
		t.Fatalf("err = %v, want TooManyRequestsException", err)
	}
	if tm.Reason != types.ThrottleReasonReservedFunctionConcurrentInvocationLimitExceeded {
		t.Errorf("Reason = %q", tm.Reason)
	}
	if aws.ToString(tm.RetryAfterSeconds) == "" {
		t.Error("no Retry-After")
	}
	if aws.ToString(tm.Type) != "User" || aws.ToString(tm.Message) != "invoking f: Rate Exceeded." {
		t.Errorf("Type %q Message %q", aws.ToString(tm.Type), aws.ToString(tm.Message))
	}
}

func TestInternalErrorsAreGenericAndLoggedOnce(t *testing.T) {
	e := newEnv(t)
	e.fake.setErr(errors.New("opening /var/lib/invokex/secret.db: disk on fire"))
	_, err := e.sdk.GetFunction(context.Background(), &lambda.GetFunctionInput{FunctionName: aws.String("f")})
	var se *types.ServiceException
	if !errors.As(err, &se) {
		t.Fatalf("err = %v, want ServiceException", err)
	}
	if statusOf(t, err) != 500 {
		t.Errorf("status = %d", statusOf(t, err))
	}
	if strings.Contains(err.Error(), "disk on fire") || strings.Contains(err.Error(), "secret.db") {
		t.Errorf("internal detail sent to the client: %v", err)
	}
	if aws.ToString(se.Type) != "Service" {
		t.Errorf("Type = %q, want Service", aws.ToString(se.Type))
	}
	var re interface{ ServiceRequestID() string }
	if !errors.As(err, &re) || re.ServiceRequestID() == "" || !strings.Contains(aws.ToString(se.Message), re.ServiceRequestID()) {
		t.Errorf("message %q does not carry the request id", aws.ToString(se.Message))
	}
	log := e.log.String()
	if n := strings.Count(log, "disk on fire"); n != 1 {
		t.Errorf("internal error logged %d times, want once:\n%s", n, log)
	}
	if !strings.Contains(log, "level=ERROR") || !strings.Contains(log, "request_id="+re.ServiceRequestID()) {
		t.Errorf("log lacks the ERROR line with the request id:\n%s", log)
	}
}

func TestPanicIsAServiceException(t *testing.T) {
	e := newEnv(t)
	e.fake.locked(func() { e.fake.panicWith = "nil map somewhere" })
	_, err := e.sdk.ListFunctions(context.Background(), &lambda.ListFunctionsInput{})
	var se *types.ServiceException
	if !errors.As(err, &se) || statusOf(t, err) != 500 {
		t.Fatalf("err = %v, want a 500 ServiceException", err)
	}
	if strings.Contains(err.Error(), "nil map") {
		t.Errorf("panic value sent to the client: %v", err)
	}
	if !strings.Contains(e.log.String(), "nil map somewhere") {
		t.Error("panic not logged")
	}
}

// corruptBody makes the SDK's request carry malformed JSON, as a broken
// client would, so the SDK itself decodes the resulting exception.
type corruptBody struct{ c *http.Client }

func (c corruptBody) Do(r *http.Request) (*http.Response, error) {
	r.Body = io.NopCloser(strings.NewReader(`{"FunctionName": "x", "Code": {`))
	r.ContentLength = -1
	return c.c.Do(r)
}

func TestMalformedJSONIsInvalidRequestContent(t *testing.T) {
	e := newEnv(t)
	client := lambda.New(e.sdk.Options(), func(o *lambda.Options) { o.HTTPClient = corruptBody{e.srv.Client()} })
	_, err := client.CreateFunction(context.Background(), &lambda.CreateFunctionInput{
		FunctionName: aws.String("x"), Role: aws.String("r"), Code: &types.FunctionCode{ZipFile: testZip}})
	var irc *types.InvalidRequestContentException
	if !errors.As(err, &irc) {
		t.Fatalf("err = %v, want InvalidRequestContentException", err)
	}
	if statusOf(t, err) != 400 {
		t.Errorf("status = %d", statusOf(t, err))
	}

	// Wrong member types and bad base64 are malformed too; unknown members are fine.
	for body, want := range map[string]string{
		`{"FunctionName":"x","Timeout":"ten"}`:                                      "InvalidRequestContentException",
		`{"FunctionName":"x","Code":{"ZipFile":"***"}}`:                             "InvalidRequestContentException",
		`{"FunctionName":"x","Code":{"ZipFile":"UEsDBA=="},"SomethingNew":{"a":1}}`: "",
	} {
		resp, err := http.Post(e.srv.URL+"/2015-03-31/functions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := resp.Header.Get("X-Amzn-ErrorType"); got != want {
			t.Errorf("%s: error type %q (status %d), want %q", body, got, resp.StatusCode, want)
		}
	}
	if n := e.fake.count("CreateFunction"); n != 1 {
		t.Errorf("CreateFunction called %d times, want 1 (the unknown-member body)", n)
	}
}

func TestErrorWireFormat(t *testing.T) {
	e := newEnv(t)
	resp, err := http.Get(e.srv.URL + "/2015-03-31/functions/nope/configuration")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 404 || resp.Header.Get("X-Amzn-ErrorType") != "ResourceNotFoundException" ||
		resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("X-Amzn-RequestId") == "" {
		t.Errorf("status %d headers %v", resp.StatusCode, resp.Header)
	}
	if body["Type"] != "User" || !strings.HasPrefix(fmt.Sprint(body["message"]), "Function not found: arn:aws:lambda:us-east-1:000000000000:function:nope") {
		t.Errorf("body = %v", body)
	}
}

func TestUnknownRouteAndWrongMethod(t *testing.T) {
	e := newEnv(t)
	check := func(method, path string, status int, name string) {
		t.Helper()
		req, _ := http.NewRequest(method, e.srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body struct{ Type, Message string }
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatalf("%s %s: body is not JSON: %v", method, path, err)
		}
		if resp.StatusCode != status || resp.Header.Get("X-Amzn-ErrorType") != name || body.Type != "User" || body.Message == "" {
			t.Errorf("%s %s = %d %q %+v", method, path, resp.StatusCode, resp.Header.Get("X-Amzn-ErrorType"), body)
		}
	}
	check(http.MethodGet, "/2015-03-31/nothing", 404, "UnknownOperationException")
	check(http.MethodPost, "/2015-03-31/functions/f/aliases", 404, "UnknownOperationException")
	check(http.MethodPatch, "/2015-03-31/functions/f", 405, "MethodNotAllowedException")
	check(http.MethodPost, "/invokex/v1/runtimes", 405, "MethodNotAllowedException")

	// The SDK sees an operation InvokeX lacks as an API error, not a crash.
	_, err := e.sdk.ListAliases(context.Background(), &lambda.ListAliasesInput{FunctionName: aws.String("f")})
	var ae smithy.APIError
	if !errors.As(err, &ae) || ae.ErrorCode() != "UnknownOperationException" {
		t.Errorf("ListAliases err = %v", err)
	}
	var re *smithyhttp.ResponseError
	if !errors.As(err, &re) || re.HTTPStatusCode() != 404 {
		t.Errorf("ListAliases status: %v", err)
	}
}
