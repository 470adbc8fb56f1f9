package vmmtest

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/runtimes"
)

// Driver is what a VM driver built on package vmm implements.
type Driver interface {
	driver.Driver
	driver.Closer
	driver.Preparer
	driver.RuntimeDetector
}

// Env is a driver under test whose VMM is a stand-in, made by the
// driver's tests for RunFakeSuite. The stand-in plays the VM by its
// instance ID's prefix:
//
//	ok-        prints "fake console: booted <id>" on its console, sends
//	           the ready line, "HELLO", then echoes; exits 0 when the
//	           driver asks it to (Machine.Ask)
//	stubborn-  ignores every request to exit
//	exit-      prints "fake failure for <id>" on stderr and exits 1 at once
//	garbage-   sends another line instead of the ready line
//	die-       exits 0 right after the ready line
type Env struct {
	Driver   Driver
	Images   *FakeImages
	StateDir string
	// CacheDir is the driver's image cache (what DetectRuntimes reads).
	CacheDir string
	// CodeDir holds the function's code (a bootstrap file).
	CodeDir string
	// Kernel is a file standing in for the guest kernel.
	Kernel string
	// VMM names the VMM in messages ("qemu").
	VMM string
	// Restart returns a second driver on StateDir with the same stand-in
	// and images, as a restarted harness makes. The suite closes it.
	Restart func(t *testing.T) Driver
	// Gone, if set, fails t if instance id left more than its process and
	// instance directory behind (processes naming it, cgroups); it is
	// called after those were checked.
	Gone func(t *testing.T, id string)
	// Failures are the stand-in's own failing modes: instance ID -> what
	// Start's error must say (with Tuning.ReadyTimeout 1 s). A mode that
	// never sends the ready line should say "vm not ready within 1s".
	Failures map[string]string
}

// NewEnv returns an Env with fake images, temporary state, cache and
// code directories (CodeDir holds a bootstrap) and a stand-in kernel, for
// a driver whose VMM is named vmm. The driver's tests set the rest.
func NewEnv(t testing.TB, vmm string) *Env {
	t.Helper()
	e := &Env{
		Images: NewFakeImages(t), StateDir: t.TempDir(), CacheDir: t.TempDir(), CodeDir: t.TempDir(),
		Kernel: filepath.Join(t.TempDir(), "vmlinux"), VMM: vmm,
	}
	if err := os.WriteFile(e.Kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.CodeDir, "bootstrap"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return e
}

// Tuning is how the suite wants a driver configured.
type Tuning struct {
	StopGrace    time.Duration
	ReadyTimeout time.Duration
}

// Spec is a valid spec for instance id running the code in e.CodeDir.
func (e *Env) Spec(id string) driver.Spec {
	return driver.Spec{
		ID: id, Function: "f", RevisionID: "r",
		Runtime:  runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided},
		CodeDir:  e.CodeDir,
		MemoryMB: 128, EphemeralMB: 16,
	}
}

// Start starts instance id of e.Spec(id) and fails t if it cannot.
func (e *Env) Start(t testing.TB, id string) driver.Instance {
	t.Helper()
	inst, err := e.Driver.Start(context.Background(), e.Spec(id))
	if err != nil {
		t.Fatalf("Start(%s): %v", id, err)
	}
	return inst
}

// AssertGone fails t unless instance id, whose VMM was pid (0: unknown),
// left nothing behind.
func (e *Env) AssertGone(t *testing.T, id string, pid int) {
	t.Helper()
	AssertGone(t, e.StateDir, id, pid, e.VMM)
	if e.Gone != nil {
		e.Gone(t, id)
	}
}

