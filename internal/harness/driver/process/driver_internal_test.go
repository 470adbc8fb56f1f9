package process

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root for cgroups")
	}
}

func newTestDriver(t *testing.T, opts Options) *Driver {
	t.Helper()
	if opts.StateDir == "" {
		opts.StateDir = t.TempDir()
	}
	opts.Logger = hostproctest.Logger(t)
	d, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

func testSpec(t *testing.T) driver.Spec {
	return driver.Spec{
		ID:          "it-" + strconv.FormatInt(time.Now().UnixNano(), 36),
		Function:    "probe",
		CodeDir:     drivertest.BuildProbe(t),
		MemoryMB:    100,
		EphemeralMB: 16,
	}
}

func startInstance(t *testing.T, d *Driver, spec driver.Spec) *instance {
	t.Helper()
	inst, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return inst.(*instance)
}

// cgroupOf returns pid's cgroup path in the hierarchy whose controller
// list (second field of /proc/<pid>/cgroup) is ctrl ("" for v2).
func cgroupOf(t *testing.T, pid int, ctrl string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && f[1] == ctrl {
			return f[2]
		}
	}
	t.Fatalf("pid %d has no %q cgroup in %s", pid, ctrl, b)
	return ""
}

func readTrim(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestCgroupLimits checks that the sandbox's init is in cgroups carrying
// the memory and pids limits.
func TestCgroupLimits(t *testing.T) {
	requireRoot(t)
	d := newTestDriver(t, Options{})
	if d.cg.memDir == "" || d.cg.pidsDir == "" {
		t.Skipf("skipping: memory or pids controller unavailable: %v", d.Describe())
	}
	spec := testSpec(t)
	inst := startInstance(t, d, spec)
	pid := inst.PID()
	want := strconv.Itoa((spec.MemoryMB + agentHeadroomMB) << 20)
	switch d.cg.version {
	case 1:
		mem := filepath.Join(d.opts.CgroupRoot, "memory", cgroupOf(t, pid, "memory"))
		if filepath.Base(mem) != spec.ID {
			t.Fatalf("init is in memory cgroup %s, want one named %s", mem, spec.ID)
		}
		if got := readTrim(t, filepath.Join(mem, "memory.limit_in_bytes")); got != want {
			t.Errorf("memory.limit_in_bytes = %s, want %s", got, want)
		}
		if d.cg.memsw {
			if got := readTrim(t, filepath.Join(mem, "memory.memsw.limit_in_bytes")); got != want {
				t.Errorf("memory.memsw.limit_in_bytes = %s, want %s", got, want)
			}
		}
		pids := filepath.Join(d.opts.CgroupRoot, "pids", cgroupOf(t, pid, "pids"))
		if got := readTrim(t, filepath.Join(pids, "pids.max")); got != "1024" {
			t.Errorf("pids.max = %s, want 1024", got)
		}
	case 2:
		cg := filepath.Join(d.opts.CgroupRoot, cgroupOf(t, pid, ""))
		if got := readTrim(t, filepath.Join(cg, "memory.max")); got != want {
			t.Errorf("memory.max = %s, want %s", got, want)
		}
		if got := readTrim(t, filepath.Join(cg, "pids.max")); got != "1024" {
			t.Errorf("pids.max = %s, want 1024", got)
		}
	}
	if err := d.Stop(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	for _, p := range d.cg.paths(spec.ID) {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Stop: %v", p, err)
		}
	}
}

// TestCgroupV2WithoutControllers runs the v2 code path on a hybrid host's
// unified hierarchy, which has no memory or pids controller: the driver
// must say so and still group (and so find and kill) the sandbox there.
func TestCgroupV2WithoutControllers(t *testing.T) {
	requireRoot(t)
	const unified = "/sys/fs/cgroup/unified"
	ctrls, err := os.ReadFile(filepath.Join(unified, "cgroup.controllers"))
	if err != nil {
		t.Skip("skipping: no hybrid cgroup v2 hierarchy at " + unified)
	}
	if strings.Contains(string(ctrls), "memory") {
		t.Skip("skipping: the unified hierarchy has the memory controller")
	}
	d := newTestDriver(t, Options{CgroupRoot: unified})
	if d.cg.version != 2 {
		t.Fatalf("cgroup version %d, want 2", d.cg.version)
	}
	if !strings.Contains(strings.Join(d.Describe(), "\n"), "memory controller unavailable") {
		t.Errorf("Describe() = %q, want the missing memory controller reported", d.Describe())
	}
	spec := testSpec(t)
	inst := startInstance(t, d, spec)
	got := cgroupOf(t, inst.PID(), "")
	if want := "/" + d.opts.CgroupParent + "/" + spec.ID; got != want {
		t.Errorf("init in v2 cgroup %s, want %s", got, want)
	}
	if err := d.Stop(context.Background(), spec.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(unified, got)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("v2 cgroup left after Stop: %v", err)
	}
}

// TestRecoverKillsLiveSandbox: a second driver on the same state directory
// (a restarted harness whose predecessor's sandboxes survived) kills the
// sandbox and removes its resources.
func TestRecoverKillsLiveSandbox(t *testing.T) {
	stateDir := t.TempDir()
	first := newTestDriver(t, Options{StateDir: stateDir})
	spec := testSpec(t)
	inst := startInstance(t, first, spec)
	pid := inst.PID()
	cgroups := first.cg.paths(spec.ID)

	second := newTestDriver(t, Options{StateDir: stateDir})
	if insts, err := second.Recover(context.Background()); err != nil || len(insts) != 0 {
		t.Fatalf("Recover = %v, %v; want no instances and no error", insts, err)
	}
	select {
	case <-inst.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("sandbox init %d still running after Recover", pid)
	}
	for _, p := range cgroups {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after Recover: %v", p, err)
		}
	}
	if _, err := os.Stat(filepath.Join(stateDir, spec.ID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state directory left after Recover: %v", err)
	}
	// The first driver's Stop finds everything gone and succeeds.
	if err := first.Stop(context.Background(), spec.ID); err != nil {
		t.Errorf("Stop after Recover: %v", err)
	}
}

// TestRecoverRemovesStrayCgroups: a cgroup under the driver's parent with
// no state directory is emptied (its processes killed) and removed.
func TestRecoverRemovesStrayCgroups(t *testing.T) {
	requireRoot(t)
	d := newTestDriver(t, Options{})
	paths := d.cg.paths("stray-1")
	if len(paths) == 0 {
		t.Skipf("skipping: no cgroups: %v", d.Describe())
	}
	if err := d.cg.create("stray-1", 64); err != nil {
		t.Fatal(err)
	}
	sleeper := exec.Command("sleep", "300")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer sleeper.Process.Kill()
	if err := joinCgroups(paths, sleeper.Process.Pid); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Recover(context.Background()); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	err := sleeper.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("process in the stray cgroup ended with %v, want SIGKILL", err)
	}
	for _, p := range paths {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("stray cgroup %s left: %v", p, err)
		}
	}
}

