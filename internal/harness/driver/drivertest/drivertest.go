// Package drivertest is the conformance suite every sandbox driver runs:
// the process driver now, the VM drivers later. It talks to instances
// exactly as the harness does, with package protocol over Instance.Conn,
// and deploys a real function, internal/testfunc/probe, that reports on and
// attacks its sandbox.
//
// A driver's test calls Run from a Test function:
//
//	func TestDriver(t *testing.T) {
//		drivertest.Run(t, func(t *testing.T, stateDir string) driver.Driver { ... })
//	}
//
// newDriver must return a fresh driver on stateDir each time it is called
// (subtests are independent and each gets its own state directory). Checks
// that need root (limits, the sandbox user) skip when not root. RunWith
// takes Options for drivers that are slower (longer liveness bounds) or
// cannot pass some subtests yet (skipped with a stated reason).
//
// The crash-recovery subtest re-executes the test binary to run a
// short-lived "harness" child; that child runs the same Test function with
// an environment variable set and must reach Run.
package drivertest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/protocol"
)

// Options adapts the suite to a driver. The zero value is the strictest
// suite, which the process driver passes.
type Options struct {
	// Unsupported names subtests (top-level names, e.g. "NetworkEgress")
	// the driver cannot pass yet, each with the reason; they are skipped
	// with that reason, never silently. A name the suite does not have
	// fails it, so a renamed subtest cannot hide a skip.
	Unsupported map[string]string
	// StartTimeout bounds each Start (default 60 s), FrameTimeout each
	// answer of the agent (default 90 s), StopTimeout each Stop and Close
	// (default 60 s). Drivers whose sandboxes are slow to boot, such as VMs
	// under software emulation, raise them. They are liveness bounds: a
	// driver is never failed for being slower than another.
	StartTimeout, FrameTimeout, StopTimeout time.Duration
	// WarmReady, for a driver that starts sandboxes ahead of need (a
	// pool of spares), reports whether one is ready in the driver's state
	// directory; FromWarm whether an instance came from one. With both,
	// StartsInSuccession waits for the pool before each start and checks
	// that the start took from it.
	WarmReady func(stateDir string) bool
	FromWarm  func(inst driver.Instance) bool
}

func (o Options) withDefaults() Options {
	if o.StartTimeout <= 0 {
		o.StartTimeout = defaultStartTimeout
	}
	if o.FrameTimeout <= 0 {
		o.FrameTimeout = defaultFrameTimeout
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = defaultStopTimeout
	}
	return o
}

// Run runs the conformance suite against the drivers newDriver returns.
func Run(t *testing.T, newDriver func(t *testing.T, stateDir string) driver.Driver) {
	RunWith(t, Options{}, newDriver)
}

// RunWith runs the conformance suite adapted by opts.
func RunWith(t *testing.T, opts Options, newDriver func(t *testing.T, stateDir string) driver.Driver) {
	opts = opts.withDefaults()
	if os.Getenv(crashHelperEnv) != "" {
		runCrashHelper(t, opts, newDriver)
		return
	}
	s := &suite{newDriver: newDriver, topName: t.Name(), opts: opts}
	tests := []struct {
		name string
		fn   func(*testing.T)
	}{
		{"Echo", s.testEcho},
		{"StartsInSuccession", s.testStartsInSuccession},
		{"InvalidSpec", s.testInvalidSpec},
		{"StartCancelled", s.testStartCancelled},
		{"Close", s.testClose},
		{"Concurrent", s.testConcurrent},
		{"CPUsFollowMemory", s.testCPUsFollowMemory},
		{"FunctionErrors", s.testFunctionErrors},
		{"Timeout", s.testTimeout},
		{"RuntimeCrash", s.testRuntimeCrash},
		{"ResetKillsStrays", s.testResetKillsStrays},
		{"OutputFlood", s.testOutputFlood},
		{"MemoryLimit", s.testMemoryLimit},
		{"EphemeralLimit", s.testEphemeralLimit},
		{"TmpBeyondMemory", s.testTmpBeyondMemory},
		{"ForkBomb", s.testForkBomb},
		{"ReadOnlyRoot", s.testReadOnlyRoot},
		{"NetworkIsolated", s.testNetworkIsolated},
		{"NetworkEgress", s.testNetworkEgress},
		{"Shutdown", s.testShutdown},
		{"StopRemovesEverything", s.testStopRemovesEverything},
		{"StopIdempotent", s.testStopIdempotent},
		{"StopWhileBusy", s.testStopWhileBusy},
		{"RecoverAfterCrash", s.testRecoverAfterCrash},
		{"Snapshot", s.testSnapshot},
		{"SnapshotEgress", s.testSnapshotEgress},
	}
	for name := range opts.Unsupported {
		known := false
		for _, tc := range tests {
			known = known || tc.name == name
		}
		if !known {
			t.Fatalf("drivertest: Options.Unsupported names %q, which is not a subtest of the suite", name)
		}
	}
	s.probe = BuildProbe(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if reason, ok := opts.Unsupported[tc.name]; ok {
				t.Skipf("skipping: unsupported by this driver: %s", reason)
			}
			tc.fn(t)
		})
	}
}

