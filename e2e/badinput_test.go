package e2e

import (
	"archive/zip"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
	smithy "github.com/aws/smithy-go"
)

// zipWith builds a zip from raw headers, for entries Go's writer would not
// produce on its own (symlinks, hostile names).
func zipWith(t *testing.T, entries ...func(*zip.Writer)) []byte {
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		e(zw)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func entry(name string, mode uint32, data []byte) func(*zip.Writer) {
	return func(zw *zip.Writer) {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(0o755)
		if mode != 0 {
			h.ExternalAttrs = mode << 16
		}
		w, _ := zw.CreateHeader(h)
		w.Write(data)
	}
}

func TestBadInputGetsAClearErrorAndLosesNothing(t *testing.T) {
	s := startServer(t, "")
	createProbe(t, s, "keeper")
	c := s.sdk()
	bootstrap := probeZip(t)
	const symlink = 0o120777

	create := func(mut func(*lambda.CreateFunctionInput)) error {
		in := &lambda.CreateFunctionInput{
			FunctionName: aws.String("bad"), Runtime: types.RuntimeProvidedal2023, Handler: aws.String("bootstrap"),
			Role: aws.String("arn:aws:iam::000000000000:role/x"), Code: &types.FunctionCode{ZipFile: bootstrap},
		}
		mut(in)
		_, err := c.CreateFunction(ctxT(t), in)
		return err
	}
	bomb := func() []byte { // 1 GiB of zeros, about 1 MB compressed
		var buf bytes.Buffer
		zw := zip.NewWriter(&buf)
		w, _ := zw.Create("bootstrap")
		zero := make([]byte, 1<<20)
		for i := 0; i < 1024; i++ {
			w.Write(zero)
		}
		zw.Close()
		return buf.Bytes()
	}
	cases := []struct {
		name     string
		mut      func(*lambda.CreateFunctionInput)
		wantCode string
	}{
		{"not a zip", func(in *lambda.CreateFunctionInput) { in.Code.ZipFile = []byte("this is not a zip file") }, "InvalidParameterValueException"},
		{"empty zip", func(in *lambda.CreateFunctionInput) { in.Code.ZipFile = zipWith(t) }, "InvalidParameterValueException"},
		{"dot-dot entry", func(in *lambda.CreateFunctionInput) {
			in.Code.ZipFile = zipWith(t, entry("bootstrap", 0, []byte("#!/bin/sh")), entry("../escape", 0, []byte("x")))
		}, "InvalidParameterValueException"},
		{"absolute entry", func(in *lambda.CreateFunctionInput) {
			in.Code.ZipFile = zipWith(t, entry("bootstrap", 0, []byte("#!/bin/sh")), entry("/etc/evil", 0, []byte("x")))
		}, "InvalidParameterValueException"},
		{"escaping symlink", func(in *lambda.CreateFunctionInput) {
			in.Code.ZipFile = zipWith(t, entry("bootstrap", 0, []byte("#!/bin/sh")), entry("link", symlink, []byte("../../../etc/passwd")))
		}, "InvalidParameterValueException"},
		{"zip bomb", func(in *lambda.CreateFunctionInput) { in.Code.ZipFile = bomb() }, "InvalidParameterValueException"},
		{"missing bootstrap", func(in *lambda.CreateFunctionInput) {
			in.Code.ZipFile = zipWith(t, entry("main.go", 0, []byte("package main")))
		}, "InvalidParameterValueException"},
		{"missing python handler file", func(in *lambda.CreateFunctionInput) {
			in.Runtime = types.Runtime(pythonRuntime(t, s))
			in.Handler = aws.String("app.handler")
			in.Code.ZipFile = zipWith(t, entry("other.py", 0, []byte("def handler(e, c): return 1")))
		}, "InvalidParameterValueException"},
		{"invalid name", func(in *lambda.CreateFunctionInput) { in.FunctionName = aws.String("no spaces allowed") }, "InvalidParameterValueException"},
		{"name too long", func(in *lambda.CreateFunctionInput) { in.FunctionName = aws.String(strings.Repeat("a", 65)) }, "InvalidParameterValueException"},
		{"unknown runtime", func(in *lambda.CreateFunctionInput) { in.Runtime = "cobol85" }, "InvalidParameterValueException"},
		{"timeout too small", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(0) }, "InvalidParameterValueException"},
		{"timeout too large", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(901) }, "InvalidParameterValueException"},
		{"memory too small", func(in *lambda.CreateFunctionInput) { in.MemorySize = aws.Int32(64) }, "InvalidParameterValueException"},
		{"memory too large", func(in *lambda.CreateFunctionInput) { in.MemorySize = aws.Int32(20000) }, "InvalidParameterValueException"},
		{"reserved env var", func(in *lambda.CreateFunctionInput) {
			in.Environment = &types.Environment{Variables: map[string]string{"AWS_REGION": "mars-1"}}
		}, "InvalidParameterValueException"},
		{"duplicate name", func(in *lambda.CreateFunctionInput) { in.FunctionName = aws.String("keeper") }, "ResourceConflictException"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := create(tc.mut)
			var ae smithy.APIError
			if !errors.As(err, &ae) || ae.ErrorCode() != tc.wantCode {
				t.Fatalf("got %v, want %s", err, tc.wantCode)
			}
			if ae.ErrorMessage() == "" {
				t.Error("error without a message")
			}
		})
	}

	// Nothing lost: the good function is intact and no "bad" function exists.
	list, err := c.ListFunctions(ctxT(t), &lambda.ListFunctionsInput{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Functions) != 1 || aws.ToString(list.Functions[0].FunctionName) != "keeper" {
		t.Fatalf("functions after bad input: %+v", list.Functions)
	}
	if out := invoke(t, s, "keeper", map[string]any{"action": "echo"}, false); out.FunctionError != nil {
		t.Fatal(string(out.Payload))
	}
}

