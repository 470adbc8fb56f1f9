package vmm

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/agent/vminit"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/protocol"
)

// BootSpare boots the test VM as a spare whose "guest" writes SpareLine,
// reads its assignment into v.assigned and then writes ReadyLine.
func (v *testVM) BootSpare(ctx context.Context, spec driver.Spec) error {
	v.rec = NewRecord(spec)
	if err := v.Create(&v.rec); err != nil {
		return err
	}
	if _, err := v.h.SpareDisks(ctx, spec, filepath.Join(v.Dir(), "scratch")); err != nil {
		return err
	}
	cmd := exec.Command("sh", "-c", v.h.vmm)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := v.Launch(cmd, &v.rec); err != nil {
		return err
	}
	if err := v.Record(&v.rec); err != nil {
		return err
	}
	v.assigned = make(chan protocol.Assignment, 1)
	ctx, cancel := v.ReadyContext(ctx, 5*time.Second)
	defer cancel()
	err := v.AwaitSpare(ctx, "connecting to the agent", func(context.Context) (net.Conn, error) {
		host, guest := net.Pipe()
		go func() {
			io.WriteString(guest, SpareLine)
			a, err := protocol.ReadAssignment(guest)
			if err != nil {
				guest.Close()
				return
			}
			v.assigned <- a
			io.WriteString(guest, ReadyLine)
			io.Copy(io.Discard, guest)
		}()
		return host, nil
	})
	return err
}

func (v *testVM) Assign(ctx context.Context, spec driver.Spec, code string) error {
	if err := v.Rename(); err != nil {
		return err
	}
	v.rec.ID, v.rec.Machine = spec.ID, v.Name()
	if err := v.Record(&v.rec); err != nil {
		return err
	}
	if v.h.assignErr != nil {
		return v.h.assignErr
	}
	v.code = code
	return v.SendAssignment(ctx, 5*time.Second)
}

func newSpareHost(t *testing.T, spares int) *testHost {
	h := newTestHost(t)
	h.cfg.Spares = spares
	h.spares = newSpares(h.Host, spares)
	return h
}

// awaitSpares waits until n spares are ready in h's state directory.
func awaitSpares(t *testing.T, h *testHost, n int) []int {
	t.Helper()
	return awaitSparesWithout(t, h, n, nil)
}

