package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/runtimes"
)

func mustInvoke(t *testing.T, h *Harness, req *InvokeRequest) *InvokeResult {
	t.Helper()
	res, err := h.Invoke(context.Background(), req)
	if err != nil {
		t.Fatalf("Invoke(%s): %v", req.Payload, err)
	}
	return res
}

func TestWarmReuse(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("echo", "r1")

	first := mustInvoke(t, e.h, request(fn, `{"n":1}`))
	if !first.Cold || string(first.Payload) != `{"n":1}` || first.FunctionError != "" {
		t.Fatalf("first invoke = cold %v payload %q error %q", first.Cold, first.Payload, first.FunctionError)
	}
	if first.InitDuration != 7*time.Millisecond {
		t.Errorf("cold InitDuration = %v, want the agent's 7ms", first.InitDuration)
	}
	if !bytes.Contains(first.Log, []byte("START RequestId: "+first.RequestID)) || first.MaxMemoryMB != 21 {
		t.Errorf("log %q / max memory %d not taken from the Result", first.Log, first.MaxMemoryMB)
	}
	second := mustInvoke(t, e.h, request(fn, `{"n":2}`))
	if second.Cold || second.Instance != first.Instance || string(second.Payload) != `{"n":2}` {
		t.Fatalf("second invoke = cold %v instance %s (first %s) payload %q", second.Cold, second.Instance, first.Instance, second.Payload)
	}
	if n := e.drv.startCount(); n != 1 {
		t.Fatalf("driver started %d sandboxes, want 1", n)
	}
	st := e.h.Stats()
	if f := st.Functions["echo"]; f.Idle != 1 || f.Total() != 1 || st.ColdStarts != 1 || st.Invocations != 2 {
		t.Fatalf("stats = %+v", st)
	}

	spec := e.drv.specs[0]
	if spec.MemoryMB != 128 || spec.EphemeralMB != 512 || spec.Function != "echo" || spec.RevisionID != "r1" {
		t.Errorf("spec = %+v", spec)
	}
	key, _ := digestKey(e.code)
	if spec.CodeDir != filepath.Join(e.dir, "code", key) {
		t.Errorf("CodeDir = %s", spec.CodeDir)
	}
	if b, err := os.ReadFile(filepath.Join(spec.CodeDir, "bootstrap")); err != nil || !strings.Contains(string(b), "v1") {
		t.Errorf("unpacked bootstrap = %q, %v", b, err)
	}
	if spec.RuntimeDir != "" {
		t.Errorf("RuntimeDir = %q for a family without support files", spec.RuntimeDir)
	}
	init := e.drv.initOf(first.Instance)
	if init.Dir != "/var/task" || len(init.Command) != 1 || init.Command[0] != "/var/task/bootstrap" ||
		init.FunctionName != "echo" || init.TimeoutSec != 3 || init.MemoryMB != 128 {
		t.Errorf("init = %+v", init)
	}
	wantUID := 0
	if os.Geteuid() == 0 {
		wantUID = 993
	}
	if init.UID != wantUID || init.GID != wantUID {
		t.Errorf("init runs as %d:%d, want %d", init.UID, init.GID, wantUID)
	}
	if v := envValue(init.Env, "AWS_LAMBDA_FUNCTION_NAME"); v != "echo" {
		t.Errorf("Init.Env AWS_LAMBDA_FUNCTION_NAME = %q", v)
	}
}

func TestLIFOReuse(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("lifo", "r1")
	// Two instances: one busy while the second cold-starts.
	ch := make(chan *InvokeResult, 1)
	go func() { ch <- mustInvoke(t, e.h, request(fn, "block")) }()
	e.waitArrived(t, 1)
	other := mustInvoke(t, e.h, request(fn, "x"))
	e.openGate()
	blocked := <-ch
	e.waitArrived(t, 1)
	// blocked finished last, so it is the most recently used.
	next := mustInvoke(t, e.h, request(fn, "y"))
	if next.Instance != blocked.Instance || next.Instance == other.Instance {
		t.Fatalf("took %s; most recently used is %s, older %s", next.Instance, blocked.Instance, other.Instance)
	}
}

