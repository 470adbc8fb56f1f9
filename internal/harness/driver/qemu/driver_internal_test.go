package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/runtimes"
)

// fakeImages makes empty image files and counts its calls.
type fakeImages struct {
	dir      string
	roots    atomic.Int32
	codeKeys sync.Map
	// block, if set, makes Root wait for ctx (a slow image build).
	block bool
}

func (f *fakeImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	f.roots.Add(1)
	if f.block {
		<-ctx.Done()
		return "", ctx.Err()
	}
	p := filepath.Join(f.dir, rt.ID+".ext4")
	return p, os.WriteFile(p, nil, 0o644)
}

func (f *fakeImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	f.codeKeys.Store(key, codeDir)
	p := filepath.Join(f.dir, "code-"+key+".ext4")
	return p, os.WriteFile(p, nil, 0o644)
}

func (f *fakeImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	fh, err := os.Create(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	return fh.Truncate(int64(sizeMB) << 20)
}

type fakeEnv struct {
	d        *Driver
	images   *fakeImages
	stateDir string
	code     string
	qemu     string
}

func newFakeEnv(t *testing.T, mutate ...func(*Options)) *fakeEnv {
	t.Helper()
	e := &fakeEnv{stateDir: t.TempDir(), code: t.TempDir(), qemu: fakeQEMUPath(t)}
	e.images = &fakeImages{dir: t.TempDir()}
	kernel := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.code, "bootstrap"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := Options{
		StateDir: e.stateDir, QEMUPath: e.qemu, KernelPath: kernel, Accel: "tcg",
		Logger: hostproctest.Logger(t), StopGrace: time.Second, ReadyTimeout: 10 * time.Second,
		// The stand-in is the test binary, which other users may not be
		// allowed to run; TestVMUsers covers the users.
		KeepUser: true,
	}
	for _, m := range mutate {
		m(&opts)
	}
	d, err := newDriver(opts, e.images)
	if err != nil {
		t.Fatalf("newDriver: %v", err)
	}
	e.d = d
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

func (e *fakeEnv) spec(id string) driver.Spec {
	return driver.Spec{
		ID: id, Function: "f", RevisionID: "r",
		Runtime:  runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided},
		CodeDir:  e.code,
		MemoryMB: 128, EphemeralMB: 16,
	}
}

func startFake(t *testing.T, e *fakeEnv, id string) *instance {
	t.Helper()
	inst, err := e.d.Start(context.Background(), e.spec(id))
	if err != nil {
		t.Fatalf("Start(%s): %v", id, err)
	}
	return inst.(*instance)
}

// assertGone fails unless the process and the instance directory are gone.
func assertGone(t *testing.T, e *fakeEnv, id string, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for pid > 0 && pidAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pid > 0 && pidAlive(pid) {
		t.Errorf("qemu %d still running", pid)
	}
	if _, err := os.Stat(filepath.Join(e.stateDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("instance directory of %s left: %v", id, err)
	}
}

func pidAlive(pid int) bool {
	p, err := hostproc.Lookup(pid)
	return err == nil && p.Running()
}

func TestStartConnStop(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-1")
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
	rec, err := hostproc.ReadRecord[record](inst.dir)
	if err != nil {
		t.Fatal(err)
	}
	if rec.PID != inst.PID() || rec.StartTime == 0 || rec.QEMU != e.qemu || rec.AgentSocket != agentSock {
		t.Errorf("record %+v does not describe qemu %d", rec, inst.PID())
	}
	if fi, err := os.Stat(filepath.Join(inst.dir, scratchImage)); err != nil || fi.Size() != 16<<20 {
		t.Errorf("scratch image: %v, %v", fi, err)
	}
	if !isOurQEMU(inst.PID(), e.qemu, "ok-1") || isOurQEMU(inst.PID(), e.qemu, "ok-2") {
		t.Errorf("isOurQEMU(%d) does not tell its instance", inst.PID())
	}
	// The console is drained into the log and kept for errors.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(inst.console.LastLines(), "fake console: booted ok-1") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := inst.console.LastLines(); !strings.Contains(got, "booted ok-1") {
		t.Errorf("console = %q", got)
	}
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-1"); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-inst.Done():
	default:
		t.Errorf("Done not closed after Stop")
	}
	assertGone(t, e, "ok-1", pid)
	if _, err := inst.Conn().Read(buf); err == nil {
		t.Errorf("Conn still readable after Stop")
	}
	if err := e.d.Stop(context.Background(), "ok-1"); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

func TestStopForcesStubbornVM(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = 200 * time.Millisecond })
	inst := startFake(t, e, "stubborn-1")
	pid := inst.PID()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // cleanup must complete even with a cancelled context
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := e.d.Stop(ctx, "stubborn-1"); err != nil {
				t.Errorf("Stop: %v", err)
			}
		}()
	}
	wg.Wait()
	assertGone(t, e, "stubborn-1", pid)
}