// awaitSparesWithout is awaitSpares for n spares none of which is in gone:
// a pool replaces spares in the background, so the old ones can still be
// there when the call that replaces them returns.
func awaitSparesWithout(t *testing.T, h *testHost, n int, gone []int) []int {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		pids, ready := SparePIDs(h.cfg.StateDir)
		if ready == n && len(pids) == n && !slices.ContainsFunc(pids, func(p int) bool { return slices.Contains(gone, p) }) {
			return pids
		}
		if time.Now().After(deadline) {
			t.Fatalf("spares %v (%d ready), want %d ready and none of %v", pids, ready, n, gone)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSparesServeColdStarts(t *testing.T) {
	h := newSpareHost(t, 1)
	ctx := context.Background()
	a, err := h.start(ctx, "a", ReadyLine)
	if err != nil {
		t.Fatal(err)
	}
	if a.Name() != "a" {
		t.Errorf("the first start (nothing to take) booted %q", a.Name())
	}
	pids := awaitSpares(t, h, 1)
	root := os.Geteuid() == 0
	if root && niceOf(t, pids[0]) != SpareNice {
		t.Errorf("the spare waits at nice %d, want %d", niceOf(t, pids[0]), SpareNice)
	}
	// Recover leaves a running driver's spares alone.
	if _, err := h.Recover(ctx, func(ctx context.Context, id, dir string) error { return nil }); err != nil {
		t.Fatal(err)
	}
	awaitSpares(t, h, 1)

	b, err := h.start(ctx, "b", "")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(b.Name(), sparePrefix) || b.PID() != pids[0] {
		t.Fatalf("b = %s (pid %d): not the spare (pid %d)", b.Name(), b.PID(), pids[0])
	}
	if root && niceOf(t, b.PID()) != 0 {
		t.Errorf("the assigned spare runs at nice %d, want 0", niceOf(t, b.PID()))
	}
	if got := <-b.assigned; got.Hostname != Hostname("b") {
		t.Errorf("the guest was assigned hostname %q, want %q", got.Hostname, Hostname("b"))
	}
	if b.ID() != "b" || b.Dir() != filepath.Join(h.cfg.StateDir, "b") || !strings.HasSuffix(b.code, ".ext4") {
		t.Errorf("assigned spare: id %q dir %q code %q", b.ID(), b.Dir(), b.code)
	}
	rec, err := hostproc.ReadRecord[Record](b.Dir())
	if err != nil || rec.ID != "b" || rec.Machine != b.Name() || rec.MachineName() != b.Name() {
		t.Errorf("assigned spare's record %+v, %v", rec, err)
	}
	if _, err := os.Stat(filepath.Join(b.Dir(), SpareReadyFile)); err == nil {
		t.Errorf("the assigned spare's directory still says it is a ready spare")
	}
	if got, ok := h.Get("b"); !ok || got != b {
		t.Errorf("Get(b) = %v, %v", got, ok)
	}
	// The pool refills.
	awaitSpares(t, h, 1)
	if err := h.Stop(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	assertStopped(t, b)
	if err := h.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(h.cfg.StateDir); len(ents) != 0 {
		t.Errorf("Close left %d entries in the state directory (%s...)", len(ents), ents[0].Name())
	}
	h.vmsMu.Lock()
	defer h.vmsMu.Unlock()
	for _, v := range h.vms {
		if v.Cmd() != nil && alive(v.PID()) {
			t.Errorf("%s: VMM still running after Close", v.Name())
		}
	}
}

func TestSparesFollowTheLastShape(t *testing.T) {
	h := newSpareHost(t, 1)
	ctx := context.Background()
	a, err := h.start(ctx, "a", ReadyLine)
	if err != nil {
		t.Fatal(err)
	}
	old := awaitSpares(t, h, 1)
	spec := driver.Spec{
		ID: "big", Function: "f", CodeDir: h.images.dir, MemoryMB: 2 * MinMemoryMB, EphemeralMB: 1,
		Runtime: a.spec.Runtime,
	}
	inst, err := h.Start(ctx, spec, h.newVM("big", ReadyLine))
	if err != nil {
		t.Fatal(err)
	}
	if inst.(*testVM).Name() != "big" {
		t.Errorf("a start of another shape took the spare")
	}
	// The spare of the old shape goes, one of the new shape comes.
	awaitSparesWithout(t, h, 1, old)
	spec.ID = "big-2"
	inst, err = h.Start(ctx, spec, h.newVM("big-2", ""))
	if err != nil {
		t.Fatal(err)
	}
	if v := inst.(*testVM); !strings.HasPrefix(v.Name(), sparePrefix) {
		t.Errorf("a start of the new shape booted instead of taking its spare")
	}
}

func TestSpareAssignFailureBoots(t *testing.T) {
	h := newSpareHost(t, 1)
	ctx := context.Background()
	if _, err := h.start(ctx, "a", ReadyLine); err != nil {
		t.Fatal(err)
	}
	pids := awaitSpares(t, h, 1)
	h.assignErr = errors.New("attach failed")
	b, err := h.start(ctx, "b", ReadyLine)
	if err != nil {
		t.Fatalf("a failed assignment must fall back to a boot: %v", err)
	}
	if b.Name() != "b" {
		t.Errorf("b = %s, want a booted VM", b.Name())
	}
	deadline := time.Now().Add(5 * time.Second)
	for alive(pids[0]) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if alive(pids[0]) {
		t.Errorf("the spare whose assignment failed still runs")
	}
	// The ID is taken now: a second start of it fails without using the pool.
	h.assignErr = nil
	awaitSpares(t, h, 1)
	if _, err := h.start(ctx, "b", ReadyLine); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("starting a running ID: %v, want ErrAlreadyExists", err)
	}
	awaitSpares(t, h, 1)
}

// alive reports whether pid exists (the VMMs are reaped by Launch's
// supervisor, so an exited one is gone).
func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// The lines are the guest init's (package vminit cannot be imported by the
// host's driver code, only by its tests).
func TestLinesMatchTheGuestInit(t *testing.T) {
	if SpareLine != vminit.Spare || ReadyLine != vminit.Ready {
		t.Errorf("SpareLine %q / ReadyLine %q, guest init writes %q / %q", SpareLine, ReadyLine, vminit.Spare, vminit.Ready)
	}
}

// niceOf reads pid's nice value (/proc/<pid>/stat field 19).
func niceOf(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	n, err := strconv.Atoi(f[16])
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestStartFreshTakesNoSpare: a machine that must come up its own way (a
// restore) never gets a spare, ready as it may be.
func TestStartFreshTakesNoSpare(t *testing.T) {
	h := newSpareHost(t, 1)
	ctx := context.Background()
	a, err := h.start(ctx, "a", ReadyLine)
	if err != nil {
		t.Fatal(err)
	}
	pids := awaitSpares(t, h, 1)
	spec := a.spec
	spec.ID = "fresh"
	inst, err := h.StartFresh(ctx, spec, h.newVM("fresh", ReadyLine))
	if err != nil {
		t.Fatal(err)
	}
	if v := inst.(*testVM); v.Name() != "fresh" {
		t.Errorf("StartFresh took spare %s", v.Name())
	}
	if now := awaitSpares(t, h, 1); now[0] != pids[0] {
		t.Errorf("the spare changed")
	}
}
