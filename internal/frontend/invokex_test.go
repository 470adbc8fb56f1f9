package frontend

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

func getJSON(t *testing.T, url string, status int, out any) http.Header {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("GET %s = %d %s, want %d", url, resp.StatusCode, b, status)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("GET %s: %v in %s", url, err, b)
		}
	}
	return resp.Header
}

func TestGetInvocationRecord(t *testing.T) {
	e := newEnv(t)
	start := time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)
	e.fake.addRecord(&invocation.Record{
		RequestID: "0f9e8d7c-aaaa-bbbb-cccc-000000000001", Function: "f", RevisionID: "rev-1", Version: "$LATEST",
		Type: invocation.TypeEvent, Status: invocation.StatusFunctionError, ErrorType: "Runtime.ExitError",
		ErrorMessage: "exit status 3", Attempts: 3, Cold: true, Start: start, End: start.Add(1500 * time.Millisecond),
		InitDuration: 45670 * time.Microsecond, Duration: 1234 * time.Microsecond, MaxMemoryMB: 20,
		Log: []byte("START RequestId: x\nhello\n"), LogBytes: 300000,
	})
	var rec map[string]any
	getJSON(t, e.srv.URL+"/invokex/v1/invocations/0f9e8d7c-aaaa-bbbb-cccc-000000000001", 200, &rec)
	want := map[string]any{
		"RequestId": "0f9e8d7c-aaaa-bbbb-cccc-000000000001", "Function": "f", "RevisionId": "rev-1",
		"Version": "$LATEST", "Type": "Event", "Status": "FunctionError", "ErrorType": "Runtime.ExitError",
		"ErrorMessage": "exit status 3", "Attempts": 3.0, "Cold": true,
		"Start": "2026-01-02T03:04:05.123456789Z", "End": "2026-01-02T03:04:06.623456789Z",
		"InitDurationMs": 45.67, "DurationMs": 1.234, "MaxMemoryUsedMB": 20.0, "LogBytes": 300000.0,
		"Log": "START RequestId: x\nhello\n",
	}
	for k, v := range want {
		if rec[k] != v {
			t.Errorf("%s = %v (%T), want %v", k, rec[k], rec[k], v)
		}
	}

	// A queued invocation has no End yet: it is left out, not year 1.
	e.fake.addRecord(&invocation.Record{RequestID: "q", Function: "f", Type: invocation.TypeEvent, Status: invocation.StatusQueued, Start: start})
	rec = nil
	getJSON(t, e.srv.URL+"/invokex/v1/invocations/q", 200, &rec)
	if _, ok := rec["End"]; ok {
		t.Errorf("End = %v for a queued invocation", rec["End"])
	}

	var errBody struct{ Type, Message string }
	h := getJSON(t, e.srv.URL+"/invokex/v1/invocations/missing", 404, &errBody)
	if h.Get("X-Amzn-ErrorType") != "ResourceNotFoundException" || errBody.Type != "User" {
		t.Errorf("missing: %q %+v", h.Get("X-Amzn-ErrorType"), errBody)
	}
	calls := e.fake.count("GetInvocation")
	h = getJSON(t, e.srv.URL+"/invokex/v1/invocations/a.b", 400, nil)
	if h.Get("X-Amzn-ErrorType") != "InvalidParameterValueException" || e.fake.count("GetInvocation") != calls {
		t.Errorf("bad id: %q, calls %d -> %d", h.Get("X-Amzn-ErrorType"), calls, e.fake.count("GetInvocation"))
	}
}

