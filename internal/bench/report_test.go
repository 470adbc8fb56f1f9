package bench

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func ms2(v float64) time.Duration { return msToDuration(v) }

// sampleReport is a report where some targets are met and some missed.
func sampleReport() *Report {
	lr := func(p50 float64, perSec float64, sent, errs int) LoadResult {
		return LoadResult{Sent: sent, OK: sent - errs, Errors: errs, PerSec: perSec,
			Latency: Summary{N: sent - errs, P50: ms2(p50), P90: ms2(p50 * 2), P99: ms2(p50 * 3)}}
	}
	cold := func(ttfb, init float64) ColdSeries {
		return ColdSeries{TTFB: Summary{N: 50, P50: ms2(ttfb), P99: ms2(ttfb * 2)}, Init: Summary{N: 50, P50: ms2(init), P99: ms2(init)},
			Net: Summary{N: 50, P50: ms2(ttfb - init), P99: ms2(ttfb*2 - init)}, Cold: 50}
	}
	dead := lr(1, 10, 12, 11)
	dead.Died = true
	return &Report{
		Date:        time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC),
		Machine:     Machine{Cores: 2, Kernel: "6.1.0", GoVersion: "go1.26.8", CPU: "Xeon", MemTotal: 24 << 30, LoadAvg: "0.1 0.2 0.3"},
		Driver:      "process",
		Runs:        100,
		ColdStarts:  50,
		EventCount:  5000,
		Concurrency: []int{1, 8, 64},
		Warm: []WarmRow{
			{Concurrency: 1, InvokeX: lr(0.8, 1200, 100, 0), RIE: lr(1.0, 1000, 100, 0)},
			{Concurrency: 8, InvokeX: lr(4, 1900, 100, 0), RIE: dead, RIENote: "crashed: panic: x"},
			{Concurrency: 64, InvokeX: lr(30, 1800, 100, 2), RIE: dead},
		},
		ColdAfterDeploy:    cold(14, 5), // net 9 ms: met
		ColdAfterScaleZero: cold(30, 5), // net 25 ms: missed by 10 ms
		ColdRIE:            cold(8, 5),
		Memory: MemoryResult{
			Instances:   8,
			PerInstance: Mem{RSS: 16 << 20, PSS: 10 << 20},
			Function:    Mem{RSS: 8 << 20, PSS: 7 << 20},
			Sandbox:     Mem{RSS: 8 << 20, PSS: 3 << 20},
			RIEFunction: Mem{RSS: 8 << 20, PSS: 7 << 20},
			RIEEmulator: Mem{RSS: 12 << 20, PSS: 11 << 20},
			ServerIdle:  Mem{RSS: 20 << 20},
			Cgroup:      -1,
		},
		Control: ControlResult{
			CreateToActive: Summary{N: 50, P50: ms2(200), P99: ms2(300)},
			Event:          EventResult{Sent: 5000, Accepted: 5000, AcceptedPerSec: 6000, Succeeded: 4999, Lost: 1, Workers: 32},
		},
		Profile: ProfileResult{Tool: "perf", Seconds: 5, Load: "warm invokes at concurrency 8", Note: "n",
			ByRole: []Share{{roleServer, 20}}, ServerPaths: []Share{{"controlplane.(*Service).resolve", 6}}},
		Notes: []string{"a note"},
	}
}

func targetByName(t *testing.T, ts []Target, name string) Target {
	t.Helper()
	for _, x := range ts {
		if x.Name == name {
			return x
		}
	}
	t.Fatalf("no target %q", name)
	return Target{}
}

