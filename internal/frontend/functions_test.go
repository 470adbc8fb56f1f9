package frontend

import (
	"context"
	"errors"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/function"
)

var testZip = []byte("PK\x03\x04 not really a zip, the fake does not look")

func TestCreateAndGetFunction(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	out, err := e.sdk.CreateFunction(ctx, &lambda.CreateFunctionInput{
		FunctionName:     aws.String("hello"),
		Runtime:          types.RuntimePython312,
		Role:             aws.String("arn:aws:iam::000000000000:role/r"),
		Handler:          aws.String("app.handler"),
		Code:             &types.FunctionCode{ZipFile: testZip},
		Description:      aws.String("says hello"),
		Timeout:          aws.Int32(10),
		MemorySize:       aws.Int32(256),
		Environment:      &types.Environment{Variables: map[string]string{"GREETING": "hi"}},
		EphemeralStorage: &types.EphemeralStorage{Size: aws.Int32(1024)},
		Architectures:    []types.Architecture{types.ArchitectureX8664},
		Tags:             map[string]string{"team": "a"},
	})
	if err != nil {
		t.Fatalf("CreateFunction: %v", err)
	}
	if got, want := aws.ToString(out.FunctionArn), "arn:aws:lambda:us-east-1:000000000000:function:hello"; got != want {
		t.Errorf("FunctionArn = %q, want %q", got, want)
	}
	if aws.ToString(out.FunctionName) != "hello" || out.Runtime != types.RuntimePython312 || aws.ToString(out.Handler) != "app.handler" {
		t.Errorf("name/runtime/handler = %q/%q/%q", aws.ToString(out.FunctionName), out.Runtime, aws.ToString(out.Handler))
	}
	if aws.ToInt32(out.Timeout) != 10 || aws.ToInt32(out.MemorySize) != 256 || aws.ToInt32(out.EphemeralStorage.Size) != 1024 {
		t.Errorf("timeout/memory/ephemeral = %d/%d/%d", aws.ToInt32(out.Timeout), aws.ToInt32(out.MemorySize), aws.ToInt32(out.EphemeralStorage.Size))
	}
	if out.CodeSize != int64(len(testZip)) || aws.ToString(out.CodeSha256) != sha(testZip) {
		t.Errorf("code size/sha = %d/%q", out.CodeSize, aws.ToString(out.CodeSha256))
	}
	if got := aws.ToString(out.LastModified); got != "2026-03-04T05:06:07.890+0000" {
		t.Errorf("LastModified = %q", got)
	}
	if out.PackageType != types.PackageTypeZip || out.State != types.StateActive || out.LastUpdateStatus != types.LastUpdateStatusSuccessful {
		t.Errorf("package/state/update = %q/%q/%q", out.PackageType, out.State, out.LastUpdateStatus)
	}
	if aws.ToString(out.Version) != "$LATEST" || aws.ToString(out.RevisionId) == "" {
		t.Errorf("version/revision = %q/%q", aws.ToString(out.Version), aws.ToString(out.RevisionId))
	}
	if out.Environment == nil || out.Environment.Variables["GREETING"] != "hi" {
		t.Errorf("Environment = %+v", out.Environment)
	}
	if out.TracingConfig == nil || out.TracingConfig.Mode != types.TracingModePassThrough {
		t.Errorf("TracingConfig = %+v", out.TracingConfig)
	}
	if out.LoggingConfig == nil || aws.ToString(out.LoggingConfig.LogGroup) != "/aws/lambda/hello" || out.LoggingConfig.LogFormat != types.LogFormatText {
		t.Errorf("LoggingConfig = %+v", out.LoggingConfig)
	}
	if out.SnapStart == nil || out.SnapStart.ApplyOn != types.SnapStartApplyOnNone || out.SnapStart.OptimizationStatus != types.SnapStartOptimizationStatusOff {
		t.Errorf("SnapStart = %+v", out.SnapStart)
	}
	if !reflect.DeepEqual(out.Architectures, []types.Architecture{types.ArchitectureX8664}) {
		t.Errorf("Architectures = %v", out.Architectures)
	}

	// The control plane got the configuration and the decoded zip.
	e.fake.locked(func() {
		c := e.fake.fns["hello"]
		if c == nil || c.Role != "arn:aws:iam::000000000000:role/r" || c.Description != "says hello" || c.Tags["team"] != "a" {
			t.Errorf("stored config = %+v", c)
		}
		if string(e.fake.code["hello"]) != string(testZip) {
			t.Errorf("stored zip = %q", e.fake.code["hello"])
		}
	})

	if _, err := e.sdk.PutFunctionConcurrency(ctx, &lambda.PutFunctionConcurrencyInput{
		FunctionName: aws.String("hello"), ReservedConcurrentExecutions: aws.Int32(7),
	}); err != nil {
		t.Fatalf("PutFunctionConcurrency: %v", err)
	}
	got, err := e.sdk.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String("hello")})
	if err != nil {
		t.Fatalf("GetFunction: %v", err)
	}
	if aws.ToString(got.Configuration.FunctionName) != "hello" || aws.ToString(got.Configuration.RevisionId) != aws.ToString(out.RevisionId) {
		t.Errorf("Configuration = %+v", got.Configuration)
	}
	if got.Tags["team"] != "a" {
		t.Errorf("Tags = %v", got.Tags)
	}
	if got.Concurrency == nil || aws.ToInt32(got.Concurrency.ReservedConcurrentExecutions) != 7 {
		t.Errorf("Concurrency = %+v", got.Concurrency)
	}
	if aws.ToString(got.Code.RepositoryType) != "S3" {
		t.Errorf("RepositoryType = %q", aws.ToString(got.Code.RepositoryType))
	}
	loc := aws.ToString(got.Code.Location)
	if want := e.srv.URL + "/invokex/v1/functions/hello/code"; loc != want {
		t.Fatalf("Code.Location = %q, want %q", loc, want)
	}
	resp, err := e.srv.Client().Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/zip" || string(body) != string(testZip) {
		t.Errorf("GET Code.Location = %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}

	// GetFunction by full ARN resolves to the same function.
	if _, err := e.sdk.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: out.FunctionArn}); err != nil {
		t.Errorf("GetFunction by ARN: %v", err)
	}
}

