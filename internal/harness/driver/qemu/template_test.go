package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// TestTemplates boots real VMs: a shape's template is made (a boot and a
// snapshot), VMs restored from it on demand are VMs of their own (their
// own randomness, hostname and code), a template that cannot be restored
// is dropped and the VM boots instead, and Close leaves nothing. Spares
// restored from templates run the whole conformance suite (TestDriver).
func TestTemplates(t *testing.T) {
	qemuPath, cache, kernel := vmmtest.QEMUGuest(t)
	agent := vmmtest.AgentBinary(t, "./cmd/invokex-agent", "INVOKEX_QEMU_TEST_AGENT", "-trimpath", "-ldflags=-s -w")
	stateDir := t.TempDir()
	d, err := New(Options{
		StateDir: stateDir, CacheDir: cache, QEMUPath: qemuPath, KernelPath: kernel, AgentBin: agent,
		Logger: hostproctest.Logger(t),
		// No pool: the test makes the template itself, and every Start
		// below restores from it or boots.
		SpareVMs: -1,
	})
	if err != nil {
		t.Fatal(err)
	}
	d.templates = newTemplates(d)
	closed := false
	t.Cleanup(func() {
		if !closed {
			d.Close(context.Background())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	probe := drivertest.BuildProbe(t)
	spec := func(id string) driver.Spec {
		return driver.Spec{
			ID: id, Function: "probe", RevisionID: "rev-1",
			Runtime:  runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided, Available: true, Bootstrap: []string{"/var/task/bootstrap"}},
			CodeDir:  probe,
			MemoryMB: 128, EphemeralMB: 64,
		}
	}
	if d.templates.made(ctx, spec("x")) != nil {
		t.Fatal("a template before any was made")
	}
	src, err := d.templates.get(ctx, spec("x"))
	if err != nil {
		t.Fatalf("making the template: %v", err)
	}
	if left := vmmtest.ProcessesWithArg("invokex-template-vm-"); len(left) > 0 {
		t.Errorf("the template's vm still runs: %v", left)
	}

	// The template's RAM is a sealed memfd: no VM's QEMU (all of them can
	// open it: QEMU 7.2 opens it read-write) can change it.
	if src.ram == nil {
		t.Fatal("the template's RAM is not a sealed memfd")
	}
	if _, err := os.Stat(filepath.Join(src.dir, snapRAM)); !os.IsNotExist(err) {
		t.Errorf("the template's RAM file is still there: %v", err)
	}
	if _, err := unix.Pwrite(int(src.ram.Fd()), []byte{1}, 4096); err != unix.EPERM {
		t.Errorf("writing the template's RAM: %v, want EPERM", err)
	}
	ramSum := fileSum(t, src.ram)
	seen := map[string]string{}
	for _, id := range []string{"tpl-a", "tpl-b"} {
		inst, err := d.Start(ctx, spec(id))
		if err != nil {
			t.Fatalf("Start(%s): %v", id, err)
		}
		args := vmm.Cmdline(inst.(*instance).PID())
		if !slices.Contains(args, "-incoming") {
			t.Errorf("%s was not restored from the template: %q", id, args)
		}
		if cache := "tcg,tb-size=" + strconv.Itoa(d.templateCacheMB()); d.accel == accelTCG && !slices.Contains(args, cache) {
			t.Errorf("%s runs without -accel %s: %q", id, cache, args)
		}
		c := newProbeConn(t, inst, spec(id))
		var facts struct {
			Facts struct {
				Hostname string `json:"hostname"`
			} `json:"facts"`
		}
		c.call(t, `{"action":"echo"}`, &facts)
		if facts.Facts.Hostname != vmm.Hostname(id) {
			t.Errorf("%s's hostname is %q", id, facts.Facts.Hostname)
		}
		var r struct{ Data string }
		c.call(t, `{"action":"random","n":16}`, &r)
		if len(r.Data) != 32 || seen[r.Data] != "" {
			t.Errorf("%s drew %q, as %q did", id, r.Data, seen[r.Data])
		}
		seen[r.Data] = id
	}

	// Restored VMs never write the template's RAM, also once their
	// guests have idled and given memory back (the agent trims after 10
	// s idle; QEMU 7.2 punched reported free pages out of the file).
	time.Sleep(15 * time.Second)
	if fileSum(t, src.ram) != ramSum {
		t.Error("the template's RAM file changed while VMs restored from it ran")
	}

	// A template whose snapshot cannot be loaded: the VM boots, and the
	// template is gone.
	if err := os.Truncate(filepath.Join(src.dir, snapState), 100); err != nil {
		t.Fatal(err)
	}
	inst, err := d.Start(ctx, spec("tpl-c"))
	if err != nil {
		t.Fatalf("Start with a broken template: %v", err)
	}
	if args := vmm.Cmdline(inst.(*instance).PID()); slices.Contains(args, "-incoming") {
		t.Errorf("tpl-c was restored from the broken template: %q", args)
	}
	newProbeConn(t, inst, spec("tpl-c")).call(t, `{"action":"echo"}`, nil)
	if d.templates.made(ctx, spec("x")) != nil {
		t.Error("the broken template is still used")
	}
	if _, err := os.Stat(src.dir); !os.IsNotExist(err) {
		t.Errorf("the broken template's files are left: %v", err)
	}

	// Spares of the shape boot for a while (a template that cannot be
	// restored would be made again for every spare), then it is made
	// again.
	if _, err := d.templates.get(ctx, spec("x")); err == nil {
		t.Error("a template was made again right after one failed")
	}
	d.templates.mu.Lock()
	for _, tp := range d.templates.byKey {
		tp.done = tp.done.Add(-2 * templateRetry)
	}
	d.templates.mu.Unlock()
	if _, err := d.templates.get(ctx, spec("x")); err != nil {
		t.Fatalf("making the template again: %v", err)
	}
	closed = true
	if err := d.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(stateDir, "*")); len(left) > 0 {
		t.Errorf("Close left %v", left)
	}
}

// probeConn speaks to the probe function of a started instance.
type probeConn struct {
	c *protocol.Conn
	n int
}

// newProbeConn runs the probe's INIT.
func newProbeConn(t *testing.T, inst driver.Instance, spec driver.Spec) *probeConn {
	t.Helper()
	c := protocol.NewConn(inst.Conn())
	init := protocol.Init{
		FunctionName: spec.Function, FunctionVersion: "$LATEST", MemoryMB: spec.MemoryMB, TimeoutSec: 60,
		Command: []string{"/var/task/bootstrap"}, Dir: "/var/task",
		Env: []string{"LAMBDA_TASK_ROOT=/var/task", "_HANDLER=bootstrap"},
	}
	if err := c.WriteFrame(protocol.TypeInit, init); err != nil {
		t.Fatal(err)
	}
	f, err := c.ReadFrame()
	if err != nil || f.Type != protocol.TypeInitDone {
		t.Fatalf("init: %v %v", f, err)
	}
	return &probeConn{c: c}
}

// call invokes the probe with event and decodes its answer into out.
func (p *probeConn) call(t *testing.T, event string, out any) {
	t.Helper()
	p.n++
	inv := protocol.Invoke{RequestID: fmt.Sprint("req-", p.n), DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
	if err := p.c.WriteFrame(protocol.TypeInvoke, inv, []byte(event)); err != nil {
		t.Fatal(err)
	}
	f, err := p.c.ReadFrame()
	if err != nil || f.Type != protocol.TypeResult {
		t.Fatalf("invoke: %v %v", f, err)
	}
	var res protocol.Result
	if err := f.Decode(&res); err != nil {
		t.Fatal(err)
	}
	payload, log := res.Split(f.Body)
	if res.FunctionError != "" {
		t.Fatalf("%s: %s %s\n%s", event, res.FunctionError, payload, log)
	}
	if out != nil {
		if err := json.Unmarshal(payload, out); err != nil {
			t.Fatalf("%s answered %s: %v", event, payload, err)
		}
	}
}

// fileSum is the SHA-256 of f's content, in hex.
func fileSum(t *testing.T, f *os.File) string {
	t.Helper()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, fi.Size())); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}