func TestTargets(t *testing.T) {
	ts := sampleReport().Targets()
	cases := []struct {
		name     string
		met      bool
		missHas  string
		valueHas string
	}{
		{"warm p50 (concurrency 1)", true, "", "0.80 ms vs RIE 1.00 ms"},
		// 1900 < 2 × 1000.
		{"throughput at concurrency 8", false, "100 inv/s short (1.90× RIE instead of 2×)", "1900 inv/s"},
		{"errors at concurrency 64", false, "2 errors", "2 errors in 100 invokes"},
		{"cold start after deploy", true, "", "9.00 ms"},
		{"cold start after scale-to-zero", false, "10.00 ms over (+67%)", "25.00 ms"},
		// 16 MiB per instance − 8 MiB of the function's own = 8 MiB > 5 MiB.
		{"idle warm instance overhead", false, "3.0 MiB over (+60%)", "8.0 MiB RSS (PSS 3.0 MiB, private 0.0 MiB)"},
		{"Event invokes", false, "1 lost", "6000/s accepted, 1 lost"},
	}
	for _, c := range cases {
		g := targetByName(t, ts, c.name)
		if !g.Measured || g.Met != c.met {
			t.Errorf("%s: measured %v met %v, want measured, met %v (%+v)", c.name, g.Measured, g.Met, c.met, g)
		}
		if !strings.Contains(g.Miss, c.missHas) {
			t.Errorf("%s: miss %q does not contain %q", c.name, g.Miss, c.missHas)
		}
		if !strings.Contains(g.Value, c.valueHas) {
			t.Errorf("%s: value %q does not contain %q", c.name, g.Value, c.valueHas)
		}
	}
}

func TestTargetsNotMeasured(t *testing.T) {
	r := &Report{Runs: 10}
	for _, g := range r.Targets() {
		if g.Measured || g.Met {
			t.Errorf("%s: measured %v met %v on an empty report", g.Name, g.Measured, g.Met)
		}
	}
	// A run at concurrency 64 that stopped early has errors even without
	// a counted failure.
	r = &Report{Runs: 10, Warm: []WarmRow{{Concurrency: 64, InvokeX: LoadResult{Sent: 7, OK: 7}}}}
	if g := targetByName(t, r.Targets(), "errors at concurrency 64"); g.Met {
		t.Errorf("7 of 10 sent counted as met: %+v", g)
	}
}

func TestWriteText(t *testing.T) {
	var b bytes.Buffer
	if err := sampleReport().WriteText(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"c=1 p50", "0.80 ms", "1.00 ms", "0.80×", // InvokeX, RIE, ratio
		"c=8 p50", "crashed", "11 of 12 (crashed)",
		"after deploy: first byte − init p50", "9.00 ms", "3.00 ms", // net InvokeX, net RIE
		"idle instances per GiB (by PSS)", "102", // 1 GiB / 10 MiB
		"Event invokes succeeded / failed / lost", "4999 / 0 / 1",
		"RIE at concurrency 8: crashed: panic: x",
		"- a note",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("text report lacks %q\n%s", want, out)
		}
	}
	// The ratio of a level where RIE crashed is not computed.
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "c=8 p50") && strings.Contains(line, "×") {
			t.Errorf("ratio against a crashed RIE: %q", line)
		}
	}
}

func TestMarkdownKeepsNotes(t *testing.T) {
	r := sampleReport()
	first := string(r.Markdown("invokex bench --runs 100", nil))
	for _, want := range []string{
		"# Benchmarks", "invokex bench --runs 100", "| cores |", "| 2 | Xeon | 24.0 GiB | 6.1.0 | go1.26.8 | process |",
		"## Targets", "| cold start after scale-to-zero |", "## What dominates", defaultNotes, "## How it is measured",
		"- perf, 5 s of warm invokes at concurrency 8; n\n  - CPU by process role (% of all samples): server 20.0%\n",
		"  - server hot paths (InvokeX functions, inclusive of what they call): controlplane.(*Service).resolve 6.0%",
	} {
		if !strings.Contains(first, want) {
			t.Errorf("markdown lacks %q", want)
		}
	}
	human := "The agent's wake-ups dominate: see the profile."
	edited := strings.Replace(first, defaultNotes, human, 1)
	second := string(r.Markdown("invokex bench", []byte(edited)))
	if !strings.Contains(second, human) || strings.Contains(second, defaultNotes) {
		t.Errorf("notes not kept across runs:\n%s", second)
	}
	if strings.Count(second, notesBegin) != 1 || strings.Count(second, notesEnd) != 1 {
		t.Error("notes markers duplicated")
	}
}

func TestFigureRatio(t *testing.T) {
	if got := figure("x", 3, 2, countCell); got[3] != "1.50×" {
		t.Errorf("ratio cell = %q", got[3])
	}
	if got := figure("x", -1, 2, countCell); got[1] != none || got[3] != none {
		t.Errorf("missing InvokeX value: %v", got)
	}
	if got := figure("x", 3, 0, countCell); got[3] != none {
		t.Errorf("ratio over zero: %v", got)
	}
}

