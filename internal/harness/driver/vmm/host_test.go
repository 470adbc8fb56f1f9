package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
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
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// fileImages makes empty images in dir and counts Close.
type fileImages struct {
	dir    string
	closed atomic.Int32
}

func (f *fileImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	p := filepath.Join(f.dir, rt.ID+".ext4")
	return p, os.WriteFile(p, nil, 0o644)
}

func (f *fileImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	p := filepath.Join(f.dir, key+".ext4")
	return p, os.WriteFile(p, nil, 0o644)
}

func (f *fileImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	return os.WriteFile(path, nil, 0o644)
}

func (f *fileImages) Close() { f.closed.Add(1) }

// testVM is a machine whose VMM is a shell command and whose agent is
// the far end of a pipe.
type testVM struct {
	*Instance
	h *testHost
	// agent is what the "guest" writes on its stream.
	agent    string
	asked    atomic.Int32
	released atomic.Int32
	// Of spares (spares_test.go): the record, the assignment the guest
	// got, the code image attached.
	spec     driver.Spec
	rec      Record
	assigned chan protocol.Assignment
	code     string
}

type testHost struct {
	*Host[*testVM]
	images *fileImages
	// vmm is the VMM's shell command; bootErr, if set, fails Boot after
	// the VMM started; releaseErr fails Release.
	vmm        string
	bootErr    error
	dialErr    error
	releaseErr error
	assignErr  error
	vmsMu      sync.Mutex // the pool's fill loop adds spares
	vms        map[string]*testVM
}