func TestCreateFunctionDefaultsAndRole(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.Account = "123456789012"; c.Region = "eu-west-1" })
	out, err := e.sdk.CreateFunction(context.Background(), &lambda.CreateFunctionInput{
		FunctionName: aws.String("plain"), Runtime: types.RuntimeProvidedal2023,
		Role: aws.String(""), Code: &types.FunctionCode{ZipFile: testZip},
	})
	if err != nil {
		t.Fatalf("CreateFunction: %v", err)
	}
	if got := aws.ToString(out.Role); got != "arn:aws:iam::123456789012:role/invokex" {
		t.Errorf("Role = %q", got)
	}
	if got := aws.ToString(out.FunctionArn); got != "arn:aws:lambda:eu-west-1:123456789012:function:plain" {
		t.Errorf("FunctionArn = %q", got)
	}
	if aws.ToInt32(out.Timeout) != 3 || aws.ToInt32(out.MemorySize) != 128 || aws.ToInt32(out.EphemeralStorage.Size) != 512 {
		t.Errorf("defaults = %d/%d/%d", aws.ToInt32(out.Timeout), aws.ToInt32(out.MemorySize), aws.ToInt32(out.EphemeralStorage.Size))
	}
	if out.Environment != nil {
		t.Errorf("Environment = %+v, want omitted", out.Environment)
	}
}

