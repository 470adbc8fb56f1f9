package bench

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunSmoke runs the whole benchmark with tiny counts: every phase must
// produce its figures, with no failure. It checks what was measured, never
// how fast. It needs root (the process sandbox), aws-lambda-rie and a
// buildable invokex (or $INVOKEX_BIN), and is skipped otherwise and in
// -short mode.
func TestRunSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("the benchmark smoke test starts servers and sandboxes; skipped in -short mode")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for InvokeX's process sandbox")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build the echo function")
	}
	rie, err := FindRIE(context.Background(), goBin, false, nil)
	if err != nil {
		t.Skipf("no RIE: %v", err)
	}
	mod, err := FindModuleDir(".")
	if err != nil {
		t.Fatal(err)
	}
	bin := os.Getenv("INVOKEX_BIN")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "invokex")
		cmd := exec.Command(goBin, "build", "-o", bin, "./cmd/invokex")
		cmd.Dir = mod
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Skipf("invokex does not build here: %v: %s", err, bytes.TrimSpace(out))
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	work := t.TempDir()
	var progress bytes.Buffer
	rep, err := Run(ctx, Options{
		InvokexBin:     bin,
		RIEBin:         rie,
		GoBin:          goBin,
		ModuleDir:      mod,
		Runs:           30,
		Concurrency:    []int{1, 2},
		ColdStarts:     2,
		EventCount:     40,
		EventClients:   4,
		UpdateRuns:     2,
		MemInstances:   2,
		KeepAliveShort: 500 * time.Millisecond,
		ProfileSeconds: -1,
		WorkDir:        work,
		Out:            &progress,
	})
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, progress.String())
	}
	t.Logf("progress:\n%s", progress.String())

	for _, w := range rep.Warm {
		if w.InvokeX.OK != 30 || w.InvokeX.Errors != 0 {
			t.Errorf("InvokeX at concurrency %d: %d ok, %d errors (%v)", w.Concurrency, w.InvokeX.OK, w.InvokeX.Errors, w.InvokeX.FirstErrors)
		}
	}
	if w := rep.Warm[0]; w.RIE.OK != 30 {
		t.Errorf("RIE at concurrency 1: %d ok (%v)", w.RIE.OK, w.RIE.FirstErrors)
	}
	for name, s := range map[string]ColdSeries{"after deploy": rep.ColdAfterDeploy, "after scale-to-zero": rep.ColdAfterScaleZero, "RIE": rep.ColdRIE} {
		if s.TTFB.N != 2 || s.Errors != 0 || s.Cold != 2 || s.Init.N != 2 || s.Why != "" {
			t.Errorf("cold starts %s: %+v", name, s)
		}
	}
	if n := rep.ColdAfterScaleZero.DriverStart.N; n != 2 {
		t.Errorf("driver starts read from the scale-to-zero server's log: %d, want 2", n)
	}
	m := rep.Memory
	if m.Instances != 2 || m.PerInstance.RSS <= 0 || m.Function.RSS <= 0 || m.RIEFunction.RSS <= 0 || m.RIEEmulator.RSS <= 0 || m.ServerIdle.RSS <= 0 {
		t.Errorf("memory: %+v", m)
	}
	c := rep.Control
	if c.CreateToActive.N != 2 || c.UpdateToNewCode.N != 2 || c.UpdateErrors != 0 {
		t.Errorf("control plane: create %d, update %d, update errors %d", c.CreateToActive.N, c.UpdateToNewCode.N, c.UpdateErrors)
	}
	if e := c.Event; e.Accepted != 40 || e.Succeeded != 40 || e.Lost != 0 || e.AllRun <= 0 {
		t.Errorf("Event invokes: %+v", e)
	}
	for _, n := range rep.Notes {
		if !strings.Contains(n, "fewer than the 50") {
			t.Errorf("note: %s", n)
		}
	}
	md := string(rep.Markdown("invokex bench (smoke)", nil))
	if !strings.Contains(md, "## Targets") || !strings.Contains(md, "| c=1 p50 |") {
		t.Errorf("markdown lacks the tables:\n%s", md)
	}
	// Nothing is left behind: the work dir holds nothing but what the test
	// made (Run removed its own temporary directory).
	ents, err := os.ReadDir(work)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("left in the work dir: %v", ents)
	}
}