func TestStopGraceful(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = time.Minute })
	inst := startFake(t, e, "ok-graceful")
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-graceful"); err != nil {
		t.Fatal(err)
	}
	// QMP quit made the fake exit by itself, before the (long) grace ran
	// out: it was not killed.
	select {
	case <-inst.Done():
	default:
		t.Fatal("Done not closed")
	}
	if st := inst.cmd.ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
		t.Errorf("qemu ended with %v, want a clean exit after QMP quit", st)
	}
	assertGone(t, e, "ok-graceful", pid)
}

func TestStartFailures(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.ReadyTimeout = time.Second })
	for id, want := range map[string]string{
		"exit-1":    "fake failure for exit-1",
		"garbage-1": "instead of its ready line",
		"hang-1":    "vm not ready within 1s",
	} {
		inst, err := e.d.Start(context.Background(), e.spec(id))
		if err == nil {
			t.Errorf("Start(%s) succeeded", id)
			continue
		}
		if inst != nil {
			t.Errorf("Start(%s) returned an instance with its error", id)
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Start(%s): %v; want it to say %q", id, err, want)
		}
		assertGone(t, e, id, 0)
		if len(processesNamed(id)) > 0 {
			t.Errorf("Start(%s) left a qemu running: %v", id, processesNamed(id))
		}
	}
}

// processesNamed lists pids whose command line contains s.
func processesNamed(s string) []string {
	var found []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) && e.Name() != "self" {
			var pid int
			if _, err := fmtSscan(e.Name(), &pid); err == nil && pidAlive(pid) && pid != os.Getpid() {
				found = append(found, e.Name())
			}
		}
	}
	return found
}

func TestStartCancelledDuringImages(t *testing.T) {
	e := newFakeEnv(t)
	e.images.block = true
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := e.d.Start(ctx, e.spec("ok-cancel")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want DeadlineExceeded", err)
	}
	assertGone(t, e, "ok-cancel", 0)
	// Stop during a start: the start is aborted and cleaned up.
	done := make(chan error, 1)
	go func() {
		_, err := e.d.Start(context.Background(), e.spec("ok-stopped"))
		done <- err
	}()
	for e.images.roots.Load() < 2 {
		time.Sleep(time.Millisecond)
	}
	if err := e.d.Stop(context.Background(), "ok-stopped"); err != nil {
		t.Fatalf("Stop during Start: %v", err)
	}
	if err := <-done; err == nil {
		t.Fatalf("Start succeeded although stopped")
	}
	assertGone(t, e, "ok-stopped", 0)
}

func TestInvalidSpecs(t *testing.T) {
	e := newFakeEnv(t)
	for name, mutate := range map[string]func(*driver.Spec){
		"bad id":        func(s *driver.Spec) { s.ID = "A_B" },
		"long id":       func(s *driver.Spec) { s.ID = strings.Repeat("a", 41) },
		"small memory":  func(s *driver.Spec) { s.MemoryMB = 64 },
		"no ephemeral":  func(s *driver.Spec) { s.EphemeralMB = 0 },
		"relative code": func(s *driver.Spec) { s.CodeDir = "code" },
		"missing rt":    func(s *driver.Spec) { s.RuntimeDir = "/nonexistent" },
	} {
		sp := e.spec("ok-inv")
		mutate(&sp)
		if _, err := e.d.Start(context.Background(), sp); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: %v, want ErrInvalidParameter", name, err)
		}
	}
	startFake(t, e, "ok-dup")
	if _, err := e.d.Start(context.Background(), e.spec("ok-dup")); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("duplicate ID: %v, want ErrAlreadyExists", err)
	}
}