func TestCreateFunctionRefusesWhatInvokeXDoesNotSupport(t *testing.T) {
	e := newEnv(t)
	cases := map[string]*lambda.CreateFunctionInput{
		"S3 code": {FunctionName: aws.String("f"), Role: aws.String("r"),
			Code: &types.FunctionCode{S3Bucket: aws.String("b"), S3Key: aws.String("k")}},
		"image code": {FunctionName: aws.String("f"), Role: aws.String("r"),
			Code: &types.FunctionCode{ImageUri: aws.String("repo/img:1")}},
		"image package": {FunctionName: aws.String("f"), Role: aws.String("r"), PackageType: types.PackageTypeImage,
			Code: &types.FunctionCode{ZipFile: testZip}},
		"no zip":        {FunctionName: aws.String("f"), Role: aws.String("r"), Code: &types.FunctionCode{}},
		"zero timeout":  {FunctionName: aws.String("f"), Role: aws.String("r"), Timeout: aws.Int32(0), Code: &types.FunctionCode{ZipFile: testZip}},
		"arm64":         {FunctionName: aws.String("f"), Role: aws.String("r"), Architectures: []types.Architecture{types.ArchitectureArm64}, Code: &types.FunctionCode{ZipFile: testZip}},
		"layers":        {FunctionName: aws.String("f"), Role: aws.String("r"), Layers: []string{"arn:aws:lambda:us-east-1:1:layer:x:1"}, Code: &types.FunctionCode{ZipFile: testZip}},
		"name too long": {FunctionName: aws.String(strings.Repeat("a", 65)), Role: aws.String("r"), Code: &types.FunctionCode{ZipFile: testZip}},
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := e.sdk.CreateFunction(context.Background(), in)
			var ipv *types.InvalidParameterValueException
			if !errors.As(err, &ipv) {
				t.Fatalf("err = %v, want InvalidParameterValueException", err)
			}
		})
	}
	_, err := e.sdk.CreateFunction(context.Background(), cases["S3 code"])
	if err == nil || !strings.Contains(err.Error(), "not supported by InvokeX: upload the zip with ZipFile") {
		t.Errorf("S3 message = %v", err)
	}
	if n := e.fake.totalCalls(); n != 0 {
		t.Errorf("control plane called %d times, want 0", n)
	}
}

func TestGetFunctionConfiguration(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "cfg", Runtime: "nodejs20.x", Handler: "index.handler"}, testZip)
	out, err := e.sdk.GetFunctionConfiguration(context.Background(), &lambda.GetFunctionConfigurationInput{FunctionName: aws.String("cfg")})
	if err != nil {
		t.Fatalf("GetFunctionConfiguration: %v", err)
	}
	if aws.ToString(out.FunctionName) != "cfg" || out.Runtime != types.RuntimeNodejs20x || aws.ToString(out.Handler) != "index.handler" {
		t.Errorf("out = %+v", out)
	}
	// A version that was never published is not found.
	_, err = e.sdk.GetFunctionConfiguration(context.Background(), &lambda.GetFunctionConfigurationInput{
		FunctionName: aws.String("cfg"), Qualifier: aws.String("3")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) {
		t.Fatalf("qualified err = %v, want ResourceNotFoundException", err)
	}
	if n := e.fake.count("GetFunctionVersion"); n != 2 {
		t.Errorf("GetFunctionVersion called %d times, want 2", n)
	}
	// The qualifier in an ARN must agree with the Qualifier parameter.
	_, err = e.sdk.GetFunctionConfiguration(context.Background(), &lambda.GetFunctionConfigurationInput{
		FunctionName: aws.String("arn:aws:lambda:us-east-1:000000000000:function:cfg:$LATEST"), Qualifier: aws.String("2")})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) {
		t.Errorf("mismatched qualifier err = %v, want InvalidParameterValueException", err)
	}
}

func TestListFunctionsPaginates(t *testing.T) {
	e := newEnv(t)
	want := []string{"a1", "a2", "b1", "b2", "c1"}
	for _, n := range want {
		e.fake.put(&function.Config{Name: n, Runtime: "provided.al2023"}, testZip)
	}
	p := lambda.NewListFunctionsPaginator(e.sdk, &lambda.ListFunctionsInput{MaxItems: aws.Int32(2)})
	var got []string
	pages := 0
	for p.HasMorePages() {
		page, err := p.NextPage(context.Background())
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		pages++
		if len(page.Functions) > 2 {
			t.Errorf("page %d has %d functions", pages, len(page.Functions))
		}
		for _, f := range page.Functions {
			got = append(got, aws.ToString(f.FunctionName))
		}
	}
	if pages != 3 || !reflect.DeepEqual(got, want) {
		t.Errorf("pages = %d, functions = %v; want 3, %v", pages, got, want)
	}

	// MaxItems over 50 is capped, not refused; 0 is refused.
	if _, err := e.sdk.ListFunctions(context.Background(), &lambda.ListFunctionsInput{MaxItems: aws.Int32(500)}); err != nil {
		t.Fatal(err)
	}
	e.fake.locked(func() {
		if e.fake.lastLimit != 50 {
			t.Errorf("limit passed = %d, want 50", e.fake.lastLimit)
		}
	})
	_, err := e.sdk.ListFunctions(context.Background(), &lambda.ListFunctionsInput{MaxItems: aws.Int32(0)})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) {
		t.Errorf("MaxItems 0 err = %v", err)
	}

	// Older SDKs send the path with a trailing slash; the body is the same.
	resp, err := http.Get(e.srv.URL + "/2015-03-31/functions/?MaxItems=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"NextMarker":"a1"`) {
		t.Errorf("GET /functions/ = %d %s", resp.StatusCode, body)
	}
}