// RunFakeSuite runs what every VM driver must do with a stand-in VMM
// (see Env): the Start, Stop, Close and Recover sequences of package vmm
// as each driver drives them, and Prepare and DetectRuntimes. newEnv
// makes a new driver for each test, configured by tu, closed when the
// test ends.
func RunFakeSuite(t *testing.T, newEnv func(t *testing.T, tu Tuning) *Env) {
	def := Tuning{StopGrace: time.Second, ReadyTimeout: 10 * time.Second}
	tests := []struct {
		name string
		tu   Tuning
		run  func(t *testing.T, e *Env)
	}{
		{"StartConnStop", def, testStartConnStop},
		{"StopForcesStubbornVM", Tuning{StopGrace: 200 * time.Millisecond, ReadyTimeout: def.ReadyTimeout}, testStopStubborn},
		{"StartFailures", Tuning{StopGrace: def.StopGrace, ReadyTimeout: time.Second}, testStartFailures},
		{"StartCancelledDuringImages", def, testStartCancelled},
		{"InvalidSpecs", def, testInvalidSpecs},
		{"CloseStopsAll", def, testCloseStopsAll},
		{"VMExitClosesDone", def, testVMExit},
		{"Recover", def, testRecover},
		{"RecoverSkipsOwnInstances", def, testRecoverSkipsOwn},
		{"Prepare", def, testPrepare},
		{"DetectRuntimes", def, testDetectRuntimes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.run(t, newEnv(t, tc.tu)) })
	}
}

func pidOf(t *testing.T, inst driver.Instance) int {
	t.Helper()
	hp, ok := inst.(interface{ PID() int })
	if !ok {
		t.Fatalf("instance %T has no PID", inst)
	}
	return hp.PID()
}

func testStartConnStop(t *testing.T, e *Env) {
	inst := e.Start(t, "ok-1")
	// The bytes right after the ready line belong to the protocol: none
	// may be lost to the handshake.
	buf := make([]byte, 5)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "HELLO" {
		t.Fatalf("first bytes after the handshake = %q, %v; want HELLO", buf, err)
	}
	if _, err := inst.Conn().Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 4)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	pid := pidOf(t, inst)
	rec, err := hostproc.ReadRecord[vmm.Record](filepath.Join(e.StateDir, "ok-1"))
	if err != nil {
		t.Fatal(err)
	}
	if rec.ID != "ok-1" || rec.Function != "f" || rec.RevisionID != "r" || rec.PID != pid || rec.StartTime == 0 || rec.Created.IsZero() {
		t.Errorf("record %+v does not describe %s %d", rec, e.VMM, pid)
	}
	// The console is drained into the log and kept for errors.
	ct, ok := inst.(interface{ ConsoleTail() string })
	if !ok {
		t.Fatalf("instance %T has no ConsoleTail", inst)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(ct.ConsoleTail(), "fake console: booted ok-1") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := ct.ConsoleTail(); !strings.Contains(got, "booted ok-1") {
		t.Errorf("console = %q", got)
	}
	if err := e.Driver.Stop(context.Background(), "ok-1"); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-inst.Done():
	default:
		t.Errorf("Done not closed after Stop")
	}
	e.AssertGone(t, "ok-1", pid)
	if _, err := inst.Conn().Read(buf); err == nil {
		t.Errorf("Conn still readable after Stop")
	}
	if err := e.Driver.Stop(context.Background(), "ok-1"); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func testStopStubborn(t *testing.T, e *Env) {
	inst := e.Start(t, "stubborn-1")
	pid := pidOf(t, inst)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // cleanup must complete even with a cancelled context
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := e.Driver.Stop(ctx, "stubborn-1"); err != nil {
				t.Errorf("Stop: %v", err)
			}
		}()
	}
	wg.Wait()
	e.AssertGone(t, "stubborn-1", pid)
}

func testStartFailures(t *testing.T, e *Env) {
	want := map[string]string{
		"exit-1":    "fake failure for exit-1",
		"garbage-1": `instead of "INVOKEX-AGENT-READY"`,
	}
	for id, w := range e.Failures {
		want[id] = w
	}
	for id, w := range want {
		inst, err := e.Driver.Start(context.Background(), e.Spec(id))
		if err == nil {
			t.Errorf("Start(%s) succeeded", id)
			continue
		}
		if inst != nil {
			t.Errorf("Start(%s) returned an instance with its error", id)
		}
		if !strings.Contains(err.Error(), w) || !strings.Contains(err.Error(), "starting vm "+id) {
			t.Errorf("Start(%s): %v; want it to say %q", id, err, w)
		}
		e.AssertGone(t, id, 0)
	}
}