func TestCloseStopsAll(t *testing.T) {
	e := newFakeEnv(t)
	a, b := startFake(t, e, "ok-a"), startFake(t, e, "stubborn-b")
	if err := e.d.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	assertGone(t, e, "ok-a", a.PID())
	assertGone(t, e, "stubborn-b", b.PID())
	if _, err := e.d.Start(context.Background(), e.spec("ok-c")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start after Close: %v, want ErrUnavailable", err)
	}
	if err := e.d.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestVMExitClosesDone(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "die-1")
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after qemu exited")
	}
	if err := e.d.Stop(context.Background(), "die-1"); err != nil {
		t.Fatal(err)
	}
	assertGone(t, e, "die-1", 0)
}

// TestRecover: a second driver on the same state directory (a restarted
// harness) kills the first one's VMs, found by their record or, when the
// record has no pid yet, by QEMU's command line; it removes every
// instance directory, and it never kills a process that is not that
// instance's QEMU even if a record names it.
func TestRecover(t *testing.T) {
	e := newFakeEnv(t)
	byRecord := startFake(t, e, "ok-rec")
	byName := startFake(t, e, "ok-noid")
	rec, err := hostproc.ReadRecord[record](byName.dir)
	if err != nil {
		t.Fatal(err)
	}
	rec.PID, rec.StartTime = 0, 0
	if err := hostproc.WriteRecord(byName.dir, rec); err != nil {
		t.Fatal(err)
	}
	// A record naming a live process that is not QEMU.
	sleeper := exec.Command("sleep", "60")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	sp, err := hostproc.Lookup(sleeper.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	strangerDir := filepath.Join(e.stateDir, "stranger")
	os.Mkdir(strangerDir, 0o700)
	hostproc.WriteRecord(strangerDir, &record{ID: "stranger", QEMU: e.qemu, PID: sp.PID, StartTime: sp.StartTime})
	// A directory without a record (crash right after mkdir).
	os.Mkdir(filepath.Join(e.stateDir, "bare"), 0o700)

	d2, err := newDriver(Options{
		StateDir: e.stateDir, QEMUPath: e.qemu, KernelPath: e.d.opts.KernelPath, Accel: "tcg", Logger: hostproctest.Logger(t), KeepUser: true,
	}, e.images)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close(context.Background())
	insts, err := d2.Recover(context.Background())
	if err != nil || len(insts) != 0 {
		t.Fatalf("Recover = %v, %v; want no instances and no error", insts, err)
	}
	for _, inst := range []*instance{byRecord, byName} {
		select {
		case <-inst.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("%s survived Recover", inst.id)
		}
		assertGone(t, e, inst.id, inst.PID())
	}
	for _, id := range []string{"stranger", "bare"} {
		assertGone(t, e, id, 0)
	}
	if !pidAlive(sleeper.Process.Pid) {
		t.Errorf("Recover killed a process that was not QEMU")
	}
	// The first driver's Stop after that finds nothing left to do.
	if err := e.d.Stop(context.Background(), "ok-rec"); err != nil {
		t.Errorf("Stop after Recover: %v", err)
	}
}

func TestRecoverSkipsOwnInstances(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-own")
	if _, err := e.d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inst.Done():
		t.Fatalf("Recover killed its own driver's instance")
	default:
	}
}

