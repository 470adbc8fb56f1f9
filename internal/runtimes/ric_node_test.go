package runtimes

import (
	"regexp"
	"strings"
	"testing"
)

const nodeContextBody = `
let count = 0;
function describe(event, context) {
  count++;
  return {
    greeting: "Hello, " + event.name + "!",
    count,
    requestId: context.awsRequestId,
    functionName: context.functionName,
    functionVersion: context.functionVersion,
    memory: context.memoryLimitInMB,
    arn: context.invokedFunctionArn,
    logGroup: context.logGroupName,
    logStream: context.logStreamName,
    remaining: context.getRemainingTimeInMillis(),
    waits: context.callbackWaitsForEmptyEventLoop,
    custom: context.clientContext ? context.clientContext.custom : null,
    identity: context.identity ? context.identity.cognitoIdentityId : null,
    trace: process.env._X_AMZN_TRACE_ID ?? null,
  };
}
`

// checkNodeContext asserts what describe (above) returned for the i-th
// invocation of one process.
func checkNodeContext(t *testing.T, res fakeResult, i int) {
	t.Helper()
	m := decodeJSON(t, res)
	want := map[string]any{
		"greeting":        "Hello, x!",
		"count":           float64(i + 1),
		"requestId":       res.id,
		"functionName":    "fn-test",
		"functionVersion": "$LATEST",
		"memory":          "128",
		"arn":             "arn:aws:lambda:us-east-1:000000000000:function:fn-test",
		"logGroup":        "/aws/lambda/fn-test",
		"waits":           true,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("invocation %d: %s = %#v, want %#v", i, k, m[k], v)
		}
	}
	if r, _ := m["remaining"].(float64); r <= 0 {
		t.Errorf("invocation %d: getRemainingTimeInMillis() = %v, want > 0", i, m["remaining"])
	}
}

func TestNodeRICHandlerStyles(t *testing.T) {
	cases := []struct {
		name, handler string
		files         map[string]string
	}{
		{"commonjs async", "index.handler", map[string]string{
			"index.js": nodeContextBody + "exports.handler = async (event, context) => describe(event, context);\n"}},
		{"esm mjs", "index.handler", map[string]string{
			"index.mjs": nodeContextBody + "export const handler = async (event, context) => describe(event, context);\n"}},
		{"esm js with type module", "lib/app.handler", map[string]string{
			"package.json": `{"type":"module"}`,
			"lib/app.js":   nodeContextBody + "await Promise.resolve();\nexport async function handler(event, context) { return describe(event, context); }\n"}},
		{"cjs extension", "h.handler", map[string]string{
			"h.cjs": nodeContextBody + "module.exports.handler = (event, context) => Promise.resolve(describe(event, context));\n"}},
		{"callback", "index.handler", map[string]string{
			"index.js": nodeContextBody + "exports.handler = (event, context, callback) => { setTimeout(() => callback(null, describe(event, context)), 1); };\n"}},
		{"nested export", "index.api.handler", map[string]string{
			"index.js": nodeContextBody + "exports.api = { handler: async (event, context) => describe(event, context) };\n"}},
		{"sync return", "index.handler", map[string]string{
			"index.js": nodeContextBody + "exports.handler = (event, context) => describe(event, context);\n"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := startRIC(t, FamilyNode, tc.handler, tc.files)
			for i := range 2 {
				checkNodeContext(t, f.invoke(t, `{"name":"x"}`, nil), i)
			}
		})
	}
}

func TestNodeRICInvocationHeaders(t *testing.T) {
	f := startRIC(t, FamilyNode, "index.handler", map[string]string{
		"index.mjs": nodeContextBody + "export const handler = async (event, context) => describe(event, context);\n"})
	m := decodeJSON(t, f.invoke(t, `{"name":"x"}`, map[string]string{
		"Lambda-Runtime-Trace-Id":         "Root=1-abc",
		"Lambda-Runtime-Client-Context":   `{"custom":{"k":"v"}}`,
		"Lambda-Runtime-Cognito-Identity": `{"cognitoIdentityId":"id-1"}`,
	}))
	if c, _ := m["custom"].(map[string]any); c["k"] != "v" || m["identity"] != "id-1" || m["trace"] != "Root=1-abc" {
		t.Errorf("custom %v identity %v trace %v", m["custom"], m["identity"], m["trace"])
	}
	m = decodeJSON(t, f.invoke(t, `{"name":"x"}`, nil))
	if m["custom"] != nil || m["trace"] != nil {
		t.Errorf("second invocation without headers: custom %v trace %v", m["custom"], m["trace"])
	}
}