func testStartCancelled(t *testing.T, e *Env) {
	e.Images.Block = true
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := e.Driver.Start(ctx, e.Spec("ok-cancel")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want DeadlineExceeded", err)
	}
	e.AssertGone(t, "ok-cancel", 0)
	// Stop during a start: the start is aborted and cleaned up.
	done := make(chan error, 1)
	go func() {
		_, err := e.Driver.Start(context.Background(), e.Spec("ok-stopped"))
		done <- err
	}()
	for e.Images.Roots.Load() < 2 {
		time.Sleep(time.Millisecond)
	}
	if err := e.Driver.Stop(context.Background(), "ok-stopped"); err != nil {
		t.Fatalf("Stop during Start: %v", err)
	}
	if err := <-done; err == nil {
		t.Fatalf("Start succeeded although stopped")
	}
	e.AssertGone(t, "ok-stopped", 0)
}

func testInvalidSpecs(t *testing.T, e *Env) {
	for name, mutate := range map[string]func(*driver.Spec){
		"bad id":        func(s *driver.Spec) { s.ID = "A_B" },
		"long id":       func(s *driver.Spec) { s.ID = strings.Repeat("a", 41) },
		"small memory":  func(s *driver.Spec) { s.MemoryMB = vmm.MinMemoryMB - 1 },
		"no ephemeral":  func(s *driver.Spec) { s.EphemeralMB = 0 },
		"relative code": func(s *driver.Spec) { s.CodeDir = "code" },
		"missing rt":    func(s *driver.Spec) { s.RuntimeDir = "/nonexistent" },
	} {
		sp := e.Spec("ok-inv")
		mutate(&sp)
		if _, err := e.Driver.Start(context.Background(), sp); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: %v, want ErrInvalidParameter", name, err)
		}
	}
	e.Start(t, "ok-dup")
	if _, err := e.Driver.Start(context.Background(), e.Spec("ok-dup")); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("duplicate ID: %v, want ErrAlreadyExists", err)
	}
}

func testCloseStopsAll(t *testing.T, e *Env) {
	a, b := e.Start(t, "ok-a"), e.Start(t, "stubborn-b")
	if err := e.Driver.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	e.AssertGone(t, "ok-a", pidOf(t, a))
	e.AssertGone(t, "stubborn-b", pidOf(t, b))
	if _, err := e.Driver.Start(context.Background(), e.Spec("ok-c")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start after Close: %v, want ErrUnavailable", err)
	}
	if err := e.Driver.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func testVMExit(t *testing.T, e *Env) {
	inst := e.Start(t, "die-1")
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("Done not closed after %s exited", e.VMM)
	}
	if err := e.Driver.Stop(context.Background(), "die-1"); err != nil {
		t.Fatal(err)
	}
	e.AssertGone(t, "die-1", 0)
}