func TestReservedConcurrencyThrottles(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("capped", "r1")
	one := 1
	fn.ReservedConcurrency = &one

	done := make(chan *InvokeResult, 1)
	go func() { done <- mustInvoke(t, e.h, request(fn, "block")) }()
	e.waitArrived(t, 1)

	_, err := e.h.Invoke(context.Background(), request(fn, "second"))
	var te *errdefs.ThrottleError
	if !errors.Is(err, errdefs.ErrThrottled) || !errors.As(err, &te) || te.Reason != errdefs.ReasonReservedFunctionConcurrency {
		t.Fatalf("second invoke err = %v, want a reserved-concurrency throttle", err)
	}
	e.openGate()
	if res := <-done; string(res.Payload) != "block" {
		t.Fatalf("blocked invoke payload = %q", res.Payload)
	}
	// With the instance idle again, the cap admits the next one.
	if res := mustInvoke(t, e.h, request(fn, "third")); res.Cold {
		t.Fatalf("third invoke was cold")
	}
	if st := e.h.Stats(); st.Throttles != 1 {
		t.Fatalf("Throttles = %d", st.Throttles)
	}
}

func TestReservedConcurrencyZeroThrottlesAll(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("off", "r1")
	zero := 0
	fn.ReservedConcurrency = &zero
	_, err := e.h.Invoke(context.Background(), request(fn, "x"))
	var te *errdefs.ThrottleError
	if !errors.As(err, &te) || te.Reason != errdefs.ReasonReservedFunctionConcurrency || te.Msg != "Rate Exceeded." {
		t.Fatalf("err = %v, want reserved throttle", err)
	}
	if n := e.drv.startCount(); n != 0 {
		t.Fatalf("driver started %d sandboxes for a function reserved at 0", n)
	}
}

func TestDefaultConcurrencyThrottles(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.DefaultConcurrency = 1 })
	fn := e.fn("dflt", "r1")
	go func() { _, _ = e.h.Invoke(context.Background(), request(fn, "block")) }()
	e.waitArrived(t, 1)
	_, err := e.h.Invoke(context.Background(), request(fn, "x"))
	var te *errdefs.ThrottleError
	if !errors.As(err, &te) || te.Reason != errdefs.ReasonConcurrentInvocationLimit {
		t.Fatalf("err = %v, want ConcurrentInvocationLimitExceeded", err)
	}
	// Another function has its own cap.
	if _, err := e.h.Invoke(context.Background(), request(e.fn("other", "r1"), "y")); err != nil {
		t.Fatalf("other function: %v", err)
	}
}

func TestHostCapEvictsIdleThenThrottles(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.MaxInstances = 1 })
	a := mustInvoke(t, e.h, request(e.fn("a", "r1"), "a"))
	// The host is full with a's idle instance: b evicts it.
	b := mustInvoke(t, e.h, request(e.fn("b", "r1"), "b"))
	if !b.Cold || !e.drv.wasStopped(a.Instance) {
		t.Fatalf("b cold %v, a's instance stopped %v", b.Cold, e.drv.wasStopped(a.Instance))
	}
	if st := e.h.Stats(); st.Evictions != 1 || st.Instances != 1 {
		t.Fatalf("stats = %+v", st)
	}
	// With b busy nothing can be evicted: a is throttled.
	go func() { _, _ = e.h.Invoke(context.Background(), request(e.fn("b", "r1"), "block")) }()
	e.waitArrived(t, 3) // a, b, then the blocked one
	_, err := e.h.Invoke(context.Background(), request(e.fn("a", "r1"), "a2"))
	var te *errdefs.ThrottleError
	if !errors.As(err, &te) || te.Reason != errdefs.ReasonConcurrentInvocationLimit {
		t.Fatalf("err = %v, want host throttle", err)
	}
}

