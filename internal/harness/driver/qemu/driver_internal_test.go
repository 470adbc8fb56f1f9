package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
)

// fakeEnv is a driver whose QEMU is the stand-in of fakeqemu_test.go.
type fakeEnv struct {
	*vmmtest.Env
	d    *Driver
	qemu string
}

func newFakeEnv(t *testing.T, mutate ...func(*Options)) *fakeEnv {
	t.Helper()
	e := &fakeEnv{Env: vmmtest.NewEnv(t, "qemu"), qemu: fakeQEMUPath(t)}
	e.Failures = map[string]string{"hang-1": "vm not ready within 1s"}
	opts := Options{
		StateDir: e.StateDir, CacheDir: e.CacheDir, QEMUPath: e.qemu, KernelPath: e.Kernel, Accel: "tcg",
		Logger: hostproctest.Logger(t), StopGrace: time.Second, ReadyTimeout: 10 * time.Second,
		// The stand-in is the test binary, which other users may not be
		// allowed to run; TestVMUsers covers the users.
		KeepUser: true,
		// The stand-in cannot be a spare (TestSpare* boot real ones).
		SpareVMs: -1,
	}
	for _, m := range mutate {
		m(&opts)
	}
	e.d = newTestDriver(t, opts, e.Images)
	e.Driver = e.d
	e.Restart = func(t *testing.T) vmmtest.Driver {
		o := opts
		o.StopGrace, o.ReadyTimeout = 0, 0
		return newTestDriver(t, o, e.Images)
	}
	e.Gone = func(t *testing.T, id string) {
		if p := vmmtest.ProcessesWithArg(vmName(id)); len(p) > 0 {
			t.Errorf("qemu processes of %s left: %v", id, p)
		}
	}
	return e
}

// newTestDriver is newDriver, closed when t ends.
func newTestDriver(t *testing.T, opts Options, images *vmmtest.FakeImages) *Driver {
	t.Helper()
	d, err := newDriver(opts, images)
	return vmmtest.Opened(t, d, err)
}

func startFake(t *testing.T, e *fakeEnv, id string) *instance {
	t.Helper()
	return e.Start(t, id).(*instance)
}

// TestFake runs what every VM driver must do against the stand-in QEMU.
func TestFake(t *testing.T) {
	vmmtest.RunFakeSuite(t, func(t *testing.T, tu vmmtest.Tuning) *vmmtest.Env {
		return newFakeEnv(t, func(o *Options) { o.StopGrace, o.ReadyTimeout = tu.StopGrace, tu.ReadyTimeout }).Env
	})
}

// TestRecordAndDisks checks what the driver keeps of a running VM: its
// record names QEMU and its sockets, its scratch disk is sized by
// EphemeralMB, and isOurQEMU tells its QEMU from others.
func TestRecordAndDisks(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-1")
	rec, err := hostproc.ReadRecord[record](inst.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if rec.PID != inst.PID() || rec.StartTime == 0 || rec.QEMU != e.qemu || rec.AgentSocket != agentSock || rec.QMPSocket != qmpSock || rec.UID != 0 {
		t.Errorf("record %+v does not describe qemu %d", rec, inst.PID())
	}
	if fi, err := os.Stat(filepath.Join(inst.Dir(), scratchImage)); err != nil || fi.Size() != 16<<20 {
		t.Errorf("scratch image: %v, %v", fi, err)
	}
	if !isOurQEMU(inst.PID(), e.qemu, "ok-1") || isOurQEMU(inst.PID(), e.qemu, "ok-2") || isOurQEMU(inst.PID(), "/usr/bin/qemu-system-x86_64", "ok-1") {
		t.Errorf("isOurQEMU(%d) does not tell its instance", inst.PID())
	}
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
	if st := inst.Cmd().ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
		t.Errorf("qemu ended with %v, want a clean exit after QMP quit", st)
	}
	e.AssertGone(t, "ok-graceful", pid)
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
	if _, err := newDriver(Options{StateDir: t.TempDir(), QEMUPath: fakeQEMUPath(t), KernelPath: "/etc/hostname", TCGCacheMB: -1}, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("negative TCGCacheMB: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	e := newFakeEnv(t)
	got := strings.Join(e.d.Describe(), "\n")
	wants := []string{"TCG software emulation (requested)"}
	if os.Geteuid() == 0 {
		wants = append(wants, "qemu runs as root, not as a user per vm: KeepUser set")
	}
	for _, want := range wants {
		if !strings.Contains(got, want) {
			t.Errorf("Describe() = %q, lacks %q", got, want)
		}
	}
	// Without a network manager, networked VMs use slirp, which reaches
	// the host: said once one had a network, not before.
	if strings.Contains(got, sharedNetNote) {
		t.Errorf("Describe() = %q before any vm had a network", got)
	}
	sp := e.Spec("ok-net")
	sp.Network = true
	if _, err := e.d.Start(context.Background(), sp); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(e.d.Describe(), "\n"); !strings.Contains(got, sharedNetNote) {
		t.Errorf("Describe() = %q after a vm had a network on slirp", got)
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
	if fi, err := os.Stat(filepath.Join(a.Dir(), scratchImage)); err != nil || fi.Sys().(*syscall.Stat_t).Uid != uint32(ua) {
		t.Errorf("scratch image not owned by the vm user: %v", err)
	}
	rec, _ := hostproc.ReadRecord[record](a.Dir())
	if rec == nil || rec.UID != ua {
		t.Errorf("record %+v lacks the vm user %d", rec, ua)
	}
	// The instance directory stays the driver's.
	if fi, err := os.Stat(a.Dir()); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 0 || fi.Mode().Perm() != 0o700 {
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