// testRecover: a second driver on the same state directory (a restarted
// harness) kills the first one's VMs, found by their record or, when the
// record has no pid yet, by the VMM's command line; it removes every
// instance directory, and it never kills a process that is not that
// instance's VMM even if a record names it.
func testRecover(t *testing.T, e *Env) {
	byRecord := e.Start(t, "ok-rec")
	byName := e.Start(t, "ok-noid")
	pids := map[string]int{"ok-rec": pidOf(t, byRecord), "ok-noid": pidOf(t, byName)}
	// The record as a crash right before the pid was recorded leaves it.
	dir := filepath.Join(e.StateDir, "ok-noid")
	rec, err := hostproc.ReadRecord[map[string]any](dir)
	if err != nil {
		t.Fatal(err)
	}
	delete(*rec, "pid")
	delete(*rec, "start_time")
	if err := hostproc.WriteRecord(dir, rec); err != nil {
		t.Fatal(err)
	}
	// A record naming a live process that is not the VMM.
	sleeper := StartSleeper(t)
	sp, err := hostproc.Lookup(sleeper.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	strangerDir := filepath.Join(e.StateDir, "stranger")
	os.Mkdir(strangerDir, 0o700)
	hostproc.WriteRecord(strangerDir, &vmm.Record{ID: "stranger", PID: sp.PID, StartTime: sp.StartTime})
	// A directory without a record (crash right after mkdir).
	os.Mkdir(filepath.Join(e.StateDir, "bare"), 0o700)

	d2 := e.Restart(t)
	defer d2.Close(context.Background())
	insts, err := d2.Recover(context.Background())
	if err != nil || len(insts) != 0 {
		t.Fatalf("Recover = %v, %v; want no instances and no error", insts, err)
	}
	for _, inst := range []driver.Instance{byRecord, byName} {
		select {
		case <-inst.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("%s survived Recover", inst.ID())
		}
		e.AssertGone(t, inst.ID(), pids[inst.ID()])
	}
	for _, id := range []string{"stranger", "bare"} {
		e.AssertGone(t, id, 0)
	}
	if !PIDAlive(sleeper.Process.Pid) {
		t.Errorf("Recover killed a process that was not %s", e.VMM)
	}
	// The first driver's Stop after that finds nothing left to do.
	if err := e.Driver.Stop(context.Background(), "ok-rec"); err != nil {
		t.Errorf("Stop after Recover: %v", err)
	}
}

func testRecoverSkipsOwn(t *testing.T, e *Env) {
	inst := e.Start(t, "ok-own")
	if _, err := e.Driver.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inst.Done():
		t.Fatalf("Recover killed its own driver's instance")
	default:
	}
}

// testPrepare: Prepare makes the root and code images Start uses, with
// the key Start uses.
func testPrepare(t *testing.T, e *Env) {
	sp := e.Spec("")
	if err := e.Driver.Prepare(context.Background(), sp); err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	key, err := vmm.CodeKey(sp)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := e.Images.CodeKeys.Load(key); !ok || e.Images.Roots.Load() != 1 {
		t.Errorf("Prepare made %d roots and not the code image %s", e.Images.Roots.Load(), key)
	}
	e.Start(t, "ok-prepared")
	n := 0
	e.Images.CodeKeys.Range(func(any, any) bool { n++; return true })
	if n != 1 {
		t.Errorf("Start used %d code keys, want the prepared one only", n)
	}
	for name, mutate := range map[string]func(*driver.Spec){
		"no runtime": func(s *driver.Spec) { s.Runtime = runtimes.Runtime{} },
		"no code":    func(s *driver.Spec) { s.CodeDir = "" },
	} {
		bad := e.Spec("")
		mutate(&bad)
		if err := e.Driver.Prepare(context.Background(), bad); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("Prepare with %s: %v, want ErrInvalidParameter", name, err)
		}
	}
	e.Images.Block = true
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := e.Driver.Prepare(ctx, sp); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Prepare cut short: %v, want DeadlineExceeded", err)
	}
}

// testDetectRuntimes: the runtimes are those of the driver's image cache.
func testDetectRuntimes(t *testing.T, e *Env) {
	ctx := context.Background()
	got, want := e.Driver.DetectRuntimes(ctx), guest.DetectRuntimes(ctx, e.CacheDir)
	if len(got) == 0 || len(got) != len(want) {
		t.Fatalf("DetectRuntimes = %d runtimes, want %d", len(got), len(want))
	}
	for n := range want {
		if got[n].ID != want[n].ID || got[n].Available != want[n].Available || got[n].Reason != want[n].Reason {
			t.Errorf("runtime %d = %+v, want %+v", n, got[n], want[n])
		}
	}
}