func TestSixtyFourConcurrentInvokes(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("wide", "r1")
	const n = 64
	results := make([]*InvokeResult, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for k := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[k], errs[k] = e.h.Invoke(context.Background(), request(fn, fmt.Sprintf("block-%03d", k)))
		}()
	}
	// All 64 are inside agents at once before any answers.
	ids := e.waitArrived(t, n)
	e.openGate()
	wg.Wait()
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			t.Fatalf("instance %s got two invocations at once", id)
		}
		seen[id] = true
	}
	for k := range n {
		if errs[k] != nil {
			t.Fatalf("invoke %d: %v", k, errs[k])
		}
		if want := fmt.Sprintf("block-%03d", k); string(results[k].Payload) != want {
			t.Fatalf("invoke %d got %q, want %q", k, results[k].Payload, want)
		}
		if !bytes.Contains(results[k].Log, []byte(results[k].RequestID)) {
			t.Fatalf("invoke %d got another request's log %q", k, results[k].Log)
		}
	}
	if got := e.src.opens.Load(); got != 1 {
		t.Fatalf("code fetched %d times for one revision, want 1", got)
	}
	if st := e.h.Stats(); st.Functions["wide"].Idle != n || st.ColdStarts != n {
		t.Fatalf("stats = %+v", st.Functions["wide"])
	}
}

func TestKeepAliveReaper(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.KeepAlive = 20 * time.Millisecond })
	res := mustInvoke(t, e.h, request(e.fn("short", "r1"), "x"))
	waitFor(t, "idle instance reaped", func() bool { return e.h.Stats().Instances == 0 })
	if !e.drv.wasStopped(res.Instance) || e.drv.liveCount() != 0 {
		t.Fatalf("instance %s not stopped through the driver", res.Instance)
	}
	// Scaled to zero, the next invocation starts cold.
	if again := mustInvoke(t, e.h, request(e.fn("short", "r1"), "y")); !again.Cold {
		t.Fatalf("invoke after scale to zero was warm")
	}
}