func TestListInvocations(t *testing.T) {
	e := newEnv(t)
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < 5; i++ {
		id := fmt.Sprintf("req-%d", i)
		e.fake.addRecord(&invocation.Record{RequestID: id, Function: "f", Status: invocation.StatusSucceeded, Start: base.Add(time.Duration(i) * time.Minute)})
	}
	e.fake.addRecord(&invocation.Record{RequestID: "other", Function: "g", Start: base})
	var out struct {
		Invocations []struct{ RequestId, Function string }
	}
	getJSON(t, e.srv.URL+"/invokex/v1/functions/f/invocations?limit=3", 200, &out)
	if len(out.Invocations) != 3 || out.Invocations[0].RequestId != "req-4" || out.Invocations[2].RequestId != "req-2" {
		t.Errorf("invocations = %+v", out.Invocations)
	}
	getJSON(t, e.srv.URL+"/invokex/v1/functions/f/invocations", 200, &out)
	e.fake.locked(func() {
		if e.fake.lastLimit != defaultInvocationsLimit {
			t.Errorf("default limit passed = %d", e.fake.lastLimit)
		}
	})
	// An empty list is [], not null.
	resp, err := http.Get(e.srv.URL + "/invokex/v1/functions/nobody/invocations")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.TrimSpace(string(b)) != `{"Invocations":[]}` {
		t.Errorf("empty list = %s", b)
	}
	calls := e.fake.count("ListInvocations")
	for _, q := range []string{"limit=0", "limit=abc", "limit=100000"} {
		getJSON(t, e.srv.URL+"/invokex/v1/functions/f/invocations?"+q, 400, nil)
	}
	getJSON(t, e.srv.URL+"/invokex/v1/functions/..%2Fx/invocations", 400, nil)
	if e.fake.count("ListInvocations") != calls {
		t.Error("invalid requests reached the control plane")
	}
}

func TestGetFunctionCode(t *testing.T) {
	e := newEnv(t)
	e.fake.put(&function.Config{Name: "zipped"}, testZip)
	resp, err := http.Get(e.srv.URL + "/invokex/v1/functions/zipped/code")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/zip" || string(b) != string(testZip) {
		t.Errorf("code = %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	if cd := resp.Header.Get("Content-Disposition"); cd != `attachment; filename="zipped.zip"` {
		t.Errorf("Content-Disposition = %q", cd)
	}
	getJSON(t, e.srv.URL+"/invokex/v1/functions/nothere/code", 404, nil)
}

func TestListRuntimesAndHealth(t *testing.T) {
	e := newEnv(t)
	rts := []*runtimes.Runtime{
		{ID: "provided.al2023", Family: runtimes.FamilyProvided, Available: true, HandlerFormat: "bootstrap"},
		{ID: "python3.12", Family: runtimes.FamilyPython, Available: false, Reason: "python3.12 not found", HandlerFormat: "file.function", Interpreter: "/usr/bin/python3.12"},
	}
	e.fake.locked(func() { e.fake.runtimes = rts })
	var out struct {
		Runtimes []map[string]any
	}
	getJSON(t, e.srv.URL+"/invokex/v1/runtimes", 200, &out)
	if len(out.Runtimes) != 2 {
		t.Fatalf("runtimes = %+v", out.Runtimes)
	}
	py := out.Runtimes[1]
	if py["Id"] != "python3.12" || py["Family"] != "python" || py["Available"] != false || py["Reason"] != "python3.12 not found" || py["HandlerFormat"] != "file.function" {
		t.Errorf("python = %v", py)
	}
	if _, ok := py["Interpreter"]; ok {
		t.Error("host paths leaked into the runtimes list")
	}

	resp, err := http.Get(e.srv.URL + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok" {
		t.Errorf("healthz = %d %q", resp.StatusCode, b)
	}
}

func TestMetricsAndRequestLog(t *testing.T) {
	e := newEnv(t)
	getJSON(t, e.srv.URL+"/invokex/v1/runtimes", 200, nil)
	getJSON(t, e.srv.URL+"/2015-03-31/functions/missing", 404, nil)
	resp, err := http.Get(e.srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`invokex_frontend_requests_total{operation="ListRuntimes",status="200"} 1`,
		`invokex_frontend_requests_total{operation="GetFunction",status="404"} 1`,
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("metrics lack %s:\n%s", want, b)
		}
	}
	log := e.log.String()
	if !strings.Contains(log, "level=DEBUG msg=request method=GET path=/invokex/v1/runtimes status=200") {
		t.Errorf("no debug line for the success:\n%s", log)
	}
	if !strings.Contains(log, "level=INFO msg=request method=GET path=/2015-03-31/functions/missing status=404") {
		t.Errorf("no info line for the error:\n%s", log)
	}
	for _, k := range []string{"request_id=", "duration_ms="} {
		if !strings.Contains(log, k) {
			t.Errorf("log lacks %s", k)
		}
	}

	// Without a registry there is no /metrics route.
	e2 := newEnv(t, func(c *Config) { c.Metrics = nil })
	getJSON(t, e2.srv.URL+"/metrics", 404, nil)
}