func TestNodeRICFunctionErrors(t *testing.T) {
	f := startRIC(t, FamilyNode, "index.handler", map[string]string{"index.js": `
class BadInput extends Error { constructor(m) { super(m); this.name = "BadInput"; } }
function inner(name) { throw new BadInput("bad name: " + name); }
exports.handler = async (event) => {
  switch (event.mode) {
    case "throw": inner(event.name); break;
    case "reject": return Promise.reject(new TypeError("rejected " + event.name));
    case "callback": return new Promise(() => {}); // unused
    case "string": throw "plain string";
    case "circular": { const o = {}; o.self = o; return o; }
    default: return { ok: true };
  }
};
`})
	res := f.invoke(t, `{"mode":"throw","name":"zed"}`, nil)
	doc := decodeError(t, res)
	if res.kind != "error" || doc.ErrorType != "BadInput" || doc.ErrorMessage != "bad name: zed" {
		t.Errorf("thrown error: %s %+v", res.kind, doc)
	}
	if len(doc.Trace) < 2 || doc.Trace[0] != "BadInput: bad name: zed" || !strings.Contains(strings.Join(doc.Trace, "\n"), "at inner") {
		t.Errorf("trace = %q", doc.Trace)
	}
	if !regexp.MustCompile(`\t` + regexp.QuoteMeta(res.id) + `\tERROR\tInvoke Error \t\{"errorType":"BadInput"`).MatchString(res.output) {
		t.Errorf("error not logged: %q", res.output)
	}

	res = f.invoke(t, `{"mode":"reject","name":"zed"}`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "TypeError" || doc.ErrorMessage != "rejected zed" {
		t.Errorf("rejected promise: %s %+v", res.kind, doc)
	}
	res = f.invoke(t, `{"mode":"string"}`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "string" || doc.ErrorMessage != "plain string" {
		t.Errorf("thrown string: %s %+v", res.kind, doc)
	}
	res = f.invoke(t, `{"mode":"circular"}`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "Runtime.MarshalError" {
		t.Errorf("circular result: %s %+v", res.kind, doc)
	}
	res = f.invoke(t, `{not json`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "Runtime.UnmarshalError" {
		t.Errorf("bad event: %s %+v", res.kind, doc)
	}
	// Still warm after all of that.
	if m := decodeJSON(t, f.invoke(t, `{}`, nil)); m["ok"] != true {
		t.Errorf("after errors: %v", m)
	}
}

func TestNodeRICCallbackError(t *testing.T) {
	f := startRIC(t, FamilyNode, "index.handler", map[string]string{"index.js": `
exports.handler = (event, context, callback) => {
  if (event.fail) callback(new RangeError("cb boom"));
  else context.succeed({ legacy: true });
};
`})
	res := f.invoke(t, `{"fail":true}`, nil)
	if doc := decodeError(t, res); res.kind != "error" || doc.ErrorType != "RangeError" || doc.ErrorMessage != "cb boom" {
		t.Errorf("callback error: %s %+v", res.kind, doc)
	}
	if m := decodeJSON(t, f.invoke(t, `{}`, nil)); m["legacy"] != true {
		t.Errorf("context.succeed: %v", m)
	}
}

func TestNodeRICCrashDuringInvocation(t *testing.T) {
	cases := []struct {
		name, code, errorType, message string
		exit                           int
	}{
		{"uncaught exception",
			`exports.handler = () => { setTimeout(() => { throw new Error("async boom"); }, 1); return new Promise(() => {}); };`,
			"Error", "async boom", 129},
		{"unhandled rejection",
			`exports.handler = () => { Promise.reject(new Error("stray")); return new Promise(() => {}); };`,
			"Runtime.UnhandledPromiseRejection", "Error: stray", 128},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := startRIC(t, FamilyNode, "index.handler", map[string]string{"index.js": tc.code})
			res := f.invoke(t, `{}`, nil)
			doc := decodeError(t, res)
			if res.kind != "error" || doc.ErrorType != tc.errorType || doc.ErrorMessage != tc.message {
				t.Errorf("got %s %+v, want %s %q", res.kind, doc, tc.errorType, tc.message)
			}
			if code := f.exitCode(t); code != tc.exit {
				t.Errorf("exit code %d, want %d", code, tc.exit)
			}
		})
	}
}

func TestNodeRICInitErrors(t *testing.T) {
	cases := []struct {
		name, handler string
		files         map[string]string
		errorType     string
		message       string
	}{
		{"missing module", "nothere.handler", map[string]string{"index.js": "exports.handler = async () => 1;"},
			"Runtime.ImportModuleError", "Cannot find module 'nothere'"},
		{"missing dependency", "index.handler", map[string]string{"index.mjs": "import x from 'not-installed';\nexport const handler = async () => x;"},
			"Runtime.ImportModuleError", "not-installed"},
		{"missing export", "index.handler", map[string]string{"index.js": "exports.other = async () => 1;"},
			"Runtime.HandlerNotFound", "index.handler is undefined or not exported"},
		{"export not a function", "index.handler", map[string]string{"index.mjs": "export const handler = 42;"},
			"Runtime.HandlerNotFound", "index.handler is not a function"},
		{"syntax error cjs", "index.handler", map[string]string{"index.js": "exports.handler = async () => {;"},
			"Runtime.UserCodeSyntaxError", "SyntaxError: "},
		{"syntax error esm", "index.handler", map[string]string{"index.mjs": "export const handler = ) => 1;"},
			"Runtime.UserCodeSyntaxError", "SyntaxError: "},
		{"top level throws", "index.handler", map[string]string{"index.mjs": "throw new RangeError('no config');"},
			"RangeError", "no config"},
		{"malformed handler", "index", map[string]string{"index.js": ""},
			"Runtime.MalformedHandlerName", "Bad handler index"},
		{"parent path", "../etc/index.handler", map[string]string{"index.js": ""},
			"Runtime.MalformedHandlerName", "'..' is not allowed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := startRIC(t, FamilyNode, tc.handler, tc.files)
			res := f.result(t)
			if res.kind != "init-error" {
				t.Fatalf("got %s %s, want init-error", res.kind, res.body)
			}
			doc := decodeError(t, res)
			if doc.ErrorType != tc.errorType || !strings.Contains(doc.ErrorMessage, tc.message) {
				t.Errorf("init error = %+v, want type %s and message containing %q", doc, tc.errorType, tc.message)
			}
			if !regexp.MustCompile(`\tundefined\tERROR\tUncaught Exception \t\{"errorType":"` + regexp.QuoteMeta(tc.errorType) + `"`).MatchString(res.output) {
				t.Errorf("init error not logged: %q", res.output)
			}
			if code := f.exitCode(t); code != 1 {
				t.Errorf("exit code %d, want 1", code)
			}
		})
	}
}

func TestNodeRICLogFormatAndFlush(t *testing.T) {
	f := startRIC(t, FamilyNode, "index.handler", map[string]string{"index.mjs": `
console.log("init", 1);
export const handler = async (event) => {
  console.log("hello %d", 42, { a: 1 });
  console.warn("careful");
  console.error("bad");
  console.info("multi\nline");
  // Far more than a pipe holds: node writes it asynchronously, and all of
  // it must be out before the response.
  process.stdout.write("x".repeat(event.big) + "END-" + event.tag + "\n");
  return "done";
};
`})
	stamp := `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z`
	for _, tag := range []string{"one", "two"} {
		res := f.invoke(t, `{"big":300000,"tag":"`+tag+`"}`, nil)
		if res.kind != "response" || string(res.body) != `"done"` {
			t.Fatalf("got %s %s", res.kind, res.body)
		}
		out := res.output
		id := regexp.QuoteMeta(res.id)
		for _, re := range []string{
			`(?m)^` + stamp + `\t` + id + `\tINFO\thello 42 \{ a: 1 \}$`,
			`(?m)^` + stamp + `\t` + id + `\tWARN\tcareful$`,
			`(?m)^` + stamp + `\t` + id + `\tERROR\tbad$`,
			`(?m)^` + stamp + `\t` + id + `\tINFO\tmulti\nline$`,
		} {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("invocation %s: output lacks %q (output has %d bytes, ends %q)", tag, re, len(out), out[max(0, len(out)-80):])
			}
		}
		if !strings.Contains(out, "\n"+strings.Repeat("x", 300000)+"END-"+tag+"\n") {
			t.Errorf("invocation %s: the large write is not all out before the response (output has %d bytes)", tag, len(out))
		}
		init := regexp.MustCompile(`(?m)^` + stamp + `\tundefined\tINFO\tinit 1$`)
		if got := init.MatchString(out); got != (tag == "one") {
			t.Errorf("invocation %s: INIT log line present = %v", tag, got)
		}
	}
}