func TestRetireOnRevisionChange(t *testing.T) {
	e := newTestEnv(t, nil)
	codeV2 := e.src.add(t, "v2")
	old := e.fn("svc", "r1")

	busyDone := make(chan *InvokeResult, 1)
	go func() { busyDone <- mustInvoke(t, e.h, request(old, "block")) }()
	busyID := e.waitArrived(t, 1)[0]
	idle := mustInvoke(t, e.h, request(old, "x"))
	e.waitArrived(t, 1)

	if err := e.h.Retire(context.Background(), "svc", "r2"); err != nil {
		t.Fatal(err)
	}
	if !e.drv.wasStopped(idle.Instance) {
		t.Fatalf("idle instance of the old revision still running after Retire")
	}
	if e.drv.wasStopped(busyID) {
		t.Fatalf("busy instance stopped before its invocation ended")
	}

	cur := e.fn("svc", "r2")
	cur.CodeSha256 = codeV2
	res := mustInvoke(t, e.h, request(cur, "new"))
	if !res.Cold || res.Instance == busyID || res.Instance == idle.Instance {
		t.Fatalf("new revision ran on %s (cold %v)", res.Instance, res.Cold)
	}
	e.waitArrived(t, 1)

	e.openGate()
	if r := <-busyDone; string(r.Payload) != "block" || r.FunctionError != "" {
		t.Fatalf("busy invocation of the retired revision = %q %q", r.Payload, r.FunctionError)
	}
	waitFor(t, "retired busy instance stopped", func() bool { return e.drv.wasStopped(busyID) })
	waitFor(t, "only r2 left", func() bool {
		f := e.h.Stats().Functions["svc"]
		return f.Total() == 1 && f.Revisions["r2"] == 1
	})
	oldKey, _ := digestKey(e.code)
	newKey, _ := digestKey(codeV2)
	if _, err := os.Stat(filepath.Join(e.dir, "code", oldKey)); !os.IsNotExist(err) {
		t.Fatalf("old revision's code still unpacked: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "code", newKey)); err != nil {
		t.Fatalf("current revision's code: %v", err)
	}

	// Retiring everything (DeleteFunction) leaves nothing behind.
	if err := e.h.Retire(context.Background(), "svc", ""); err != nil {
		t.Fatal(err)
	}
	if st := e.h.Stats(); st.Instances != 0 || len(st.Functions) != 0 {
		t.Fatalf("stats after retiring all = %+v", st)
	}
	if entries, _ := os.ReadDir(filepath.Join(e.dir, "code")); len(entries) != 0 {
		t.Fatalf("code cache not emptied: %v", entries)
	}
}

func TestResetDestroysInstance(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("flaky", "r1")
	res := mustInvoke(t, e.h, request(fn, "reset"))
	if res.FunctionError != "Unhandled" || res.ErrorType != "Sandbox.Timedout" {
		t.Fatalf("reset result = %q %q", res.FunctionError, res.ErrorType)
	}
	waitFor(t, "reset instance destroyed", func() bool { return e.drv.wasStopped(res.Instance) && e.h.Stats().Instances == 0 })
	next := mustInvoke(t, e.h, request(fn, "ok"))
	if !next.Cold || next.Instance == res.Instance {
		t.Fatalf("invocation after reset reused instance %s", next.Instance)
	}
	if st := e.h.Stats(); st.Resets != 1 {
		t.Fatalf("Resets = %d", st.Resets)
	}
}

func TestInitFailure(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("broken", "r1")
	fn.Environment = map[string]string{"FAKE_INIT": "error"}
	res := mustInvoke(t, e.h, request(fn, "x"))
	if res.FunctionError != "Unhandled" || res.ErrorType != "Runtime.ImportModuleError" || !res.Cold {
		t.Fatalf("init failure result = %+v", res)
	}
	var doc struct{ ErrorMessage, ErrorType string }
	if err := json.Unmarshal(res.Payload, &doc); err != nil || doc.ErrorMessage != "boom in init" {
		t.Fatalf("payload %q: %v", res.Payload, err)
	}
	initAt := bytes.Index(res.Log, []byte("init log line"))
	startAt := bytes.Index(res.Log, []byte("START RequestId: "+res.RequestID))
	if initAt < 0 || startAt < initAt || !bytes.Contains(res.Log, []byte("REPORT RequestId: "+res.RequestID)) {
		t.Fatalf("log = %q, want INIT output before START ... REPORT", res.Log)
	}
	waitFor(t, "failed instance destroyed", func() bool { return e.drv.liveCount() == 0 && e.h.Stats().Instances == 0 })
	if st := e.h.Stats(); st.InitErrors != 1 {
		t.Fatalf("InitErrors = %d", st.InitErrors)
	}
}

func TestSandboxExitDuringInvoke(t *testing.T) {
	e := newTestEnv(t, nil)
	res := mustInvoke(t, e.h, request(e.fn("crash", "r1"), "exit"))
	if res.FunctionError != "Unhandled" || res.ErrorType != "Runtime.ExitError" {
		t.Fatalf("exit result = %q %q", res.FunctionError, res.ErrorType)
	}
	waitFor(t, "exited instance removed", func() bool { return e.h.Stats().Instances == 0 })
}

func TestIdleInstanceExitIsRemoved(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("dies", "r1")
	res := mustInvoke(t, e.h, request(fn, "x"))
	e.drv.crash(res.Instance)
	waitFor(t, "dead idle instance removed", func() bool { return e.h.Stats().Instances == 0 })
	if next := mustInvoke(t, e.h, request(fn, "y")); !next.Cold {
		t.Fatalf("dead instance was reused")
	}
}

func TestHungAgentSafetyNet(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the 5 s safety margin")
	}
	e := newTestEnv(t, nil)
	fn := e.fn("hangs", "r1")
	fn.Timeout = 1
	res := mustInvoke(t, e.h, request(fn, "hang"))
	if res.FunctionError != "Unhandled" || !bytes.Contains(res.Payload, []byte("Task timed out after 1.00 seconds")) {
		t.Fatalf("hung invocation result = %q %s", res.FunctionError, res.Payload)
	}
	waitFor(t, "hung instance destroyed", func() bool { return e.drv.wasStopped(res.Instance) && e.h.Stats().Instances == 0 })
	if st := e.h.Stats(); st.Timeouts != 1 {
		t.Fatalf("Timeouts = %d", st.Timeouts)
	}
}

