package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

func TestColdStartEchoAndWarmInvoke(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	done, body := ta.init(fakeInit(t, ""))
	if done.Error != nil {
		t.Fatalf("init failed: %+v\n%s", done.Error, body)
	}
	if done.InitDuration <= 0 {
		t.Errorf("InitDuration = %v, want > 0", done.InitDuration)
	}

	r := ta.invoke(action{Do: "echo", N: 42})
	mustSucceed(t, r)
	if got := decodeJSON[action](t, r.payload); got != (action{Do: "echo", N: 42}) {
		t.Errorf("echo payload = %+v", got)
	}
	if r.InitDuration != done.InitDuration {
		t.Errorf("first Result InitDuration = %v, want the Init's %v", r.InitDuration, done.InitDuration)
	}
	if r.Reset {
		t.Error("Reset set on a successful invocation")
	}
	if r.MaxMemoryMB < 1 {
		t.Errorf("MaxMemoryMB = %d", r.MaxMemoryMB)
	}
	if r.LogBytes != int64(len(r.log)) {
		t.Errorf("LogBytes = %d, log is %d bytes and nothing was dropped", r.LogBytes, len(r.log))
	}
	// INIT output comes first, then START ... END, REPORT with Init Duration.
	start := fmt.Sprintf("START RequestId: %s Version: $LATEST\n", r.RequestID)
	iInit, iStart := strings.Index(r.log, "fake-init-stdout"), strings.Index(r.log, start)
	if iInit < 0 || iStart < 0 || iInit > iStart || !strings.Contains(r.log, "fake-init-stderr") {
		t.Errorf("INIT output not before START:\n%s", r.log)
	}
	report := regexp.MustCompile(`(?m)^END RequestId: ` + regexp.QuoteMeta(r.RequestID) + `\nREPORT RequestId: ` +
		regexp.QuoteMeta(r.RequestID) + `\tDuration: \d+\.\d\d ms\tBilled Duration: \d+ ms\tMemory Size: 128 MB\tMax Memory Used: ` +
		strconv.Itoa(r.MaxMemoryMB) + ` MB\tInit Duration: \d+\.\d\d ms\n\z`)
	if !report.MatchString(r.log) {
		t.Errorf("log does not end with END and REPORT (with Init Duration):\n%q", r.log)
	}

	// Warm: no INIT, no Init Duration; headers and environment as Lambda's.
	r = ta.invoke(action{Do: "headers"})
	mustSucceed(t, r)
	if r.InitDuration != 0 || strings.Contains(r.log, "Init Duration") {
		t.Errorf("warm invocation reports INIT: %v\n%s", r.InitDuration, r.log)
	}
	if strings.Contains(r.log, "fake-init-stdout") {
		t.Errorf("INIT output repeated in a later invocation:\n%s", r.log)
	}
	h := decodeJSON[map[string]string](t, r.payload)
	if h["arn"] != "arn:aws:lambda:us-east-1:123456789012:function:fake" {
		t.Errorf("function ARN header = %q", h["arn"])
	}
	if h["deadline"] == "" || h["api"] == "203.0.113.1:1" || !strings.HasPrefix(h["api"], "127.0.0.1:") {
		t.Errorf("deadline %q / AWS_LAMBDA_RUNTIME_API %q", h["deadline"], h["api"])
	}
	if h["user"] != "hello" || h["stdinNull"] != "true" || h["wd"] == "" {
		t.Errorf("runtime env/cwd/stdin: %v", h)
	}

	// Optional headers are passed through when set.
	id := ta.nextID()
	ta.send(protocol.TypeInvoke, protocol.Invoke{
		RequestID: id, DeadlineUnixMs: time.Now().Add(20 * time.Second).UnixMilli(),
		FunctionARN: "arn:aws:lambda:us-east-1:123456789012:function:fake:prod", TraceID: "Root=1-abc",
		ClientContext: `{"custom":{}}`, CognitoIdentity: `{"cognitoIdentityId":"x"}`,
	}, []byte(`{"do":"headers"}`))
	r = ta.readResult()
	mustSucceed(t, r)
	h = decodeJSON[map[string]string](t, r.payload)
	if h["arn"] != "arn:aws:lambda:us-east-1:123456789012:function:fake:prod" || h["trace"] != "Root=1-abc" ||
		h["context"] != `{"custom":{}}` || h["cognito"] != `{"cognitoIdentityId":"x"}` {
		t.Errorf("headers = %v", h)
	}
}