func TestUpdateFunctionCode(t *testing.T) {
	e := newEnv(t)
	c := e.fake.put(&function.Config{Name: "up", Runtime: "provided.al2023"}, testZip)
	newZip := []byte("PK\x03\x04 version two")
	out, err := e.sdk.UpdateFunctionCode(context.Background(), &lambda.UpdateFunctionCodeInput{
		FunctionName: aws.String("up"), ZipFile: newZip, RevisionId: aws.String(c.RevisionID),
	})
	if err != nil {
		t.Fatalf("UpdateFunctionCode: %v", err)
	}
	if aws.ToString(out.CodeSha256) != sha(newZip) || aws.ToString(out.RevisionId) == c.RevisionID {
		t.Errorf("out sha/revision = %q/%q", aws.ToString(out.CodeSha256), aws.ToString(out.RevisionId))
	}
	e.fake.locked(func() {
		if e.fake.lastRevision != c.RevisionID || string(e.fake.code["up"]) != string(newZip) {
			t.Errorf("fake got revision %q zip %q", e.fake.lastRevision, e.fake.code["up"])
		}
	})
	// The old revision no longer matches.
	_, err = e.sdk.UpdateFunctionCode(context.Background(), &lambda.UpdateFunctionCodeInput{
		FunctionName: aws.String("up"), ZipFile: newZip, RevisionId: aws.String(c.RevisionID),
	})
	var pf *types.PreconditionFailedException
	if !errors.As(err, &pf) {
		t.Errorf("stale revision err = %v, want PreconditionFailedException", err)
	}
	// S3 code is refused before the control plane is asked.
	before := e.fake.count("UpdateFunctionCode")
	_, err = e.sdk.UpdateFunctionCode(context.Background(), &lambda.UpdateFunctionCodeInput{
		FunctionName: aws.String("up"), S3Bucket: aws.String("b"), S3Key: aws.String("k"),
	})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) || e.fake.count("UpdateFunctionCode") != before {
		t.Errorf("S3 update err = %v, calls %d -> %d", err, before, e.fake.count("UpdateFunctionCode"))
	}
}

func TestUpdateFunctionConfigurationSendsOnlyPresentFields(t *testing.T) {
	e := newEnv(t)
	c := e.fake.put(&function.Config{Name: "conf", Runtime: "provided.al2023", Description: "keep me",
		Environment: map[string]string{"OLD": "1"}}, testZip)
	out, err := e.sdk.UpdateFunctionConfiguration(context.Background(), &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("conf"),
		Timeout:      aws.Int32(30),
		Environment:  &types.Environment{Variables: map[string]string{"NEW": "2"}},
		RevisionId:   aws.String(c.RevisionID),
	})
	if err != nil {
		t.Fatalf("UpdateFunctionConfiguration: %v", err)
	}
	if aws.ToInt32(out.Timeout) != 30 || aws.ToString(out.Description) != "keep me" || out.Environment.Variables["NEW"] != "2" {
		t.Errorf("out = timeout %d description %q env %v", aws.ToInt32(out.Timeout), aws.ToString(out.Description), out.Environment.Variables)
	}
	e.fake.locked(func() {
		u := e.fake.lastUpdate
		if u == nil || u.Timeout == nil || *u.Timeout != 30 || u.Environment == nil || (*u.Environment)["NEW"] != "2" {
			t.Fatalf("update = %+v", u)
		}
		if u.Runtime != nil || u.Handler != nil || u.Role != nil || u.Description != nil || u.MemorySize != nil || u.EphemeralStorage != nil {
			t.Errorf("absent fields were set: %+v", u)
		}
		if e.fake.lastRevision != c.RevisionID {
			t.Errorf("revision = %q", e.fake.lastRevision)
		}
	})

	// An empty Environment clears the variables (present, empty).
	if _, err := e.sdk.UpdateFunctionConfiguration(context.Background(), &lambda.UpdateFunctionConfigurationInput{
		FunctionName: aws.String("conf"), Environment: &types.Environment{},
	}); err != nil {
		t.Fatal(err)
	}
	e.fake.locked(func() {
		u := e.fake.lastUpdate
		if u.Environment == nil || len(*u.Environment) != 0 || u.Timeout != nil {
			t.Errorf("clearing update = %+v", u)
		}
	})
}

