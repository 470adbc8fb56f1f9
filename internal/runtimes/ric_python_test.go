package runtimes

import (
	"encoding/base64"
	"encoding/json"
	"regexp"
	"strings"
	"testing"
)

// errorDocument is the error JSON both RICs post; node names the stack
// "trace", python "stackTrace", as AWS's runtimes do.
type errorDocument struct {
	ErrorMessage string   `json:"errorMessage"`
	ErrorType    string   `json:"errorType"`
	StackTrace   []string `json:"stackTrace"`
	Trace        []string `json:"trace"`
	RequestID    string   `json:"requestId"`
}

func decodeError(t *testing.T, res fakeResult) errorDocument {
	t.Helper()
	var doc errorDocument
	if err := json.Unmarshal(res.body, &doc); err != nil {
		t.Fatalf("error body %q is not JSON: %v", res.body, err)
	}
	if doc.ErrorType != res.errorType {
		t.Errorf("errorType %q but header Lambda-Runtime-Function-Error-Type %q", doc.ErrorType, res.errorType)
	}
	return doc
}

func decodeJSON(t *testing.T, res fakeResult) map[string]any {
	t.Helper()
	if res.kind != "response" {
		t.Fatalf("got %s %s, want a response; output:\n%s", res.kind, res.body, res.output)
	}
	var m map[string]any
	if err := json.Unmarshal(res.body, &m); err != nil {
		t.Fatalf("response %q is not a JSON object: %v", res.body, err)
	}
	return m
}

const pyContextApp = `
import os
count = 0

def handler(event, context):
    global count
    count += 1
    cc = context.client_context
    return {
        "greeting": "Hello, %s!" % event["name"],
        "count": count,
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory": context.memory_limit_in_mb,
        "arn": context.invoked_function_arn,
        "log_group": context.log_group_name,
        "remaining": context.get_remaining_time_in_millis(),
        "trace": os.environ.get("_X_AMZN_TRACE_ID"),
        "custom": cc.custom if cc else None,
        "app_title": cc.client.app_title if cc and cc.client else None,
        "identity": context.identity.cognito_identity_id,
    }
`

func TestPythonRICContextAndWarmInvocations(t *testing.T) {
	f := startRIC(t, FamilyPython, "app.handler", map[string]string{"app.py": pyContextApp})

	cc := `{"custom":{"k":"v"},"client":{"app_title":"demo"}}`
	variants := []map[string]string{
		{"Lambda-Runtime-Trace-Id": "Root=1-abc", "Lambda-Runtime-Client-Context": cc,
			"Lambda-Runtime-Cognito-Identity": `{"cognitoIdentityId":"id-1"}`},
		{"Lambda-Runtime-Client-Context": base64.StdEncoding.EncodeToString([]byte(cc))},
		nil,
	}
	for i, headers := range variants {
		res := f.invoke(t, `{"name":"x"}`, headers)
		m := decodeJSON(t, res)
		want := map[string]any{
			"greeting":         "Hello, x!",
			"count":            float64(i + 1), // same process: module state survives
			"request_id":       res.id,
			"function_name":    "fn-test",
			"function_version": "$LATEST",
			"memory":           "128",
			"arn":              "arn:aws:lambda:us-east-1:000000000000:function:fn-test",
			"log_group":        "/aws/lambda/fn-test",
		}
		for k, v := range want {
			if m[k] != v {
				t.Errorf("invocation %d: %s = %#v, want %#v", i, k, m[k], v)
			}
		}
		if r, _ := m["remaining"].(float64); r <= 0 {
			t.Errorf("invocation %d: get_remaining_time_in_millis() = %v, want > 0", i, m["remaining"])
		}
		switch i {
		case 0:
			if m["trace"] != "Root=1-abc" || m["identity"] != "id-1" || m["app_title"] != "demo" {
				t.Errorf("invocation 0: trace %v identity %v app_title %v", m["trace"], m["identity"], m["app_title"])
			}
			if c, _ := m["custom"].(map[string]any); c["k"] != "v" {
				t.Errorf("client_context.custom = %v", m["custom"])
			}
		case 1:
			if c, _ := m["custom"].(map[string]any); c["k"] != "v" {
				t.Errorf("base64 client context: custom = %v", m["custom"])
			}
			if m["trace"] != nil {
				t.Errorf("_X_AMZN_TRACE_ID = %v after an invocation without a trace id", m["trace"])
			}
		case 2:
			if m["custom"] != nil {
				t.Errorf("client_context without header = %v", m["custom"])
			}
		}
	}
}

func TestPythonRICOutputBelongsToItsInvocation(t *testing.T) {
	f := startRIC(t, FamilyPython, "app.handler", map[string]string{"app.py": `
import logging, sys
print("init line")

def handler(event, context):
    print("first " + event["n"])
    logging.getLogger().warning("warned %s", event["n"])
    print("second " + event["n"])
    sys.stdout.write("no newline " + event["n"])
    return None
`})
	for _, n := range []string{"a", "b"} {
		res := f.invoke(t, `{"n":"`+n+`"}`, nil)
		if string(res.body) != "null" {
			t.Errorf("None returned %q, want null", res.body)
		}
		out := res.output
		if n == "a" && !strings.HasPrefix(out, "init line\n") {
			t.Errorf("INIT output missing from the first invocation's output: %q", out)
		}
		if n == "b" && strings.Contains(out, "init line") {
			t.Errorf("INIT output repeated: %q", out)
		}
		i1 := strings.Index(out, "first "+n+"\n")
		i2 := strings.Index(out, "second "+n+"\n")
		i3 := strings.Index(out, "no newline "+n)
		if i1 < 0 || i2 < i1 || i3 < i2 {
			t.Errorf("invocation %s: output not complete and in order before the response: %q", n, out)
		}
		logRE := regexp.MustCompile(`(?m)^\[WARNING\]\t\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\t` + regexp.QuoteMeta(res.id) + `\twarned ` + n + `$`)
		if !logRE.MatchString(out) {
			t.Errorf("invocation %s: no Lambda-format log line for request %s in %q", n, res.id, out)
		}
		other := map[string]string{"a": "b", "b": "a"}[n]
		if strings.Contains(out, "first "+other) {
			t.Errorf("invocation %s shows output of invocation %s: %q", n, other, out)
		}
	}
}

