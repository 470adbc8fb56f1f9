package vmm

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
)

// driverRecord is a driver's record: Record embedded, plus its own.
type driverRecord struct {
	Record
	VMM string `json:"vmm"`
}

// TestRecordJSON: a driver's record is one flat JSON object, with the
// keys its drivers wrote before Record was shared.
func TestRecordJSON(t *testing.T) {
	rec := driverRecord{Record: NewRecord(driver.Spec{ID: "vm-1", Function: "f", RevisionID: "r"}), VMM: "/usr/bin/vmm"}
	rec.PID, rec.StartTime, rec.UID = 42, 7, 1<<30
	dir := t.TempDir()
	if err := hostproc.WriteRecord(dir, &rec); err != nil {
		t.Fatal(err)
	}
	m, err := hostproc.ReadRecord[map[string]any](dir)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for k := range *m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	want := []string{"created", "function", "id", "pid", "revision_id", "start_time", "uid", "vmm"}
	if !slices.Equal(keys, want) {
		t.Errorf("record keys %v, want %v", keys, want)
	}
	back := ReadLeftoverRecord[driverRecord](slog.New(slog.DiscardHandler), "vm-1", dir)
	if back == nil || back.Record.Proc() != (hostproc.Proc{PID: 42, StartTime: 7}) || back.VMM != rec.VMM || !back.Created.Equal(rec.Created) {
		t.Errorf("read back %+v, want %+v", back, rec)
	}
}

func TestReadLeftoverRecord(t *testing.T) {
	log := hostproctest.Logger(t)
	if rec := ReadLeftoverRecord[Record](log, "bare", t.TempDir()); rec != nil {
		t.Errorf("no record read as %+v", rec)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, hostproc.RecordFile), []byte("{torn"), 0o600)
	if rec := ReadLeftoverRecord[Record](log, "torn", dir); rec != nil {
		t.Errorf("a torn record read as %+v", rec)
	}
}

// TestKillLeftover: the recorded process is killed only if isOurs says
// it is the VMM; without a record (or a pid), the VMM is found by isOurs.
func TestKillLeftover(t *testing.T) {
	ctx := context.Background()
	log := hostproctest.Logger(t)
	start := func() (*exec.Cmd, *Record) {
		c := exec.Command("sleep", "60")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		go c.Wait() // reaped, so a killed one is gone
		t.Cleanup(func() { c.Process.Kill() })
		p, err := hostproc.Lookup(c.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		return c, &Record{ID: "vm-1", PID: p.PID, StartTime: p.StartTime}
	}
	gone := func(pid int) bool {
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			if p, err := hostproc.Lookup(pid); err != nil || !p.Running() {
				return true
			}
			time.Sleep(10 * time.Millisecond)
		}
		return false
	}
	stranger, rec := start()
	if err := KillLeftover(ctx, log, "vm-1", rec, func(int) bool { return false }); err != nil {
		t.Fatal(err)
	}
	if p, err := hostproc.Lookup(stranger.Process.Pid); err != nil || !p.Running() {
		t.Fatalf("a process that is not the VMM was killed")
	}
	vmm, rec := start()
	if err := KillLeftover(ctx, log, "vm-1", rec, func(pid int) bool { return pid == vmm.Process.Pid }); err != nil {
		t.Fatal(err)
	}
	if !gone(vmm.Process.Pid) {
		t.Errorf("the recorded VMM survived")
	}
	unrecorded, _ := start()
	isOurs := func(pid int) bool { return pid == unrecorded.Process.Pid }
	if pids := FindProcs(isOurs); !slices.Equal(pids, []int{unrecorded.Process.Pid}) {
		t.Errorf("FindProcs = %v, want [%d]", pids, unrecorded.Process.Pid)
	}
	if err := KillLeftover(ctx, log, "vm-1", &Record{ID: "vm-1"}, isOurs); err != nil {
		t.Fatal(err)
	}
	if !gone(unrecorded.Process.Pid) {
		t.Errorf("the VMM found by its command line survived")
	}
	if p, err := hostproc.Lookup(stranger.Process.Pid); err != nil || !p.Running() {
		t.Errorf("a process that is not the VMM was killed")
	}
}

func TestCmdline(t *testing.T) {
	c := exec.Command("sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { c.Process.Kill(); c.Wait() }()
	// Right after Start the kernel may still be setting up the new
	// program's arguments: the command line reads empty until then.
	got := Cmdline(c.Process.Pid)
	for deadline := time.Now().Add(5 * time.Second); slices.Equal(got, []string{""}) && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
		got = Cmdline(c.Process.Pid)
	}
	if !slices.Equal(got, []string{"sleep", "60"}) {
		t.Errorf("Cmdline = %q", got)
	}
	if got := Cmdline(-1); got != nil {
		t.Errorf("Cmdline of no process = %q", got)
	}
}
