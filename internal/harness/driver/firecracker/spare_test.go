package firecracker

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// awaitSpare waits until the driver has a spare ready.
func awaitSpare(t *testing.T, e *fakeEnv) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, ready := vmm.SparePIDs(e.StateDir); ready == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("no spare vm ready")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testSpare: a cold start takes the spare the first one left, switches
// its code drive with PATCH /drives/code (the stand-in's guest answers
// only once the drive was switched) and hands it over; Stop removes it,
// jail and cgroups included.
func testSpare(t *testing.T, e *fakeEnv) {
	startFake(t, e, "ok-first")
	awaitSpare(t, e)
	inst := startFake(t, e, "ok-spare")
	if !strings.HasPrefix(inst.Name(), "spare-") {
		t.Fatalf("ok-spare booted (%s) although a spare was ready", inst.Name())
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "HELLO" {
		t.Fatalf("first bytes after the handshake = %q, %v; want HELLO", buf, err)
	}
	if inst.Dir() != filepath.Join(e.StateDir, "ok-spare") {
		t.Errorf("dir %s", inst.Dir())
	}
	var patch *loggedRequest
	for _, r := range requests(t, inst) {
		if r.Method == "PATCH" {
			patch = &r
		}
	}
	if patch == nil || patch.Path != "/drives/code" {
		t.Fatalf("no PATCH /drives/code: %+v", patch)
	}
	var body map[string]any
	json.Unmarshal(patch.Body, &body)
	if body["path_on_host"] != inst.inRoot(assignedCode) {
		t.Errorf("the code drive was switched to %v, want %s", body["path_on_host"], inst.inRoot(assignedCode))
	}
	if _, err := os.Stat(filepath.Join(inst.Dir(), vmm.SpareReadyFile)); err == nil {
		t.Errorf("the assigned spare's directory still says it is a ready spare")
	}
	if _, err := os.Stat(filepath.Join(inst.root, assignedCode)); err != nil {
		t.Errorf("the code image is not in the vm's root: %v", err)
	}
	rec, err := hostproc.ReadRecord[record](inst.Dir())
	if err != nil || rec.ID != "ok-spare" || rec.Machine != inst.Name() || rec.Root != inst.root {
		t.Errorf("record %+v, %v", rec, err)
	}
	if !isOurVMM(inst.PID(), e.fc, e.d.opts.JailerPath, inst.Name()) {
		t.Errorf("the assigned spare's firecracker is not recognised by its name")
	}
	pid, cgroups := inst.PID(), inst.cgroups
	if err := e.d.Stop(t.Context(), "ok-spare"); err != nil {
		t.Fatal(err)
	}
	assertGone(t, e, "ok-spare", pid, cgroups...)
	e.AssertGone(t, inst.Name(), pid)
}

func TestSpare(t *testing.T) {
	testSpare(t, newFakeEnv(t, func(o *Options) { o.SpareVMs = 1 }))
}

func TestJailedSpare(t *testing.T) {
	e, _ := jailedEnv(t, func(o *Options) { o.SpareVMs = 1 })
	testSpare(t, e)
}