func pythonRuntime(t *testing.T, s *server) string {
	rts := mustRuntimes(t, s)
	for _, rt := range rts {
		if rt.Available && rt.Family == "python" {
			return rt.Id
		}
	}
	return "python3.11" // known even where unavailable: the error is then about availability
}

func TestHostileNamesInPaths(t *testing.T) {
	s := startServer(t, "")
	for _, path := range []string{
		"/2015-03-31/functions/..%2F..%2Fetc%2Fpasswd/invocations",
		"/2015-03-31/functions/" + strings.Repeat("a", 65) + "/configuration",
		"/2015-03-31/functions/a%00b/configuration",
	} {
		method := http.MethodGet
		if strings.HasSuffix(path, "invocations") {
			method = http.MethodPost
		}
		req, _ := http.NewRequest(method, s.endpoint+path, strings.NewReader("{}"))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || resp.Header.Get("X-Amzn-ErrorType") != "InvalidParameterValueException" {
			t.Errorf("%s %s: %d %s %s", method, path, resp.StatusCode, resp.Header.Get("X-Amzn-ErrorType"), body)
		}
	}
}

func TestConcurrentUpdatesWithOneRevisionIdConflict(t *testing.T) {
	s := startServer(t, "")
	created := createProbe(t, s, "contended")
	c := s.sdk()
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, errs[i] = c.UpdateFunctionCode(ctxT(t), &lambda.UpdateFunctionCodeInput{
				FunctionName: aws.String("contended"), ZipFile: helloGoZip(t), RevisionId: created.RevisionId,
			})
		}(i)
	}
	wg.Wait()
	var pf *types.PreconditionFailedException
	ok, conflicted := 0, 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.As(err, &pf):
			conflicted++
		default:
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != 1 || conflicted != 1 {
		t.Fatalf("two updates with one RevisionId: %d succeeded, %d PreconditionFailed (want 1 and 1)", ok, conflicted)
	}
	// A stale RevisionId on a configuration update is refused too.
	_, err := c.UpdateFunctionConfiguration(ctxT(t), &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("contended"), Description: aws.String("x"), RevisionId: created.RevisionId,
	})
	if !errors.As(err, &pf) {
		t.Fatalf("stale RevisionId on UpdateFunctionConfiguration: %v", err)
	}
}