func TestFunctionError(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]

	r := ta.invoke(action{Do: "error"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "BoomError" || r.Reset {
		t.Fatalf("result = %+v", r.Result)
	}
	if want := `{"errorMessage":"boom","errorType":"BoomError","stackTrace":["at x"]}`; string(r.payload) != want {
		t.Errorf("payload = %s, want the posted body %s", r.payload, want)
	}
	// A handled error keeps the environment warm: same runtime process.
	r = ta.invoke(action{Do: "pid"})
	mustSucceed(t, r)
	if got := decodeJSON[map[string]int](t, r.payload)["pid"]; got != pid || r.InitDuration != 0 {
		t.Errorf("after a function error: pid %d (was %d), InitDuration %v", got, pid, r.InitDuration)
	}
}

func TestTimeoutKillsRuntimeAndNextInvokeReinits(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	cfg := fakeInit(t, "")
	cfg.TimeoutSec = 1
	if d, body := ta.init(cfg); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]

	id := ta.nextID()
	ta.sendInvoke(id, action{Do: "sleep"}, time.Second)
	r := ta.readResult()
	if r.RequestID != id || r.FunctionError != "Unhandled" || r.ErrorType != "Sandbox.Timedout" || !r.Reset {
		t.Fatalf("result = %+v", r.Result)
	}
	msg := decodeJSON[protocol.ErrorInfo](t, r.payload).ErrorMessage
	re := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ` + regexp.QuoteMeta(id) + ` Task timed out after 1\.00 seconds$`)
	if !re.MatchString(msg) {
		t.Errorf("timeout message = %q", msg)
	}
	if !strings.Contains(between(r.log, "START RequestId: "+id, "END RequestId: "+id), "sleeping") ||
		!strings.Contains(r.log, msg+"\n") || !strings.Contains(r.log, "REPORT RequestId: "+id) {
		t.Errorf("timeout log:\n%s", r.log)
	}
	if !processGone(pid) {
		t.Errorf("runtime pid %d still exists after the timeout", pid)
	}

	r = ta.invoke(action{Do: "pid"})
	mustSucceed(t, r)
	if r.InitDuration <= 0 || !strings.Contains(r.log, "Init Duration") || !strings.Contains(r.log, "fake-init-stdout") {
		t.Errorf("re-INIT not reported: %v\n%s", r.InitDuration, r.log)
	}
	if got := decodeJSON[map[string]int](t, r.payload)["pid"]; got == pid {
		t.Errorf("same runtime pid %d after a timeout", got)
	}
}

func TestCrashThenNextInvokeWorks(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	r := ta.invoke(action{Do: "exit"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "Runtime.ExitError" || !r.Reset {
		t.Fatalf("result = %+v", r.Result)
	}
	ei := decodeJSON[protocol.ErrorInfo](t, r.payload)
	want := protocol.ErrorInfo{ErrorType: "Runtime.ExitError", ErrorMessage: "RequestId: " + r.RequestID + " Error: Runtime exited with error: exit status 3"}
	if ei.ErrorType != want.ErrorType || ei.ErrorMessage != want.ErrorMessage {
		t.Errorf("payload = %s", r.payload)
	}
	if !strings.Contains(between(r.log, "START", "END"), "about to exit") {
		t.Errorf("crash output missing from the invocation log:\n%s", r.log)
	}
	r = ta.invoke(action{Do: "echo"})
	mustSucceed(t, r)
	if r.InitDuration <= 0 {
		t.Errorf("InitDuration = %v after a crash", r.InitDuration)
	}
}

// A runtime that exits right after responding is reset; the next Invoke
// succeeds whether it races with noticing the exit or not.
func TestRuntimeExitBetweenInvocations(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	for i := 0; i < 5; i++ {
		r := ta.invoke(action{Do: "respond-exit"})
		mustSucceed(t, r)
		if i > 0 && r.InitDuration <= 0 {
			t.Errorf("invocation %d after the runtime exited: InitDuration %v", i, r.InitDuration)
		}
	}
}

// TestHugeOutputIsCapped is not parallel: it measures the agent's
// allocations while the runtime prints 50 MB.
func TestHugeOutputIsCapped(t *testing.T) {
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	ta.invoke(action{Do: "echo"}) // INIT output and first-invocation allocations out of the way

	const size = 50 << 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	r := ta.invoke(action{Do: "spam", N: size})
	runtime.ReadMemStats(&after)
	mustSucceed(t, r)
	if r.LogBytes < size {
		t.Errorf("LogBytes = %d, want >= %d", r.LogBytes, size)
	}
	if len(r.log) > defaultLogLimit+1024 {
		t.Errorf("log is %d bytes, over the %d limit", len(r.log), defaultLogLimit)
	}
	body := between(r.log, "START RequestId: "+r.RequestID+" Version: $LATEST\n", "END RequestId: "+r.RequestID)
	if !strings.HasPrefix(body, "spam-line-") || !strings.HasSuffix(body, "spam-end\n") {
		t.Errorf("head or tail of the output not kept: %.80q ... %.80q", body, body[max(0, len(body)-80):])
	}
	if !regexp.MustCompile(`\[\d+ bytes of output dropped: log limit reached\]`).MatchString(body) {
		t.Error("no marker for the dropped output")
	}
	if !strings.Contains(r.log, "REPORT RequestId: "+r.RequestID) {
		t.Error("REPORT line dropped")
	}
	// The output went through the agent, not into its heap.
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 24<<20 {
		t.Errorf("agent allocated %d MB while the runtime printed 50 MB", grew>>20)
	}
}

func TestOutputAttributedToItsInvocation(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	var prev string
	for i := 0; i < 30; i++ {
		r := ta.invoke(action{Do: "print"})
		mustSucceed(t, r)
		id := r.RequestID
		inner := between(r.log, "START RequestId: "+id, "END RequestId: "+id)
		if !strings.Contains(inner, "out-"+id+"\n") || !strings.Contains(inner, "err-"+id+"\n") {
			t.Fatalf("invocation %d: its output is not in its log:\n%s", i, r.log)
		}
		if prev != "" && strings.Contains(r.log, "-"+prev+"\n") {
			t.Fatalf("invocation %d: output of %s leaked into it:\n%s", i, prev, r.log)
		}
		prev = id
	}
}

func TestOversizeResponse(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	r := ta.invoke(action{Do: "big"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "Function.ResponseSizeTooLarge" || !r.Reset {
		t.Fatalf("result = %+v", r.Result)
	}
	ei := decodeJSON[protocol.ErrorInfo](t, r.payload)
	if ei.ErrorType != "Function.ResponseSizeTooLarge" ||
		ei.ErrorMessage != "Response payload size exceeded maximum allowed payload size (6291556 bytes)." {
		t.Errorf("payload = %s", r.payload)
	}
	r = ta.invoke(action{Do: "echo"})
	mustSucceed(t, r)
	if r.InitDuration <= 0 {
		t.Error("no re-INIT after an oversize response")
	}
}

func TestInitErrorPosted(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	d, body := ta.init(fakeInit(t, "fail"))
	if d.Error == nil || d.Error.ErrorType != "Custom.InitBroke" || d.Error.ErrorMessage != "init broke" {
		t.Fatalf("InitDone = %+v", d)
	}
	if !strings.Contains(body, "fake-init-stdout") || !strings.Contains(body, "fake-init-stderr") {
		t.Errorf("InitDone body lacks the INIT log: %q", body)
	}
	// The next Invoke runs INIT again, which fails again.
	r := ta.invoke(action{Do: "echo"})
	if r.FunctionError != "Unhandled" || r.ErrorType != "Custom.InitBroke" || !r.Reset || r.InitDuration <= 0 {
		t.Fatalf("result = %+v", r.Result)
	}
	if string(r.payload) != `{"errorMessage":"init broke","errorType":"Custom.InitBroke"}` {
		t.Errorf("payload = %s", r.payload)
	}
	if strings.Count(r.log, "fake-init-stdout") != 1 || !strings.Contains(r.log, "START RequestId: "+r.RequestID) ||
		!strings.Contains(r.log, "Init Duration") {
		t.Errorf("log:\n%s", r.log)
	}
}

func TestInitFailures(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, mode string
		edit       func(*protocol.Init)
		errorType  string
		message    string
	}{
		{"exit", "exit", nil, "Runtime.ExitError", "Error: Runtime exited with error: exit status 2"},
		{"timeout", "hang", func(c *protocol.Init) { c.InitTimeoutMs = 300 }, "Sandbox.Timedout", "INIT timed out after 0.30 seconds"},
		{"entrypoint", "", func(c *protocol.Init) { c.Command = []string{"/nonexistent/bootstrap"} }, "Runtime.InvalidEntrypoint", "no such file or directory"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ta := startAgent(t)
			cfg := fakeInit(t, tc.mode)
			if tc.edit != nil {
				tc.edit(&cfg)
			}
			d, _ := ta.init(cfg)
			if d.Error == nil || d.Error.ErrorType != tc.errorType || !strings.Contains(d.Error.ErrorMessage, tc.message) {
				t.Fatalf("InitDone = %+v", d.Error)
			}
			r := ta.invoke(action{Do: "echo"})
			if r.FunctionError != "Unhandled" || r.ErrorType != tc.errorType || !r.Reset {
				t.Fatalf("result = %+v", r.Result)
			}
			if ei := decodeJSON[protocol.ErrorInfo](t, r.payload); tc.name == "exit" &&
				ei.ErrorMessage != "RequestId: "+r.RequestID+" Error: Runtime exited with error: exit status 2" {
				t.Errorf("payload = %s", r.payload)
			}
		})
	}
}

func TestShutdownKillsRuntime(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]
	ta.send(protocol.TypeShutdown, protocol.Shutdown{})
	if f := ta.read(); f.Type != protocol.TypeShutdownDone {
		t.Fatalf("got %s, want ShutdownDone", f.Type)
	}
	if err := ta.wait(); err != nil {
		t.Errorf("Run = %v after Shutdown", err)
	}
	if !processGone(pid) {
		t.Errorf("runtime pid %d survived Shutdown", pid)
	}
}

func TestShutdownDuringInvocation(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]
	ta.sendInvoke(ta.nextID(), action{Do: "sleep"}, 30*time.Second)
	ta.send(protocol.TypeShutdown, protocol.Shutdown{})
	if f := ta.read(); f.Type != protocol.TypeShutdownDone {
		t.Fatalf("got %s, want ShutdownDone", f.Type)
	}
	if err := ta.wait(); err != nil {
		t.Errorf("Run = %v", err)
	}
	if !processGone(pid) {
		t.Errorf("runtime pid %d survived Shutdown", pid)
	}
}

func TestConnCloseKillsRuntime(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]
	ta.raw.Close()
	if err := ta.wait(); err != nil {
		t.Errorf("Run = %v after the harness closed the stream", err)
	}
	if !processGone(pid) {
		t.Errorf("runtime pid %d survived the closed stream", pid)
	}
}

func TestContextCancelKillsRuntime(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]
	ta.sendInvoke(ta.nextID(), action{Do: "sleep"}, 30*time.Second)
	ta.cancel()
	if err := ta.wait(); !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
	if !processGone(pid) {
		t.Errorf("runtime pid %d survived cancellation", pid)
	}
}

func TestIllegalTransitionsAreRefused(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)

	// Invoke before Init.
	r := ta.invoke(action{Do: "echo"})
	if r.ErrorType != "Sandbox.InvalidState" {
		t.Errorf("Invoke before Init: %+v", r.Result)
	}
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	// A second Init while the runtime runs.
	if d, _ := ta.init(fakeInit(t, "")); d.Error == nil || d.Error.ErrorType != "Sandbox.InvalidState" {
		t.Errorf("second Init: %+v", d)
	}

	// The runtime breaking the Runtime API's rules.
	r = ta.invoke(action{Do: "probe"})
	mustSucceed(t, r)
	codes := decodeJSON[map[string]int](t, r.payload)
	want := map[string]int{"next": 403, "wrongID": 400, "initError": 403, "unknown": 404}
	for k, v := range want {
		if codes[k] != v {
			t.Errorf("%s: status %d, want %d", k, codes[k], v)
		}
	}
	// Output after the response belongs to the next invocation; a second
	// response for a finished invocation got 400.
	r = ta.invoke(action{Do: "echo"})
	mustSucceed(t, r)
	if !strings.Contains(r.log, "second response status 400") {
		t.Errorf("late output / second response:\n%s", r.log)
	}

	// A second Invoke while one runs is refused; the first goes on.
	flag := filepath.Join(t.TempDir(), "go")
	first, second := ta.nextID(), ta.nextID()
	ta.sendInvoke(first, action{Do: "waitfile", Path: flag}, 20*time.Second)
	ta.sendInvoke(second, action{Do: "echo"}, 20*time.Second)
	r = ta.readResult()
	if r.RequestID != second || r.ErrorType != "Sandbox.InvalidState" {
		t.Fatalf("second Invoke: %+v", r.Result)
	}
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r = ta.readResult()
	if r.RequestID != first {
		t.Fatalf("got result for %s, want %s", r.RequestID, first)
	}
	mustSucceed(t, r)
}

func TestRuntimeLimits(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	r := ta.invoke(action{Do: "limits"})
	mustSucceed(t, r)
	l := decodeJSON[map[string]int64](t, r.payload)
	if l["nofileCur"] != 1024 || l["nofileMax"] != 1024 || l["coreCur"] != 0 || l["coreMax"] != 0 {
		t.Errorf("limits = %v", l)
	}
	if l["pgid"] != l["pid"] {
		t.Errorf("runtime is not in its own process group: %v", l)
	}
}

func TestRuntimeRunsAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the runtime as another user")
	}
	t.Parallel()
	// The test binary lives in a 0700 build directory: copy it where
	// nobody can execute it.
	exe, _ := os.Executable()
	dir := t.TempDir()
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "runtime")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	ta := startAgent(t)
	cfg := fakeInit(t, "")
	cfg.Command = []string{bin}
	cfg.Dir = dir
	cfg.UID, cfg.GID = 65534, 65534
	if d, body := ta.init(cfg); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	r := ta.invoke(action{Do: "limits"})
	mustSucceed(t, r)
	if l := decodeJSON[map[string]int64](t, r.payload); l["uid"] != 65534 || l["gid"] != 65534 {
		t.Errorf("runtime runs as %v", l)
	}
}