func TestCodeKey(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(a, "bootstrap"), []byte("one"), 0o755)
	os.WriteFile(filepath.Join(b, "bootstrap"), []byte("one"), 0o755)
	key := func(sp driver.Spec) string {
		k, err := codeKey(sp)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	ka, kb := key(driver.Spec{CodeDir: a}), key(driver.Spec{CodeDir: b})
	if ka != kb {
		t.Errorf("same content, different keys")
	}
	os.WriteFile(filepath.Join(b, "bootstrap"), []byte("two"), 0o755)
	if key(driver.Spec{CodeDir: b}) == ka {
		t.Errorf("different content, same key")
	}
	if key(driver.Spec{CodeDir: a, RuntimeDir: b}) == ka {
		t.Errorf("the runtime directory does not change the key")
	}
	s1 := key(driver.Spec{CodeDir: a, CodeSha256: "abc="})
	if s1 == ka || s1 != key(driver.Spec{CodeDir: b, CodeSha256: "abc="}) {
		t.Errorf("a digest must key the code by itself")
	}
	if strings.ContainsAny(ka, "/+=") {
		t.Errorf("key %q is not file-name safe", ka)
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := newDriver(Options{StateDir: t.TempDir(), QEMUPath: "/nonexistent/qemu", KernelPath: "/etc/hostname"}, nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("missing qemu: %v", err)
	}
	if _, err := newDriver(Options{StateDir: t.TempDir(), QEMUPath: fakeQEMUPath(t), KernelPath: "/nonexistent/vmlinux"}, nil); err == nil || !strings.Contains(err.Error(), "invokex guest kernel") {
		t.Errorf("missing kernel: %v", err)
	}
	if _, err := New(Options{StateDir: t.TempDir(), CacheDir: t.TempDir(), QEMUPath: fakeQEMUPath(t)}); err == nil || !strings.Contains(err.Error(), "no guest kernel") {
		t.Errorf("New without a kernel in the cache: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	e := newFakeEnv(t)
	got := strings.Join(e.d.Describe(), "\n")
	for _, want := range []string{"TCG software emulation (requested)", "no guest network"} {
		if !strings.Contains(got, want) {
			t.Errorf("Describe() = %q, lacks %q", got, want)
		}
	}
	if e.d.Name() != "qemu" {
		t.Errorf("Name() = %q", e.d.Name())
	}
}

// TestVMUsers: run as root, every VM's QEMU runs as a user of its own,
// and a stopped VM's user is reused.
func TestVMUsers(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("skipping: needs root to run QEMU as other users")
	}
	// The stand-in must be executable by the VM users: a copy in a
	// directory everyone may enter.
	dir, err := os.MkdirTemp("", "qemu-users-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	exe, _ := os.Executable()
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	fake := filepath.Join(dir, fakeQEMUName)
	if err := os.WriteFile(fake, b, 0o755); err != nil {
		t.Fatal(err)
	}
	e := newFakeEnv(t, func(o *Options) { o.KeepUser = false; o.QEMUPath = fake; o.UIDBase = 1<<30 + 12345 })
	a, b2 := startFake(t, e, "ok-ua"), startFake(t, e, "ok-ub")
	ua, ub := procUID(t, a.PID()), procUID(t, b2.PID())
	if ua != 1<<30+12345 || ub != 1<<30+12346 {
		t.Errorf("vm users %d and %d, want %d and %d", ua, ub, 1<<30+12345, 1<<30+12346)
	}
	if fi, err := os.Stat(filepath.Join(a.dir, scratchImage)); err != nil || fi.Sys().(*syscall.Stat_t).Uid != uint32(ua) {
		t.Errorf("scratch image not owned by the vm user: %v", err)
	}
	rec, _ := hostproc.ReadRecord[record](a.dir)
	if rec == nil || rec.UID != ua {
		t.Errorf("record %+v lacks the vm user %d", rec, ua)
	}
	// The instance directory stays the driver's.
	if fi, err := os.Stat(a.dir); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 0 || fi.Mode().Perm() != 0o700 {
		t.Errorf("instance directory: %v, %v", fi.Mode(), err)
	}
	if err := e.d.Stop(context.Background(), "ok-ua"); err != nil {
		t.Fatal(err)
	}
	c := startFake(t, e, "ok-uc")
	if uc := procUID(t, c.PID()); uc != ua {
		t.Errorf("a new vm got user %d, want the freed %d", uc, ua)
	}
}

func procUID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			var uid int
			fmt.Sscan(v, &uid)
			return uid
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return 0
}