func newTestHost(t *testing.T) *testHost {
	images := &fileImages{dir: t.TempDir()}
	h, err := NewHost[*testVM](Config{
		Name: "testvmm", StateDir: filepath.Join(t.TempDir(), "state"), Images: images,
		Log: hostproctest.Logger(t), StopGrace: 5 * time.Second, ExitWait: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	th := &testHost{Host: h, images: images, vmm: "exec sleep 60", vms: map[string]*testVM{}}
	t.Cleanup(func() { h.Close(context.Background()) })
	return th
}

func (h *testHost) start(ctx context.Context, id, agent string) (*testVM, error) {
	spec := driver.Spec{
		ID: id, Function: "f", CodeDir: h.images.dir, MemoryMB: MinMemoryMB, EphemeralMB: 1,
		Runtime: runtimes.Runtime{ID: "provided.al2023"},
	}
	inst, err := h.Start(ctx, spec, h.newVM(id, agent))
	if err != nil {
		return nil, err
	}
	return inst.(*testVM), nil
}

// newVM makes the machines of Start of id: the one it boots, or the
// spares the pool boots with it (recorded under their names).
func (h *testHost) newVM(id, agent string) func(*Instance) *testVM {
	return func(i *Instance) *testVM {
		v := &testVM{Instance: i, h: h, agent: agent}
		h.vmsMu.Lock()
		h.vms[i.Name()] = v
		h.vmsMu.Unlock()
		return v
	}
}

func (v *testVM) Boot(ctx context.Context, spec driver.Spec) error {
	v.spec = spec
	rec := NewRecord(spec)
	if err := v.Create(&rec); err != nil {
		return err
	}
	if _, _, err := v.h.Disks(ctx, spec, filepath.Join(v.Dir(), "scratch")); err != nil {
		return err
	}
	cmd := exec.Command("sh", "-c", v.h.vmm)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := v.Launch(cmd, &rec); err != nil {
		return err
	}
	if err := v.Record(&rec); err != nil {
		return err
	}
	if v.h.bootErr != nil {
		return v.h.bootErr
	}
	ctx, cancel := v.ReadyContext(ctx, 5*time.Second)
	defer cancel()
	return v.AwaitAgent(ctx, "connecting to the agent", func(context.Context) (net.Conn, error) {
		if v.h.dialErr != nil {
			return nil, v.h.dialErr
		}
		host, guest := net.Pipe()
		go func() {
			// An empty agent still writes: net.Pipe turns that into an
			// empty Read, which must not be taken for a byte.
			io.WriteString(guest, v.agent)
			io.Copy(io.Discard, guest)
		}()
		return host, nil
	})
}

func (v *testVM) Ask(ctx context.Context, grace time.Duration) {
	v.asked.Add(1)
	_ = v.Cmd().Process.Signal(syscall.SIGTERM)
}

func (v *testVM) Release(ctx context.Context) error {
	v.released.Add(1)
	return v.h.releaseErr
}

func assertStopped(t *testing.T, v *testVM) {
	t.Helper()
	select {
	case <-v.Done():
	default:
		t.Errorf("%s: Done not closed", v.ID())
	}
	if _, err := os.Stat(v.Dir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s: instance directory left: %v", v.ID(), err)
	}
	if v.released.Load() != 1 {
		t.Errorf("%s: released %d times, want once", v.ID(), v.released.Load())
	}
}

func TestHostStartStop(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	a, err := h.start(ctx, "a", ReadyLine+"x")
	if err != nil {
		t.Fatal(err)
	}
	b, err := h.start(ctx, "b", ReadyLine+"x")
	if err != nil {
		t.Fatal(err)
	}
	if a.Slot() != 0 || b.Slot() != 1 {
		t.Errorf("slots %d and %d, want 0 and 1", a.Slot(), b.Slot())
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(a.Conn(), buf); err != nil || buf[0] != 'x' {
		t.Errorf("after the ready line: %q, %v", buf, err)
	}
	rec, err := hostproc.ReadRecord[Record](a.Dir())
	if err != nil || rec.PID != a.PID() || rec.StartTime == 0 {
		t.Errorf("record %+v, %v; want pid %d", rec, err, a.PID())
	}
	if got, ok := h.instances.Get("a"); !ok || got != a {
		t.Errorf("Get(a) = %v, %v", got, ok)
	}
	if err := h.Stop(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	assertStopped(t, a)
	if a.asked.Load() != 1 {
		t.Errorf("asked %d times, want once", a.asked.Load())
	}
	if err := h.Stop(ctx, "a"); err != nil || a.released.Load() != 1 {
		t.Errorf("second Stop = %v, released %d times", err, a.released.Load())
	}
	if err := h.Stop(ctx, "unknown"); err != nil {
		t.Errorf("Stop(unknown) = %v", err)
	}
	c, err := h.start(ctx, "c", ReadyLine)
	if err != nil {
		t.Fatal(err)
	}
	if c.Slot() != 0 {
		t.Errorf("slot %d, want the freed 0", c.Slot())
	}
}

// TestHostBootFailure: a failed boot is stopped at once (no grace, no
// Ask), released and removed, and its slot is free again.
func TestHostBootFailure(t *testing.T) {
	h := newTestHost(t)
	h.bootErr = errdefs.ErrUnavailable
	if _, err := h.start(context.Background(), "f-1", ReadyLine); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "starting vm f-1") {
		t.Fatalf("Start = %v, want the boot's error", err)
	}
	v := h.vms["f-1"]
	assertStopped(t, v)
	if v.asked.Load() != 0 {
		t.Errorf("a failed boot was asked to exit")
	}
	if _, ok := h.instances.Get("f-1"); ok {
		t.Errorf("a failed boot is still registered")
	}
	h.bootErr = nil
	if g, err := h.start(context.Background(), "f-2", ReadyLine); err != nil || g.Slot() != 0 {
		t.Errorf("next Start: %v, slot %v", err, g)
	}
}

// TestHostStartErrors: what a boot's errors say.
func TestHostStartErrors(t *testing.T) {
	h := newTestHost(t)
	h.vmm = "echo 'boom: no kvm' >&2; exit 3"
	_, err := h.start(context.Background(), "exit-1", "")
	if err == nil || !strings.Contains(err.Error(), "waiting for the guest agent: testvmm exited") || !strings.Contains(err.Error(), "testvmm said: boom: no kvm") {
		t.Errorf("VMM exiting during the boot: %v", err)
	}
	h.vmm = "echo 'console line'; exec sleep 60"
	h.dialErr = syscall.ECONNREFUSED
	_, err = h.start(context.Background(), "refused-1", "")
	if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "connecting to the agent: connection refused (console: console line)") {
		t.Errorf("a refused connection: %v", err)
	}
	h.dialErr = nil
	h.vmm = "exec sleep 60"
	if _, err := h.start(context.Background(), "garbage-1", "NOT-READY\n"); err == nil || !strings.Contains(err.Error(), `guest sent "N" instead of "INVOKEX-AGENT-READY"`) {
		t.Errorf("a wrong ready line: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = h.start(ctx, "silent-1", "")
	if !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "said") {
		t.Errorf("a caller giving up: %v, want DeadlineExceeded without the VM's output", err)
	}
	for id, v := range h.vms {
		if _, err := os.Stat(v.Dir()); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left its directory", id)
		}
	}
}

// TestHostReleaseFailureKeepsSlot: an instance whose teardown failed
// keeps its slot (what it named may still be in use).
func TestHostReleaseFailureKeepsSlot(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	if _, err := h.start(ctx, "a", ReadyLine); err != nil {
		t.Fatal(err)
	}
	h.releaseErr = fmt.Errorf("cgroup busy")
	if err := h.Stop(ctx, "a"); err == nil || !strings.Contains(err.Error(), "stopping vm a: cgroup busy") {
		t.Errorf("Stop = %v, want the release's error", err)
	}
	h.releaseErr = nil
	b, err := h.start(ctx, "b", ReadyLine)
	if err != nil || b.Slot() != 1 {
		t.Errorf("next Start: %v; want slot 1, not the failed instance's", err)
	}
}

func TestHostRecover(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	own, err := h.start(ctx, "own", ReadyLine)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"left-1", "left-2"} {
		os.Mkdir(filepath.Join(h.cfg.StateDir, id), 0o700)
	}
	os.WriteFile(filepath.Join(h.cfg.StateDir, "stray-file"), nil, 0o600)
	var killed []string
	insts, err := h.Recover(ctx, func(ctx context.Context, id, dir string) error {
		killed = append(killed, id)
		if dir != filepath.Join(h.cfg.StateDir, id) {
			t.Errorf("kill(%s) got dir %s", id, dir)
		}
		if id == "left-2" {
			return errors.New("still running")
		}
		return nil
	})
	if insts == nil || len(insts) != 0 || err == nil || !strings.Contains(err.Error(), "recovering vm left-2: still running") {
		t.Errorf("Recover = %v, %v; want no instances and left-2's error", insts, err)
	}
	if strings.Join(killed, " ") != "left-1 left-2" {
		t.Errorf("killed %v, want the two leftovers", killed)
	}
	if _, err := os.Stat(filepath.Join(h.cfg.StateDir, "left-1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("left-1 not removed")
	}
	if _, err := os.Stat(filepath.Join(h.cfg.StateDir, "left-2")); err != nil {
		t.Errorf("left-2, whose VMM could not be killed, was removed")
	}
	select {
	case <-own.Done():
		t.Errorf("Recover stopped its own instance")
	default:
	}
}

func TestHostClose(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	a, _ := h.start(ctx, "a", ReadyLine)
	b, _ := h.start(ctx, "b", ReadyLine)
	if a == nil || b == nil {
		t.Fatal("Start failed")
	}
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	assertStopped(t, a)
	assertStopped(t, b)
	if h.images.closed.Load() != 1 {
		t.Errorf("images closed %d times, want once", h.images.closed.Load())
	}
	if _, err := h.start(ctx, "c", ReadyLine); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start after Close = %v, want ErrUnavailable", err)
	}
	if err := h.Close(ctx); err != nil || h.images.closed.Load() != 1 {
		t.Errorf("second Close = %v, images closed %d times", err, h.images.closed.Load())
	}
}

// TestHostOwnDir: a driver's own directory in StateDir (package qemu's
// spare templates) is left alone by Recover, emptied when made again,
// removed by Close, and refused after it; a crashed driver's is a
// leftover for the next one's Recover.
func TestHostOwnDir(t *testing.T) {
	h := newTestHost(t)
	ctx := context.Background()
	for _, bad := range []string{"", "a/b", "..", ".hidden"} {
		if _, err := h.OwnDir(bad); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("OwnDir(%q) = %v, want ErrInvalidParameter", bad, err)
		}
	}
	dir, err := h.OwnDir("template-1")
	if err != nil {
		t.Fatal(err)
	}
	if dir != filepath.Join(h.cfg.StateDir, "template-1") {
		t.Errorf("OwnDir = %s", dir)
	}
	if err := os.WriteFile(filepath.Join(dir, "old"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Recover(ctx, func(ctx context.Context, id, dir string) error {
		t.Errorf("Recover took its own driver's directory %s for a leftover", id)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "old")); err != nil {
		t.Errorf("Recover removed the directory's files: %v", err)
	}
	if _, err := h.OwnDir("template-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "old")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("OwnDir again kept what was there: %v", err)
	}

	// A new host on the same StateDir (after a crash) recovers it.
	h2, err := NewHost[*testVM](Config{Name: "testvmm", StateDir: h.cfg.StateDir, Images: h.images, Log: hostproctest.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	if _, err := h2.Recover(ctx, func(ctx context.Context, id, dir string) error { left = append(left, id); return nil }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(left, " ") != "template-1" {
		t.Errorf("the next driver's Recover found %v, want the directory", left)
	}
	h2.fork.Close()

	if _, err := h.OwnDir("template-2"); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(h.cfg.StateDir, "template-2")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Close left its own directory: %v", err)
	}
	if _, err := h.OwnDir("template-3"); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("OwnDir after Close = %v, want ErrUnavailable", err)
	}
}