func TestPythonRICHandlerException(t *testing.T) {
	f := startRIC(t, FamilyPython, "pkg/mod.handler", map[string]string{"pkg/mod.py": `
class BadInput(Exception):
    pass

def inner(x):
    raise BadInput("bad name: " + x)

def handler(event, context):
    if event.get("ok"):
        return {"ok": True}
    inner(event["name"])
`})
	res := f.invoke(t, `{"name":"zed"}`, nil)
	if res.kind != "error" {
		t.Fatalf("got %s %s, want an error", res.kind, res.body)
	}
	doc := decodeError(t, res)
	if doc.ErrorType != "BadInput" || doc.ErrorMessage != "bad name: zed" || doc.RequestID != res.id {
		t.Errorf("error doc = %+v", doc)
	}
	stack := strings.Join(doc.StackTrace, "")
	if !strings.Contains(stack, "mod.py") || !strings.Contains(stack, "in inner") {
		t.Errorf("stackTrace does not show the user's frames: %q", doc.StackTrace)
	}
	if strings.Contains(stack, "bootstrap.py") {
		t.Errorf("stackTrace shows the runtime's own frames: %q", doc.StackTrace)
	}
	if !strings.Contains(res.output, "[ERROR] BadInput: bad name: zed") {
		t.Errorf("error not logged: %q", res.output)
	}
	// The runtime survives a function error.
	if m := decodeJSON(t, f.invoke(t, `{"ok":true}`, nil)); m["ok"] != true {
		t.Errorf("after an error: %v", m)
	}
}

func TestPythonRICInvocationErrors(t *testing.T) {
	f := startRIC(t, FamilyPython, "app.handler", map[string]string{"app.py": `
def handler(event, context):
    if event == {}:
        return "empty"
    return {1, 2}
`})
	res := f.invoke(t, `{"x":1}`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "Runtime.MarshalError" {
		t.Errorf("unserialisable result: %s %+v", res.kind, doc)
	}
	res = f.invoke(t, `{not json`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "Runtime.UnmarshalError" {
		t.Errorf("bad event: %s %+v", res.kind, doc)
	}
	res = f.invoke(t, ``, nil)
	if res.kind != "response" || string(res.body) != `"empty"` {
		t.Errorf("empty payload: %s %s, want the handler to see {}", res.kind, res.body)
	}
}

func TestPythonRICInitErrors(t *testing.T) {
	cases := []struct {
		name, handler string
		files         map[string]string
		errorType     string
		message       string
	}{
		{"missing module", "missing.handler", map[string]string{"app.py": "def handler(e, c): pass\n"},
			"Runtime.ImportModuleError", "Unable to import module 'missing': No module named 'missing'"},
		{"missing dependency", "app.handler", map[string]string{"app.py": "import notinstalled\n"},
			"Runtime.ImportModuleError", "Unable to import module 'app': No module named 'notinstalled'"},
		{"missing function", "app.nothere", map[string]string{"app.py": "def handler(e, c): pass\n"},
			"Runtime.HandlerNotFound", "Handler 'nothere' missing on module 'app'"},
		{"syntax error", "app.handler", map[string]string{"app.py": "def handler(e, c)\n    pass\n"},
			"Runtime.UserCodeSyntaxError", "Syntax error in module 'app'"},
		{"top level raises", "app.handler", map[string]string{"app.py": "raise KeyError('CONFIG')\n"},
			"KeyError", "'CONFIG'"},
		{"malformed handler", "app", map[string]string{"app.py": ""},
			"Runtime.MalformedHandlerName", "Bad handler 'app'"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := startRIC(t, FamilyPython, tc.handler, tc.files)
			res := f.result(t)
			if res.kind != "init-error" {
				t.Fatalf("got %s %s, want init-error", res.kind, res.body)
			}
			doc := decodeError(t, res)
			if doc.ErrorType != tc.errorType || !strings.Contains(doc.ErrorMessage, tc.message) {
				t.Errorf("init error = %+v, want type %s and message containing %q", doc, tc.errorType, tc.message)
			}
			if !strings.Contains(res.output, "[ERROR] "+tc.errorType) {
				t.Errorf("init error not logged: %q", res.output)
			}
			if code := f.exitCode(t); code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
		})
	}
}

func TestPythonRICDottedModulePath(t *testing.T) {
	f := startRIC(t, FamilyPython, "pkg.sub.mod.handler", map[string]string{
		"pkg/__init__.py":     "",
		"pkg/sub/__init__.py": "",
		"pkg/sub/mod.py":      "def handler(event, context):\n    return __name__\n",
	})
	if res := f.invoke(t, `{}`, nil); string(res.body) != `"pkg.sub.mod"` {
		t.Errorf("got %s %s", res.kind, res.body)
	}
}