func TestClientCancelReleasesInstance(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("slow", "r1")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := e.h.Invoke(ctx, request(fn, "block"))
		errc <- err
	}()
	id := e.waitArrived(t, 1)[0]
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Invoke returned %v", err)
	}
	if f := e.h.Stats().Functions["slow"]; f.Busy != 1 {
		t.Fatalf("instance should still run the invocation: %+v", f)
	}
	e.openGate()
	waitFor(t, "instance back to idle", func() bool { return e.h.Stats().Functions["slow"].Idle == 1 })
	if res := mustInvoke(t, e.h, request(fn, "again")); res.Cold || res.Instance != id {
		t.Fatalf("next invoke cold %v on %s, want warm on %s", res.Cold, res.Instance, id)
	}
}

func TestClientCancelDuringColdStart(t *testing.T) {
	e := newTestEnv(t, nil)
	e.drv.startGate = make(chan struct{})
	fn := e.fn("coldcancel", "r1")
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := e.h.Invoke(ctx, request(fn, "x"))
		errc <- err
	}()
	waitFor(t, "cold start begun", func() bool { return e.h.Stats().Functions["coldcancel"].Starting == 1 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Invoke returned %v", err)
	}
	close(e.drv.startGate)
	waitFor(t, "started instance parked idle", func() bool { return e.h.Stats().Functions["coldcancel"].Idle == 1 })
	e.drv.mu.Lock()
	invoked := len(e.drv.invokes)
	e.drv.mu.Unlock()
	if invoked != 0 {
		t.Fatalf("the abandoned invocation still ran")
	}
}

func TestCloseStopsEverything(t *testing.T) {
	e := newTestEnv(t, nil)
	mustInvoke(t, e.h, request(e.fn("a", "r1"), "x"))
	mustInvoke(t, e.h, request(e.fn("b", "r1"), "y"))
	errc := make(chan error, 1)
	go func() {
		_, err := e.h.Invoke(context.Background(), request(e.fn("c", "r1"), "block"))
		errc <- err
	}()
	e.waitArrived(t, 3)

	// The busy invocation never finishes by itself: Close cuts it short
	// once its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	e.closeErrOK = true
	if err := e.h.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want the in-flight invocation reported cut short", err)
	}
	if n := e.drv.liveCount(); n != 0 {
		t.Fatalf("%d sandboxes running after Close", n)
	}
	if st := e.h.Stats(); st.Instances != 0 {
		t.Fatalf("stats after Close = %+v", st)
	}
	if err := <-errc; !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("cut-short Invoke returned %v, want ErrUnavailable", err)
	}
	if _, err := e.h.Invoke(context.Background(), request(e.fn("a", "r1"), "z")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Invoke after Close = %v, want ErrUnavailable", err)
	}
}

func TestCloseWaitsForInflight(t *testing.T) {
	e := newTestEnv(t, nil)
	done := make(chan *InvokeResult, 1)
	go func() { done <- mustInvoke(t, e.h, request(e.fn("a", "r1"), "block")) }()
	e.waitArrived(t, 1)
	closed := make(chan error, 1)
	go func() { closed <- e.h.Close(context.Background()) }()
	waitFor(t, "Close refusing new work", func() bool {
		_, err := e.h.Invoke(context.Background(), request(e.fn("b", "r1"), "x"))
		return errors.Is(err, errdefs.ErrUnavailable)
	})
	e.openGate()
	if res := <-done; string(res.Payload) != "block" {
		t.Fatalf("in-flight invocation = %q", res.Payload)
	}
	if err := <-closed; err != nil {
		t.Fatalf("Close = %v", err)
	}
	if n := e.drv.liveCount(); n != 0 {
		t.Fatalf("%d sandboxes running after Close", n)
	}
}