// TestStartFailureCleansUp: an init that dies before the agent is ready
// fails Start with its last words, and leaves nothing behind.
func TestStartFailureCleansUp(t *testing.T) {
	stateDir := t.TempDir()
	d := newTestDriver(t, Options{
		StateDir:    stateDir,
		InitCommand: []string{"/bin/sh", "-c", "echo init-broke-here >&2; exit 7"},
		// The start path without warm sandboxes (TestWarmSandboxes has
		// the other).
		WarmSandboxes: -1,
	})
	spec := testSpec(t)
	_, err := d.Start(context.Background(), spec)
	if err == nil || !strings.Contains(err.Error(), "init-broke-here") {
		t.Fatalf("Start error = %v, want one quoting the init's stderr", err)
	}
	// The driver's own /tmp templates stay until Close.
	if ents, _ := os.ReadDir(stateDir); slices.ContainsFunc(ents, func(e os.DirEntry) bool { return e.Name() != tmpTemplatesDir }) {
		t.Errorf("state directory not empty after a failed Start: %v", ents)
	}
	for _, p := range d.cg.paths(spec.ID) {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left after a failed Start: %v", p, err)
		}
	}
	if d.known(spec.ID) {
		t.Errorf("failed instance still registered")
	}
}

// waitWarm waits until the pool holds n idle sandboxes and returns them.
func waitWarm(t *testing.T, d *Driver, n int) []*sandbox {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		idle := d.warm.Idle()
		if len(idle) >= n {
			return idle
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool holds %d warm sandboxes after 20 s, want %d", len(idle), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestWarmSandboxes: after the first Start the driver keeps a sandbox
// ready; the next Start becomes it (renamed after the instance, with the
// instance's memory limit); Recover leaves it alone and Close removes it.
func TestWarmSandboxes(t *testing.T) {
	requireRoot(t)
	stateDir := t.TempDir()
	d := newTestDriver(t, Options{StateDir: stateDir, WarmSandboxes: 1})
	if d.cg.memDir == "" {
		t.Skipf("skipping: memory controller unavailable: %v", d.Describe())
	}
	startInstance(t, d, testSpec(t))
	warm := waitWarm(t, d, 1)[0]
	warmPID, warmName := warm.rec.PID, warm.name

	if _, err := d.Recover(context.Background()); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if !(hostproc.Proc{PID: warmPID, StartTime: warm.rec.StartTime}).Running() {
		t.Fatalf("Recover killed the driver's own warm sandbox %s", warmName)
	}

	spec := testSpec(t)
	spec.MemoryMB = 300
	inst := startInstance(t, d, spec)
	if inst.PID() != warmPID {
		t.Fatalf("second instance runs in pid %d, want the warm sandbox's %d", inst.PID(), warmPID)
	}
	if _, err := os.Stat(filepath.Join(stateDir, warmName)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("warm sandbox's state directory still there after it became %s: %v", spec.ID, err)
	}
	if _, err := os.Stat(filepath.Join(stateDir, spec.ID, hostproc.RecordFile)); err != nil {
		t.Errorf("instance's record: %v", err)
	}
	if d.cg.version == 1 {
		mem := filepath.Join(d.opts.CgroupRoot, "memory", cgroupOf(t, inst.PID(), "memory"))
		if filepath.Base(mem) != spec.ID {
			t.Errorf("instance is in memory cgroup %s, want one named %s", mem, spec.ID)
		}
		want := strconv.Itoa((spec.MemoryMB + agentHeadroomMB) << 20)
		if got := readTrim(t, filepath.Join(mem, "memory.limit_in_bytes")); got != want {
			t.Errorf("memory.limit_in_bytes = %s, want %s", got, want)
		}
	}

	refill := waitWarm(t, d, 1)[0]
	if err := d.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if (hostproc.Proc{PID: refill.rec.PID, StartTime: refill.rec.StartTime}).Running() {
		t.Errorf("warm sandbox pid %d alive after Close", refill.rec.PID)
	}
	ents, _ := os.ReadDir(stateDir)
	for _, e := range ents {
		t.Errorf("state directory holds %s after Close", e.Name())
	}
	for _, p := range refill.cgroups {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("warm sandbox's cgroup %s left after Close: %v", p, err)
		}
	}
}

// TestConfigFrame: the config the driver sends is the config the init
// reads; a frame that claims too much or ends early is refused.
func TestConfigFrame(t *testing.T) {
	in := sandboxConfig{ID: "ix-1", Hostname: "sandbox-ix-1", Root: "/s/ix-1/root", CodeDir: "/c",
		MemoryMB: 256, EphemeralMB: 512, OwnNetwork: true, Nameservers: []string{"192.0.2.53"}}
	b, err := encodeConfig(&in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := readConfig(bytes.NewReader(b))
	if err != nil || !reflect.DeepEqual(*out, in) {
		t.Fatalf("readConfig = %+v, %v; want %+v", out, err, in)
	}
	if _, err := readConfig(bytes.NewReader(b[:len(b)-1])); err == nil {
		t.Error("a truncated frame was accepted")
	}
	huge := binary.BigEndian.AppendUint32(nil, maxConfigSize+1)
	if _, err := readConfig(bytes.NewReader(huge)); err == nil {
		t.Error("a frame over maxConfigSize was accepted")
	}
}