type suite struct {
	newDriver func(*testing.T, string) driver.Driver
	probe     string
	topName   string
	opts      Options
}

func (s *suite) env(t *testing.T) *env { return newEnv(t, s.newDriver, s.probe, s.opts) }

func (s *suite) testEcho(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	var a echoAnswer
	sb.call(map[string]any{"action": "echo", "marker": "m-42"}, &a)
	if !strings.Contains(string(a.Event), `"m-42"`) {
		t.Errorf("echoed event %s lacks the marker", a.Event)
	}
	f := a.Facts
	if isRoot() && (f.UID != 993 || f.GID != 993) {
		t.Errorf("runtime runs as %d:%d, want the sandbox user 993:993", f.UID, f.GID)
	}
	if !contains(f.Task, "bootstrap") {
		t.Errorf("/var/task holds %v, want the bootstrap", f.Task)
	}
	if host, _ := os.Hostname(); f.Hostname == "" || f.Hostname == host {
		t.Errorf("sandbox hostname %q, want its own (host is %q)", f.Hostname, host)
	}
	// The sandbox has its own pid namespace: its init is 1, the agent and
	// the runtime come right after.
	if f.PID <= 0 || f.PID > 64 {
		t.Errorf("runtime pid %d, want a small pid of its own namespace", f.PID)
	}
	if f.Cwd != "/var/task" {
		t.Errorf("cwd %q, want /var/task", f.Cwd)
	}
	for k, v := range map[string]string{"LAMBDA_TASK_ROOT": "/var/task", "AWS_LAMBDA_FUNCTION_NAME": "probe"} {
		if f.Env[k] != v {
			t.Errorf("env %s=%q, want %q", k, f.Env[k], v)
		}
	}
	// A warm instance serves the next request with the same runtime.
	var b echoAnswer
	sb.call(map[string]any{"action": "echo"}, &b)
	if b.Facts.PID != f.PID {
		t.Errorf("second invocation ran in pid %d, first in %d: runtime not reused", b.Facts.PID, f.PID)
	}
}