func TestStartRecoversAndStopsLeftovers(t *testing.T) {
	drv := newFakeDriver()
	h1, a1 := net.Pipe()
	left := &fakeInstance{id: "ix-left", harness: h1, agent: a1, done: make(chan struct{})}
	drv.recovered = []driver.Instance{left}
	src := &memSource{}
	h, err := New(Config{Driver: drv, CacheDir: t.TempDir(), Code: src, MaxMemoryMB: 1024,
		RuntimeFiles: func(runtimes.Family) fs.FS { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	fn := (&testEnv{code: src.add(t, "x")}).fn("f", "r1")
	if _, err := h.Invoke(context.Background(), request(fn, "x")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Invoke before Start = %v, want ErrUnavailable", err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer h.Close(context.Background())
	if drv.recovers != 1 || !drv.wasStopped("ix-left") || drv.liveCount() != 0 {
		t.Fatalf("recover calls %d, leftover stopped %v", drv.recovers, drv.wasStopped("ix-left"))
	}
	if err := h.Start(context.Background()); !errors.Is(err, errdefs.ErrConflict) {
		t.Fatalf("second Start = %v", err)
	}
	if _, err := h.Invoke(context.Background(), request(fn, "x")); err != nil {
		t.Fatalf("Invoke after Start: %v", err)
	}
}

func TestInvalidRuntime(t *testing.T) {
	e := newTestEnv(t, nil)
	req := request(e.fn("f", "r1"), "x")
	req.Runtime.Available = false
	req.Runtime.Reason = "python3.13 not installed"
	if _, err := e.h.Invoke(context.Background(), req); !errors.Is(err, errdefs.ErrInvalidRuntime) {
		t.Fatalf("err = %v, want ErrInvalidRuntime", err)
	}
	req.Runtime = nil
	if _, err := e.h.Invoke(context.Background(), req); !errors.Is(err, errdefs.ErrInvalidRuntime) {
		t.Fatalf("nil runtime err = %v", err)
	}
}

func TestMissingCodeFailsAndCleansUp(t *testing.T) {
	e := newTestEnv(t, nil)
	fn := e.fn("nocode", "r1")
	fn.CodeSha256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" // sha256 of nothing, not stored
	// The platform lost the code: an internal error, never a kind that
	// blames the caller (a 404 would say the function does not exist).
	_, err := e.h.Invoke(context.Background(), request(fn, "x"))
	if err == nil || errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("err = %v, want a kindless error that says the code was not found", err)
	}
	if st := e.h.Stats(); st.Instances != 0 || st.MemoryMB != 0 || e.drv.startCount() != 0 {
		t.Fatalf("failed cold start left %+v", st)
	}
}

func TestRuntimeFilesMaterialisedOnce(t *testing.T) {
	files := fstest.MapFS{
		"bootstrap":      {Data: []byte("#!/bin/sh\n"), Mode: 0o755},
		"lib/rapid.py":   {Data: []byte("print(1)\n"), Mode: 0o600},
		"lib/README.txt": {Data: []byte("hi"), Mode: 0o644},
	}
	e := newTestEnv(t, func(c *Config) {
		c.RuntimeFiles = func(f runtimes.Family) fs.FS {
			if f == runtimes.FamilyPython {
				return files
			}
			return nil
		}
	})
	py := func(name string) *InvokeRequest {
		req := request(e.fn(name, "r1"), "x")
		req.Runtime.Family = runtimes.FamilyPython
		return req
	}
	mustInvoke(t, e.h, py("p1"))
	mustInvoke(t, e.h, py("p2"))
	if e.drv.specs[0].RuntimeDir == "" || e.drv.specs[0].RuntimeDir != e.drv.specs[1].RuntimeDir {
		t.Fatalf("runtime dirs %q and %q", e.drv.specs[0].RuntimeDir, e.drv.specs[1].RuntimeDir)
	}
	dir := e.drv.specs[0].RuntimeDir
	if !strings.HasPrefix(filepath.Base(dir), "python-") {
		t.Errorf("runtime dir %s not named after its family", dir)
	}
	info, err := os.Stat(filepath.Join(dir, "bootstrap"))
	if err != nil || info.Mode().Perm() != 0o755 {
		t.Fatalf("bootstrap: %v %v", info, err)
	}
	info, err = os.Stat(filepath.Join(dir, "lib", "rapid.py"))
	if err != nil || info.Mode().Perm() != 0o644 {
		t.Fatalf("rapid.py must be readable by the sandbox user: %v %v", info, err)
	}
}

func TestStateMachine(t *testing.T) {
	legal := map[[2]State]bool{
		{StateStarting, StateIdle}: true, {StateStarting, StateBusy}: true, {StateStarting, StateStopping}: true,
		{StateIdle, StateBusy}: true, {StateIdle, StateStopping}: true,
		{StateBusy, StateIdle}: true, {StateBusy, StateStopping}: true,
		{StateStopping, StateGone}: true,
	}
	all := []State{StateStarting, StateIdle, StateBusy, StateStopping, StateGone}
	for _, from := range all {
		for _, to := range all {
			err := transition(from, to)
			if legal[[2]State{from, to}] {
				if err != nil {
					t.Errorf("%s -> %s refused: %v", from, to, err)
				}
			} else if !errors.Is(err, errIllegalTransition) {
				t.Errorf("%s -> %s allowed, want errIllegalTransition", from, to)
			}
		}
	}
}

func TestRetireDuringColdStart(t *testing.T) {
	e := newTestEnv(t, nil)
	e.drv.startGate = make(chan struct{})
	fn := e.fn("upd", "r1")
	done := make(chan *InvokeResult, 1)
	go func() { done <- mustInvoke(t, e.h, request(fn, "x")) }()
	waitFor(t, "cold start begun", func() bool { return e.h.Stats().Functions["upd"].Starting == 1 })
	if err := e.h.Retire(context.Background(), "upd", "r2"); err != nil {
		t.Fatal(err)
	}
	close(e.drv.startGate)
	// The invocation that caused the cold start is still served ...
	res := <-done
	if string(res.Payload) != "x" || !res.Cold {
		t.Fatalf("result = %q cold %v", res.Payload, res.Cold)
	}
	// ... and the instance of the retired revision does not stay.
	waitFor(t, "retired instance stopped", func() bool { return e.drv.wasStopped(res.Instance) && e.h.Stats().Instances == 0 })
}

func TestCloseAbortsColdStart(t *testing.T) {
	e := newTestEnv(t, nil)
	e.drv.startGate = make(chan struct{}) // never opened: Start waits for its ctx
	errc := make(chan error, 1)
	go func() {
		_, err := e.h.Invoke(context.Background(), request(e.fn("stuck", "r1"), "x"))
		errc <- err
	}()
	waitFor(t, "cold start begun", func() bool { return e.h.Stats().Functions["stuck"].Starting == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	e.closeErrOK = true
	if err := e.h.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v", err)
	}
	if err := <-errc; !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("aborted cold start returned %v, want ErrUnavailable", err)
	}
	if st := e.h.Stats(); st.Instances != 0 || st.MemoryMB != 0 {
		t.Fatalf("stats after Close = %+v", st)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := newTestEnv(t, func(c *Config) { c.Metrics = reg })
	mustInvoke(t, e.h, request(e.fn("m", "r1"), "x"))
	mustInvoke(t, e.h, request(e.fn("m", "r1"), "y"))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, f := range families {
		got[f.GetName()] = f
	}
	if h := got["invokex_harness_driver_start_seconds"]; h == nil || h.Metric[0].Histogram.GetSampleCount() != 1 {
		t.Fatalf("driver start histogram = %v", h)
	}
	if h := got["invokex_harness_invoke_seconds"]; h == nil || h.Metric[0].Histogram.GetSampleCount() != 2 {
		t.Fatalf("invoke histogram = %v", h)
	}
	idle := -1.0
	for _, m := range got["invokex_harness_instances"].GetMetric() {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["function"] == "m" && labels["state"] == "idle" {
			idle = m.Gauge.GetValue()
		}
	}
	if idle != 1 {
		t.Fatalf("idle gauge for m = %v, want 1", idle)
	}
	// A second harness on the same registry is refused, not silently merged.
	if _, err := New(Config{Driver: e.drv, CacheDir: t.TempDir(), Code: e.src, MaxMemoryMB: 1024, Metrics: reg}); err == nil {
		t.Fatal("registering the metrics twice succeeded")
	}
}

func TestDefaultRuntimeFiles(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.RuntimeFiles = nil }) // runtimes.SupportFiles
	req := request(e.fn("py", "r1"), "x")
	req.Runtime.Family = runtimes.FamilyPython
	mustInvoke(t, e.h, req)
	mustInvoke(t, e.h, request(e.fn("prov", "r1"), "y"))
	pyDir, provDir := e.drv.specs[0].RuntimeDir, e.drv.specs[1].RuntimeDir
	if provDir != "" {
		t.Errorf("provided runtime got support files at %s", provDir)
	}
	want := 0
	_ = fs.WalkDir(runtimes.SupportFiles(runtimes.FamilyPython), ".", func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			want++
		}
		return err
	})
	got := 0
	_ = filepath.WalkDir(pyDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			got++
		}
		return err
	})
	if want == 0 || got != want {
		t.Fatalf("python runtime dir %q holds %d files, want %d", pyDir, got, want)
	}
}