func TestMemoryTableOfAVMDriver(t *testing.T) {
	r := &Report{Driver: "qemu", Memory: MemoryResult{
		Instances:   2,
		PerInstance: Mem{RSS: 100 << 20, PSS: 90 << 20, Private: 80 << 20},
		Sandbox:     Mem{RSS: 100 << 20, PSS: 90 << 20, Private: 80 << 20},
		RIEEmulator: Mem{RSS: 12 << 20, PSS: 11 << 20, Private: 11 << 20},
		RIEFunction: Mem{RSS: 8 << 20, PSS: 8 << 20, Private: 8 << 20},
		Processes:   "qemu-system-x86 (sandbox init, 100.0 MiB RSS)",
		IdleCPU:     2500 * time.Microsecond, IdleCPUMeasured: true,
	}}
	var names []string
	idleCPU := ""
	for _, row := range r.memoryTable().rows {
		names = append(names, row[0])
		if strings.Contains(row[0], "host CPU") {
			idleCPU = row[1]
		}
	}
	all := strings.Join(names, "\n")
	if !strings.Contains(all, "per idle VM, host memory of its VMM process, RSS") || strings.Contains(all, "overhead beyond the function's own") {
		t.Fatalf("VM memory rows:\n%s", all)
	}
	if idleCPU != "2.5 ms/s" {
		t.Errorf("idle VM's CPU cell = %q, want 2.5 ms/s", idleCPU)
	}
	r.Memory.IdleCPU, r.Memory.IdleCPUMeasured = 0, false
	for _, row := range r.memoryTable().rows {
		if strings.Contains(row[0], "host CPU") && row[1] != none {
			t.Errorf("unmeasured idle CPU shown as %q", row[1])
		}
	}
	r.Driver = "process"
	names = names[:0]
	for _, row := range r.memoryTable().rows {
		names = append(names, row[0])
	}
	if all := strings.Join(names, "\n"); !strings.Contains(all, "overhead beyond the function's own, RSS") {
		t.Fatalf("process memory rows:\n%s", all)
	}
}

func TestVMTargets(t *testing.T) {
	r := sampleReport()
	r.Driver = "qemu"
	ts := r.Targets()
	if len(ts) != 7 {
		t.Fatalf("%d VM targets, want 7: %+v", len(ts), ts)
	}
	if g := targetByName(t, ts, "SnapStart restore to first response"); g.Measured {
		t.Errorf("SnapStart measured without samples: %+v", g)
	}
	for _, name := range []string{"VM cold boot to first response, after deploy", "warm invoke through the VM", "host memory per idle 128 MB VM"} {
		if g := targetByName(t, ts, name); !g.Measured {
			t.Errorf("%s not measured: %+v", name, g)
		}
	}
	// The sample's warm p50 is 0.80 ms, its instances 16 MiB.
	if g := targetByName(t, ts, "warm invoke through the VM"); !g.Met {
		t.Errorf("warm: %+v", g)
	}
	if g := targetByName(t, ts, "host memory per idle 128 MB VM"); !g.Met || !strings.Contains(g.Value, "16.0 MiB") {
		t.Errorf("memory: %+v", g)
	}
}

func TestSnapStartTargets(t *testing.T) {
	r := sampleReport()
	r.Driver = "qemu"
	r.ColdAfterScaleZero.TTFB = Summary{N: 50, P50: 1000 * time.Millisecond}
	r.SnapStart = SnapStartResult{
		Restore:    ColdSeries{TTFB: Summary{N: 50, P50: 50 * time.Millisecond}},
		RestoredVM: Mem{RSS: 60 << 20, PSS: 50 << 20},
	}
	ts := r.Targets()
	if g := targetByName(t, ts, "SnapStart restore to first response"); !g.Measured || !g.Met || !strings.Contains(g.Value, "0.05×") {
		t.Errorf("restore: %+v", g)
	}
	if g := targetByName(t, ts, "host memory per restored 128 MB VM"); !g.Measured || g.Met || !strings.Contains(g.Miss, "4.0 MiB over") {
		t.Errorf("restored memory: %+v", g)
	}
	r.SnapStart.Restore.TTFB.P50 = 200 * time.Millisecond
	if g := targetByName(t, r.Targets(), "SnapStart restore to first response"); g.Met || !strings.Contains(g.Miss, "120.0 ms over") || !strings.Contains(g.Miss, "0.20×") {
		t.Errorf("slow restore: %+v", g)
	}
}