func TestDeleteFunction(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "gone"}, testZip)
	_, err := e.sdk.DeleteFunction(context.Background(), &lambda.DeleteFunctionInput{FunctionName: aws.String("gone"), Qualifier: aws.String("7")})
	var nf *types.ResourceNotFoundException
	if !errors.As(err, &nf) || e.fake.count("DeleteFunction") != 0 {
		t.Fatalf("qualified delete err = %v (calls %d)", err, e.fake.count("DeleteFunction"))
	}
	if _, err := e.sdk.DeleteFunction(context.Background(), &lambda.DeleteFunctionInput{FunctionName: aws.String("gone")}); err != nil {
		t.Fatalf("DeleteFunction: %v", err)
	}
	e.fake.locked(func() {
		if _, ok := e.fake.fns["gone"]; ok {
			t.Error("function still stored")
		}
	})
	_, err = e.sdk.DeleteFunction(context.Background(), &lambda.DeleteFunctionInput{FunctionName: aws.String("gone")})
	if !errors.As(err, &nf) {
		t.Errorf("second delete err = %v", err)
	}
	// The status is 204, as Lambda's.
	req, _ := http.NewRequest(http.MethodDelete, e.srv.URL+"/2015-03-31/functions/other", nil)
	e.fake.put(&function.Config{Name: "other"}, testZip)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Errorf("status = %d, want 204", resp.StatusCode)
	}
}

func TestFunctionConcurrency(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "conc"}, testZip)
	ctx := context.Background()
	get := func() *int32 {
		t.Helper()
		out, err := e.sdk.GetFunctionConcurrency(ctx, &lambda.GetFunctionConcurrencyInput{FunctionName: aws.String("conc")})
		if err != nil {
			t.Fatalf("GetFunctionConcurrency: %v", err)
		}
		return out.ReservedConcurrentExecutions
	}
	if v := get(); v != nil {
		t.Errorf("initial = %d, want unset", *v)
	}
	put, err := e.sdk.PutFunctionConcurrency(ctx, &lambda.PutFunctionConcurrencyInput{
		FunctionName: aws.String("conc"), ReservedConcurrentExecutions: aws.Int32(0)})
	if err != nil {
		t.Fatalf("PutFunctionConcurrency: %v", err)
	}
	if put.ReservedConcurrentExecutions == nil || *put.ReservedConcurrentExecutions != 0 {
		t.Errorf("put = %v", put.ReservedConcurrentExecutions)
	}
	if v := get(); v == nil || *v != 0 {
		t.Errorf("after put = %v, want 0", v)
	}
	if _, err := e.sdk.DeleteFunctionConcurrency(ctx, &lambda.DeleteFunctionConcurrencyInput{FunctionName: aws.String("conc")}); err != nil {
		t.Fatalf("DeleteFunctionConcurrency: %v", err)
	}
	if v := get(); v != nil {
		t.Errorf("after delete = %d, want unset", *v)
	}
	_, err = e.sdk.PutFunctionConcurrency(ctx, &lambda.PutFunctionConcurrencyInput{
		FunctionName: aws.String("conc"), ReservedConcurrentExecutions: aws.Int32(-1)})
	var ipv *types.InvalidParameterValueException
	if !errors.As(err, &ipv) {
		t.Errorf("negative err = %v", err)
	}
}