// RetireRevisions retires only the named revisions: instances of the
// other versions of the function stay warm.
func TestRetireRevisionsKeepsTheOthers(t *testing.T) {
	e := newTestEnv(t, nil)
	e.openGate()
	v1, v2, latest := e.fn("svc", "rev-v1"), e.fn("svc", "rev-v2"), e.fn("svc", "rev-latest")
	first := map[string]string{}
	for _, fn := range []*function.Config{v1, v2, latest} {
		first[fn.RevisionID] = mustInvoke(t, e.h, request(fn, "x")).Instance
	}
	if err := e.h.RetireRevisions(context.Background(), "svc", []string{"rev-v2", "unknown"}); err != nil {
		t.Fatal(err)
	}
	if !e.drv.wasStopped(first["rev-v2"]) {
		t.Fatal("the retired revision's instance is still running")
	}
	for _, rev := range []string{"rev-v1", "rev-latest"} {
		if e.drv.wasStopped(first[rev]) {
			t.Fatalf("%s's instance was stopped", rev)
		}
	}
	for _, fn := range []*function.Config{v1, latest} {
		if res := mustInvoke(t, e.h, request(fn, "y")); res.Cold || res.Instance != first[fn.RevisionID] {
			t.Fatalf("%s after RetireRevisions: instance %s cold %v, want warm %s", fn.RevisionID, res.Instance, res.Cold, first[fn.RevisionID])
		}
	}
	// Idempotent, and a function without a pool is no error.
	if err := e.h.RetireRevisions(context.Background(), "svc", []string{"rev-v2"}); err != nil {
		t.Fatal(err)
	}
	if err := e.h.RetireRevisions(context.Background(), "nobody", []string{"r"}); err != nil {
		t.Fatal(err)
	}
}