// testStartsInSuccession starts instances of different code one after the
// other, as cold starts of new revisions do: each must run its own code
// under its own hostname, whatever the driver reuses between them (a pool
// of sandboxes or VMs started ahead of need).
func (s *suite) testStartsInSuccession(t *testing.T) {
	e := s.env(t)
	seen := map[string]string{}
	for n := range 3 {
		code := t.TempDir()
		bootstrap, err := os.ReadFile(filepath.Join(e.probe, "bootstrap"))
		if err != nil {
			t.Fatal(err)
		}
		for f, b := range map[string][]byte{"bootstrap": bootstrap, fmt.Sprintf("marker-%d", n): nil} {
			if err := os.WriteFile(filepath.Join(code, f), b, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chmod(code, 0o755); err != nil {
			t.Fatal(err)
		}
		warm := n > 0 && e.opts.WarmReady != nil && e.opts.FromWarm != nil
		if warm {
			e.awaitWarm(t)
		}
		spec := e.spec()
		spec.CodeDir = code
		spec.RevisionID = fmt.Sprintf("rev-%d", n)
		sb := e.start(t, spec)
		if warm && !e.opts.FromWarm(sb.inst) {
			t.Errorf("start %d: a sandbox started ahead of need was ready, but Start did not take it", n)
		}
		sb.init()
		var a echoAnswer
		sb.call(map[string]any{"action": "echo"}, &a)
		for m := range 3 {
			if has := contains(a.Facts.Task, fmt.Sprintf("marker-%d", m)); has != (m == n) {
				t.Errorf("start %d: /var/task holds %v: want marker-%d only", n, a.Facts.Task, n)
			}
		}
		if other, ok := seen[a.Facts.Hostname]; ok || a.Facts.Hostname == "" {
			t.Errorf("start %d: hostname %q (also %s's)", n, a.Facts.Hostname, other)
		}
		seen[a.Facts.Hostname] = spec.ID
		stopAndCheck(t, e, sb)
	}
}

// awaitWarm waits until the driver has a sandbox ready ahead of need.
func (e *env) awaitWarm(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(e.opts.StartTimeout)
	for !e.opts.WarmReady(e.stateDir) {
		if time.Now().After(deadline) {
			t.Fatalf("no sandbox ready ahead of need within %s", e.opts.StartTimeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *suite) testInvalidSpec(t *testing.T) {
	e := s.env(t)
	for name, mutate := range map[string]func(*driver.Spec){
		"bad id":      func(sp *driver.Spec) { sp.ID = "Bad_ID!" },
		"empty id":    func(sp *driver.Spec) { sp.ID = "" },
		"no code dir": func(sp *driver.Spec) { sp.CodeDir = "/nonexistent/code" },
		"no memory":   func(sp *driver.Spec) { sp.MemoryMB = 0 },
	} {
		sp := e.spec()
		mutate(&sp)
		inst, err := e.d.Start(context.Background(), sp)
		if !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: Start error = %v, want ErrInvalidParameter", name, err)
		}
		if inst != nil {
			t.Errorf("%s: Start returned an instance", name)
		}
	}
}

// testStartCancelled: a Start whose context ends, before or during the
// start, either fails and leaves nothing or returns a working instance.
func (s *suite) testStartCancelled(t *testing.T) {
	e := s.env(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sp := e.spec()
	if inst, err := e.d.Start(ctx, sp); err == nil || inst != nil {
		t.Errorf("Start with a cancelled context = %v, %v; want an error", inst, err)
	}
	waitNoLeftovers(t, sp.ID, 0, e.stateDir)

	for _, after := range []time.Duration{time.Millisecond, 10 * time.Millisecond, 50 * time.Millisecond} {
		ctx, cancel := context.WithTimeout(context.Background(), after)
		sp := e.spec()
		inst, err := e.d.Start(ctx, sp)
		cancel()
		if err != nil {
			waitNoLeftovers(t, sp.ID, 0, e.stateDir)
			continue
		}
		sb := e.sandbox(t, sp, inst)
		sb.init()
		sb.call(map[string]any{"action": "echo"}, nil)
		stopAndCheck(t, e, sb)
	}
}

// testClose: Close stops every instance, and Start fails afterwards.
func (s *suite) testClose(t *testing.T) {
	e := s.env(t)
	c, ok := e.d.(driver.Closer)
	if !ok {
		t.Skip("skipping: the driver is not a driver.Closer")
	}
	sb := e.start(t, e.spec())
	pid := 0
	if hp, ok := sb.inst.(HostProcess); ok {
		pid = hp.PID()
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StopTimeout)
	defer cancel()
	if err := c.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitNoLeftovers(t, sb.spec.ID, pid, e.stateDir)
	sp := e.spec()
	if _, err := e.d.Start(ctx, sp); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start after Close: %v, want ErrUnavailable", err)
	}
}

func (s *suite) testConcurrent(t *testing.T) {
	e := s.env(t)
	for i := range 3 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			sb := e.start(t, e.spec())
			sb.init()
			for j := range 3 {
				marker := fmt.Sprintf("%s-%d", sb.spec.ID, j)
				var a echoAnswer
				sb.call(map[string]any{"action": "echo", "marker": marker}, &a)
				if !strings.Contains(string(a.Event), marker) {
					t.Errorf("instance %s answered %s to request %d", sb.spec.ID, a.Event, j)
				}
			}
		})
	}
}

// testCPUsFollowMemory: a sandbox's runtime runs on as many CPUs as its
// memory buys (driver.VCPUsFor, Lambda's rule), whatever the driver: vCPUs
// in a VM, the affinity mask in a process sandbox.
func (s *suite) testCPUsFollowMemory(t *testing.T) {
	host := runtime.NumCPU()
	e := s.env(t)
	for _, mb := range []int{128, 3600} {
		spec := e.spec()
		spec.MemoryMB = mb
		sb := e.start(t, spec)
		sb.init()
		var a echoAnswer
		sb.call(map[string]any{"action": "echo"}, &a)
		if want := driver.VCPUsFor(mb, host); a.Facts.CPUs != want {
			t.Errorf("%d MB sandbox: runtime sees %d CPUs, want %d (host has %d)", mb, a.Facts.CPUs, want, host)
		}
	}
}

func (s *suite) testFunctionErrors(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	r := sb.invoke(map[string]any{"action": "error", "message": "boom-17"}, 30*time.Second)
	if r.FunctionError != "Unhandled" || !strings.Contains(string(r.Payload), "boom-17") {
		t.Errorf("error action: FunctionError %q payload %s, want Unhandled with the message", r.FunctionError, r.Payload)
	}
	sb.call(map[string]any{"action": "echo"}, nil)
	// A panicking Go function reports the panic and then exits; whether
	// the next invocation sees a fresh runtime or the exit is the agent's
	// business, so nothing is invoked after it.
	r = sb.invoke(map[string]any{"action": "panic"}, 30*time.Second)
	if r.FunctionError != "Unhandled" {
		t.Errorf("panic action: FunctionError %q payload %s, want Unhandled", r.FunctionError, r.Payload)
	}
}

func (s *suite) testTimeout(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	r := sb.invoke(map[string]any{"action": "sleep", "ms": 60000}, time.Second)
	if r.FunctionError != "Unhandled" || !r.Reset || !strings.Contains(string(r.Payload), "Task timed out") {
		t.Errorf("timeout: FunctionError %q Reset %v payload %s, want Unhandled, Reset and Task timed out",
			r.FunctionError, r.Reset, r.Payload)
	}
	// The runtime was killed; the next invocation re-runs INIT and works.
	sb.call(map[string]any{"action": "echo"}, nil)
}

func (s *suite) testRuntimeCrash(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	r := sb.invoke(map[string]any{"action": "exit", "code": 3}, 30*time.Second)
	if r.FunctionError != "Unhandled" || r.ErrorType != "Runtime.ExitError" || !r.Reset {
		t.Errorf("exit 3: FunctionError %q ErrorType %q Reset %v payload %s, want Unhandled Runtime.ExitError Reset",
			r.FunctionError, r.ErrorType, r.Reset, r.Payload)
	}
	var a echoAnswer
	r = sb.call(map[string]any{"action": "echo"}, &a)
	if r.InitDuration <= 0 {
		t.Errorf("invocation after a crash reports no InitDuration: INIT did not run again")
	}
}

// testResetKillsStrays: a process the function left behind in a session of
// its own does not survive the reset after the runtime dies, so nothing of
// one invocation leaks into the next runtime's environment.
func (s *suite) testResetKillsStrays(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	var d outcome
	sb.call(map[string]any{"action": "daemon"}, &d)
	if d.Error != "" || d.PID <= 0 {
		t.Fatalf("starting a daemon: pid %d, error %q", d.PID, d.Error)
	}
	var before outcome
	sb.call(map[string]any{"action": "ps"}, &before)
	if !running(before, d.PID) {
		t.Fatalf("the daemon (pid %d) is not running before the reset: %+v", d.PID, before.Procs)
	}
	r := sb.invoke(map[string]any{"action": "exit", "code": 3}, 30*time.Second)
	if !r.Reset {
		t.Fatalf("exit 3 did not reset the runtime: %+v", r.Result)
	}
	// SIGKILL is delivered at once but a process needs a moment to die,
	// so the check polls (bounded) rather than looking once.
	var ps outcome
	for range 100 {
		ps = outcome{}
		sb.call(map[string]any{"action": "ps"}, &ps)
		if len(ps.Procs) == 0 {
			t.Fatalf("ps saw no processes: %q", ps.Error)
		}
		if !running(ps, d.PID) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("the daemon (pid %d) survived the reset: %+v", d.PID, ps.Procs)
}

// running reports whether ps shows pid as a live (not zombie) process.
func running(ps outcome, pid int) bool {
	for _, p := range ps.Procs {
		if p.PID == pid && p.State != "Z" {
			return true
		}
	}
	return false
}

func (s *suite) testOutputFlood(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	const n = 8 << 20
	var o outcome
	r := sb.call(map[string]any{"action": "spam", "bytes": n}, &o)
	if o.Bytes != n || r.LogBytes < n {
		t.Errorf("spam: wrote %d, LogBytes %d, want both >= %d", o.Bytes, r.LogBytes, n)
	}
	if len(r.Log) >= n {
		t.Errorf("log of %d bytes was not capped", len(r.Log))
	}
	sb.call(map[string]any{"action": "echo"}, nil)
}

func (s *suite) testMemoryLimit(t *testing.T) {
	requireRoot(t)
	e := s.env(t)
	sp := e.spec()
	sp.MemoryMB = 128
	sb := e.start(t, sp)
	sb.init()
	// The function's processes are the OOM killer's first choice, before
	// the agent's (and the host's).
	var adj outcome
	sb.call(map[string]any{"action": "read-file", "path": "/proc/self/oom_score_adj"}, &adj)
	if strings.TrimSpace(adj.Data) != "1000" {
		t.Errorf("the function's oom_score_adj is %q (%s), want 1000", adj.Data, adj.Error)
	}
	r := sb.invoke(map[string]any{"action": "alloc", "mb": 1024}, 60*time.Second)
	t.Logf("alloc 1024 MB: %s %s %s", r.FunctionError, r.ErrorType, r.Payload)
	if r.FunctionError != "Unhandled" || !r.Reset {
		t.Errorf("alloc 1024 MB in 128 MB: FunctionError %q Reset %v payload %s, want Unhandled and Reset",
			r.FunctionError, r.Reset, r.Payload)
	}
	// The sandbox survives its runtime's OOM, and the host starts more.
	sb.call(map[string]any{"action": "echo"}, nil)
	other := e.start(t, e.spec())
	other.init()
	other.call(map[string]any{"action": "echo"}, nil)
}

func (s *suite) testEphemeralLimit(t *testing.T) {
	requireRoot(t)
	e := s.env(t)
	sp := e.spec()
	sp.MemoryMB, sp.EphemeralMB = 512, 32
	sb := e.start(t, sp)
	sb.init()
	name := randomID("fill")
	var o outcome
	sb.call(map[string]any{"action": "fill-tmp", "mb": 128, "name": name}, &o)
	if !strings.Contains(o.Error, "no space left on device") {
		t.Errorf("filling /tmp past 32 MB: error %q after %d bytes, want no space left on device", o.Error, o.Bytes)
	}
	if o.Bytes > 33<<20 {
		t.Errorf("wrote %d bytes to a 32 MB /tmp", o.Bytes)
	}
	if _, err := os.Stat("/tmp/" + name); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the sandbox's /tmp file is visible on the host: %v", err)
	}
	// The full /tmp stays full: the file lives on in the sandbox.
	var again outcome
	sb.call(map[string]any{"action": "fill-tmp", "mb": 1, "name": name + "-2"}, &again)
	if !strings.Contains(again.Error, "no space left on device") {
		t.Errorf("writing to the full /tmp again: error %q after %d bytes, want no space left on device", again.Error, again.Bytes)
	}
}

// testTmpBeyondMemory: /tmp is storage, not memory, as on Lambda: a
// function of 128 MB fills 192 MB of its 512 MB /tmp, and still answers.
func (s *suite) testTmpBeyondMemory(t *testing.T) {
	requireRoot(t)
	e := s.env(t)
	sp := e.spec()
	sp.MemoryMB, sp.EphemeralMB = 128, 512
	sb := e.start(t, sp)
	sb.init()
	var o outcome
	sb.call(map[string]any{"action": "fill-tmp", "mb": 192, "name": randomID("big")}, &o)
	if o.Error != "" || o.Bytes != 192<<20 {
		t.Errorf("writing 192 MB to /tmp with 128 MB of memory: error %q after %d bytes, want all of it written", o.Error, o.Bytes)
	}
	sb.call(map[string]any{"action": "echo"}, nil)
}

func (s *suite) testForkBomb(t *testing.T) {
	requireRoot(t)
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	const max = 4096
	var o outcome
	sb.call(map[string]any{"action": "forkbomb", "max": max}, &o)
	t.Logf("fork bomb: %d children, then %q", o.Count, o.Error)
	// Lambda allows 1,024 processes and threads per environment.
	if o.Count >= max || o.Count > 1024 || o.Error == "" {
		t.Errorf("fork bomb started %d children (error %q); want it stopped by a limit of at most 1024", o.Count, o.Error)
	}
	if o.Count == 0 {
		t.Errorf("fork bomb could not start a single child: %q", o.Error)
	}
	sb.call(map[string]any{"action": "echo"}, nil)
	other := e.start(t, e.spec())
	other.init()
	other.call(map[string]any{"action": "echo"}, nil)
}

func (s *suite) testReadOnlyRoot(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	for _, p := range []string{"/usr/x", "/var/task/x", "/x", "/etc/passwd"} {
		var o outcome
		sb.call(map[string]any{"action": "write-file", "path": p, "data": "x"}, &o)
		if !strings.Contains(o.Error, "read-only file system") {
			t.Errorf("writing %s: error %q, want read-only file system", p, o.Error)
		}
	}
	var o outcome
	sb.call(map[string]any{"action": "write-file", "path": "/tmp/x", "data": "x"}, &o)
	if o.Error != "" {
		t.Errorf("writing /tmp/x: %s", o.Error)
	}
	if _, err := os.Stat("/usr/x"); err == nil {
		t.Errorf("/usr/x exists on the host")
	}
}

func (s *suite) testShutdown(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	sb.call(map[string]any{"action": "echo"}, nil)
	if err := sb.conn.WriteFrame(protocol.TypeShutdown, protocol.Shutdown{}); err != nil {
		t.Fatal(err)
	}
	sb.read(protocol.TypeShutdownDone)
	select {
	case <-sb.inst.Done():
	case <-time.After(e.opts.StopTimeout):
		t.Fatalf("Done not closed after the agent shut down")
	}
	stopAndCheck(t, e, sb)
}

func (s *suite) testStopRemovesEverything(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	sb.call(map[string]any{"action": "echo"}, nil)
	if len(leftovers(sb.spec.ID, 0, e.stateDir)) == 0 {
		t.Logf("note: the driver keeps nothing named after the instance on the host; leftover checks are weak")
	}
	stopAndCheck(t, e, sb)
	select {
	case <-sb.inst.Done():
	default:
		t.Errorf("Done not closed after Stop")
	}
	if _, err := sb.conn.ReadFrame(); err == nil {
		t.Errorf("the stream still delivers frames after Stop")
	}
}

func stopAndCheck(t *testing.T, e *env, sb *sandbox) {
	t.Helper()
	pid := 0
	if hp, ok := sb.inst.(HostProcess); ok {
		pid = hp.PID()
	}
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StopTimeout)
	defer cancel()
	if err := e.d.Stop(ctx, sb.spec.ID); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	waitNoLeftovers(t, sb.spec.ID, pid, e.stateDir)
}