// emulatedDriver is the fake driver reporting software emulation.
type emulatedDriver struct{ *fakeDriver }

func (emulatedDriver) Emulated() bool { return true }

// TestEmulatedInitLimit: INIT gets Lambda's 10 s, stretched for a driver
// whose guests are emulated (driver.Emulator).
func TestEmulatedInitLimit(t *testing.T) {
	for _, emulated := range []bool{false, true} {
		e := newTestEnv(t, func(c *Config) {
			if emulated {
				c.Driver = emulatedDriver{c.Driver.(*fakeDriver)}
			}
		})
		res := mustInvoke(t, e.h, request(e.fn("echo", "r1"), `{}`))
		want := int64(10_000)
		if emulated {
			want *= emulatedInitFactor
		}
		if got := e.drv.initOf(res.Instance).InitTimeoutMs; got != want {
			t.Errorf("emulated %v: Init.InitTimeoutMs = %d, want %d", emulated, got, want)
		}
	}
}

// collectingDriver is a driver with metrics of its own (driverMetrics).
type collectingDriver struct {
	*fakeDriver
	c prometheus.Collector
}

func (d collectingDriver) Collector() prometheus.Collector { return d.c }

// TestDriverMetrics: a driver's own metrics are registered with the
// harness's.
func TestDriverMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	own := prometheus.NewCounter(prometheus.CounterOpts{Name: "test_driver_things_total", Help: "Things."})
	own.Add(3)
	newTestEnv(t, func(c *Config) {
		c.Metrics = reg
		c.Driver = collectingDriver{fakeDriver: c.Driver.(*fakeDriver), c: own}
	})
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "test_driver_things_total" && f.Metric[0].Counter.GetValue() == 3 {
			return
		}
	}
	t.Errorf("the driver's counter is not among the harness's metrics")
}