func (s *suite) testStopIdempotent(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // cleanup must complete even with a cancelled context
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.d.Stop(ctx, sb.spec.ID)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("concurrent Stop %d: %v", i, err)
		}
	}
	if err := e.d.Stop(context.Background(), sb.spec.ID); err != nil {
		t.Errorf("Stop of a stopped instance: %v", err)
	}
	if err := e.d.Stop(context.Background(), "never-started"); err != nil {
		t.Errorf("Stop of an unknown instance: %v", err)
	}
	pid := 0
	if hp, ok := sb.inst.(HostProcess); ok {
		pid = hp.PID()
	}
	waitNoLeftovers(t, sb.spec.ID, pid, e.stateDir)
}

// testStopWhileBusy stops an instance in the middle of an invocation: the
// harness's reader sees the stream end and nothing is left.
func (s *suite) testStopWhileBusy(t *testing.T) {
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	inv := protocol.Invoke{
		RequestID:      randomID("req"),
		DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli(),
		FunctionARN:    sb.initMsg().FunctionARN,
	}
	if err := sb.conn.WriteFrame(protocol.TypeInvoke, inv, []byte(`{"action":"sleep","ms":60000}`)); err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		_, err := sb.conn.ReadFrame()
		got <- err
	}()
	stopAndCheck(t, e, sb)
	select {
	case err := <-got:
		if err == nil {
			t.Errorf("a frame arrived for an invocation whose instance was stopped")
		}
	case <-time.After(e.opts.StopTimeout):
		t.Errorf("the harness's pending read did not end after Stop")
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
