package bench

import (
	"fmt"
	"time"
)

// Report is everything one benchmark run measured. Durations are client
// side (the benchmark's own clock) unless named Init, which is the
// system's own account of the function's init.
type Report struct {
	Date    time.Time
	Machine Machine
	Driver  string
	// The run's sizes.
	Runs        int
	ColdStarts  int
	EventCount  int
	UpdateRuns  int
	Concurrency []int
	// Warm is one row per concurrency level, in Concurrency's order.
	Warm []WarmRow
	// Cold starts. RIE's cold start is a fresh emulator process: the same
	// thing after "deploy" and after "scale to zero", so both InvokeX rows
	// are compared with the one RIE series.
	ColdAfterDeploy    ColdSeries
	ColdAfterScaleZero ColdSeries
	ColdRIE            ColdSeries
	Memory             MemoryResult
	SnapStart          SnapStartResult
	Control            ControlResult
	// Profile is taken during warm invokes, EventProfile during a burst
	// of Event invokes; both on extra, unmeasured loads.
	Profile      ProfileResult
	EventProfile ProfileResult
	// Notes are things the reader must know: phases that failed or were
	// skipped, and what RIE did.
	Notes []string
}

// Machine is what the figures were measured on.
type Machine struct {
	Cores     int
	CPU       string
	Kernel    string
	GoVersion string
	MemTotal  int64 // bytes
	// LoadAvg is the 1, 5 and 15 minute load averages when the run
	// started and LoadAvgEnd when it ended: other work on the machine
	// skews every figure.
	LoadAvg    string
	LoadAvgEnd string
}

// WarmRow is warm invoke latency and throughput at one concurrency level.
type WarmRow struct {
	Concurrency int
	InvokeX     LoadResult
	RIE         LoadResult
	// RIENote says what happened to RIE at this level when it failed.
	RIENote string
	// InvokeXInstances is how many instances InvokeX had after the level.
	InvokeXInstances int
	// CPU per successful invocation, by component.
	InvokeXCPU CPUPerInvoke
	RIECPU     CPUPerInvoke
	// OtherCPU is the share of the machine's CPU that other processes
	// used during the level's measurement (-1: unknown). The machine may
	// be shared; a high value means every figure of the level is low.
	OtherCPU float64
}

// ColdSeries is a series of cold starts: the first invoke of a new
// instance.
type ColdSeries struct {
	// TTFB is the time to the first byte of the response, Total to the
	// whole response; Init is the function's init as the system reported
	// it; Net is TTFB minus Init per sample: the platform's own share.
	TTFB  Summary
	Total Summary
	Init  Summary
	Net   Summary
	// DriverStart is the sandbox driver's share of each cold start, from
	// the server's debug log (InvokeX after scale-to-zero only).
	DriverStart Summary
	// Cold counts samples the system itself reported as cold starts
	// (InvokeX's record says Cold; RIE logs an INIT REPORT).
	Cold   int
	Errors int
	// FirstError describes the first failure.
	FirstError string
	// Why, when set, says why the series was not measured.
	Why string
}

// MemoryResult is the memory of the servers and of idle warm instances.
type MemoryResult struct {
	// InvokeX server process alone: just started, with the idle instances
	// up, and after the warm-invoke load.
	ServerIdle          Mem
	ServerWithInstances Mem
	ServerAfterLoad     Mem
	// Instances is how many idle warm instances were measured; the
	// figures below are means over them.
	Instances int
	// PerInstance is all of one instance's processes; Sandbox is its init
	// and agent; Function is the function process inside it.
	PerInstance Mem
	Sandbox     Mem
	Function    Mem
	// SandboxFresh is Sandbox measured 1 s after the instances' last
	// invoke, before the agent's idle trim; the others after IdleSettle.
	SandboxFresh Mem
	// IdleCPU is the host CPU one idle sandbox (all its processes: a VM's
	// VMM) used per second of wall time, over IdleCPUWindow after the
	// idle figures: what keeping an instance warm costs the host's CPU.
	// Warm sandboxes count as sandboxes. IdleCPUMeasured is false when
	// /proc could not be read.
	IdleCPU         time.Duration `json:",omitempty"`
	IdleCPUMeasured bool          `json:",omitempty"`
	// Processes names one instance's processes, e.g. "invokex, invokex, bootstrap".
	Processes string
	// Warm is how many sandboxes started ahead of need (the process
	// driver's warm sandboxes, the qemu driver's spare VMs) the driver kept
	// beside the instances (started ahead of need, no function yet; not in the
	// figures above); WarmEach is one's memory.
	Warm     int `json:",omitempty"`
	WarmEach Mem
	// Cgroup is the instance cgroup's memory (memory.current: includes
	// kernel memory and page cache), or -1 when unavailable.
	Cgroup int64
	// RIEEmulator is the emulator process; RIEFunction the function
	// process it started: the function's own memory.
	RIEEmulator Mem
	RIEFunction Mem
	Why         string
}

// Overhead is an idle warm instance's memory beyond the function's own.
// RSS is the definition: all of the instance's processes minus the
// function process's RSS under RIE. PSS and Private are the sandbox
// processes' own (init and agent): an instance's function shares its
// binary's pages with the other instances' functions, so its PSS is
// smaller than under RIE and a subtraction would understate the overhead.
func (m MemoryResult) Overhead() Mem {
	return Mem{
		RSS:     m.PerInstance.RSS - m.RIEFunction.RSS,
		PSS:     m.Sandbox.PSS,
		Private: m.Sandbox.Private,
	}
}

// ControlResult is the control plane's figures (InvokeX only: RIE has no
// control plane).
type ControlResult struct {
	// CreateToActive: CreateFunction sent until GetFunction says Active.
	CreateToActive Summary
	// UpdateToNewCode: UpdateFunctionCode sent until the first response
	// produced by the new code.
	UpdateToNewCode Summary
	UpdateErrors    int
	Event           EventResult
}

// EventResult is a burst of Event (asynchronous) invocations.
type EventResult struct {
	Sent     int
	Accepted int
	Rejected int
	Workers  int
	// AcceptWall is from the first request sent to the last 202 received.
	AcceptWall     time.Duration
	AcceptedPerSec float64
	// Final states of the accepted invocations; Lost never reached one.
	Succeeded int
	Failed    int
	Lost      int
	// AllRun is from the first request sent to the end of the last
	// invocation (its record's End); AfterAccept from the last 202.
	AllRun      time.Duration
	AfterAccept time.Duration
	FirstError  string
	Why         string
}

// ProfileResult is where CPU time went during a warm load on InvokeX.
type ProfileResult struct {
	// Tool is "pprof" (the server's /debug/pprof) or "perf" (system-wide
	// sampling); empty when no profile was taken, and Note says why.
	Tool    string
	Note    string
	Seconds int
	// Load says what ran during the profile.
	Load string
	// ByRole is the share of all samples (idle included) per process role.
	ByRole []Share
	// Server, Sandbox and Function are the top symbols within the server,
	// within the sandboxes' init and agent processes, and within the
	// function processes, as shares of all samples.
	Server   []Share
	Sandbox  []Share
	Function []Share
	// ServerPaths and SandboxPaths are InvokeX's own functions by
	// inclusive share (with everything they call): the hot paths.
	ServerPaths  []Share
	SandboxPaths []Share
	// PprofTop is `go tool pprof -top` output when Tool is pprof.
	PprofTop string
}

// Share is a named percentage of profile samples.
type Share struct {
	Name    string
	Percent float64
}

// Target is one of the goals and whether this run met it.
type Target struct {
	Name string
	Goal string
	// Value is the measured figure, Miss how far it is from the goal when
	// not met.
	Value    string
	Measured bool
	Met      bool
	Miss     string
}

// warm returns the row for concurrency c.
func (r *Report) warm(c int) (WarmRow, bool) {
	for _, w := range r.Warm {
		if w.Concurrency == c {
			return w, true
		}
	}
	return WarmRow{}, false
}

// Targets evaluates the targets on the report.
func (r *Report) Targets() []Target {
	if isVMDriver(r.Driver) {
		return r.vmTargets()
	}
	var ts []Target

	t := Target{Name: "warm p50 (concurrency 1)", Goal: "≤ RIE's p50"}
	if w, ok := r.warm(1); ok && w.InvokeX.OK > 0 && w.RIE.OK > 0 {
		ix, rie := w.InvokeX.Latency.P50, w.RIE.Latency.P50
		t.Measured = true
		t.Value = fmt.Sprintf("%s vs RIE %s", fmtMs(ix), fmtMs(rie))
		t.Met = ix <= rie
		if !t.Met {
			t.Miss = fmt.Sprintf("%s slower (%s)", fmtMs(ix-rie), pctOver(ms(ix), ms(rie)))
		}
	}
	ts = append(ts, t)

	t = Target{Name: "throughput at concurrency 8", Goal: "≥ 2× RIE's sequential inv/s, 0 errors"}
	w8, ok8 := r.warm(8)
	w1, ok1 := r.warm(1)
	if ok8 && ok1 && w8.InvokeX.Sent > 0 && w1.RIE.OK > 0 {
		goal := 2 * w1.RIE.PerSec
		t.Measured = true
		t.Value = fmt.Sprintf("%.0f inv/s, %d errors vs goal %.0f inv/s", w8.InvokeX.PerSec, w8.InvokeX.Errors, goal)
		t.Met = w8.InvokeX.PerSec >= goal && w8.InvokeX.Errors == 0
		if !t.Met {
			var miss []string
			if w8.InvokeX.PerSec < goal {
				miss = append(miss, fmt.Sprintf("%.0f inv/s short (%.2f× RIE instead of 2×)", goal-w8.InvokeX.PerSec, w8.InvokeX.PerSec/w1.RIE.PerSec))
			}
			if w8.InvokeX.Errors > 0 {
				miss = append(miss, fmt.Sprintf("%d errors", w8.InvokeX.Errors))
			}
			t.Miss = joinComma(miss)
		}
	}
	ts = append(ts, t)

	t = Target{Name: "errors at concurrency 64", Goal: "0 errors"}
	if w, ok := r.warm(64); ok && w.InvokeX.Sent > 0 {
		t.Measured = true
		t.Value = fmt.Sprintf("%d errors in %d invokes", w.InvokeX.Errors, w.InvokeX.Sent)
		t.Met = w.InvokeX.Errors == 0 && w.InvokeX.Sent == r.Runs
		if !t.Met {
			t.Miss = fmt.Sprintf("%d errors", w.InvokeX.Errors+r.Runs-w.InvokeX.Sent)
		}
	}
	ts = append(ts, t)

	for _, c := range []struct {
		name string
		s    ColdSeries
	}{{"cold start after deploy", r.ColdAfterDeploy}, {"cold start after scale-to-zero", r.ColdAfterScaleZero}} {
		t = Target{Name: c.name, Goal: "p50 ≤ 15 ms to first byte, excluding the function's init"}
		if c.s.Net.N > 0 {
			t.Measured = true
			t.Value = fmt.Sprintf("%s (to first byte %s, init %s)", fmtMs(c.s.Net.P50), fmtMs(c.s.TTFB.P50), fmtMs(c.s.Init.P50))
			t.Met = c.s.Net.P50 <= 15*time.Millisecond
			if !t.Met {
				t.Miss = fmt.Sprintf("%s over (%s)", fmtMs(c.s.Net.P50-15*time.Millisecond), pctOver(ms(c.s.Net.P50), 15))
			}
		}
		ts = append(ts, t)
	}

	t = Target{Name: "idle warm instance overhead", Goal: "≤ 5 MiB RSS beyond the function's own"}
	if m := r.Memory; m.Instances > 0 && m.RIEFunction.RSS > 0 {
		o := m.Overhead()
		t.Measured = true
		t.Value = fmt.Sprintf("%s RSS (PSS %s, private %s)", fmtMiB(o.RSS), fmtMiB(o.PSS), fmtMiB(o.Private))
		t.Met = o.RSS <= 5<<20
		if !t.Met {
			t.Miss = fmt.Sprintf("%s over (%s)", fmtMiB(o.RSS-5<<20), pctOver(float64(o.RSS), 5<<20))
		}
	}
	ts = append(ts, t)

	t = Target{Name: "Event invokes", Goal: "≥ 5,000/s accepted, none lost"}
	if e := r.Control.Event; e.Sent > 0 {
		t.Measured = true
		t.Value = fmt.Sprintf("%.0f/s accepted, %d lost, %d rejected", e.AcceptedPerSec, e.Lost, e.Rejected)
		t.Met = e.AcceptedPerSec >= 5000 && e.Lost == 0 && e.Rejected == 0
		if !t.Met {
			var miss []string
			if e.AcceptedPerSec < 5000 {
				miss = append(miss, fmt.Sprintf("%.0f/s short (%s)", 5000-e.AcceptedPerSec, pctOver(e.AcceptedPerSec, 5000)))
			}
			if e.Lost > 0 {
				miss = append(miss, fmt.Sprintf("%d lost", e.Lost))
			}
			if e.Rejected > 0 {
				miss = append(miss, fmt.Sprintf("%d rejected", e.Rejected))
			}
			t.Miss = joinComma(miss)
		}
	}
	ts = append(ts, t)
	return ts
}

// vmTargets are the microVM issue's targets: a provided function's cold
// boot to its first response, the warm invoke through the VM, and the host
// memory an idle booted 128 MB VM holds.
func (r *Report) vmTargets() []Target {
	var ts []Target
	for _, c := range []struct {
		name string
		s    ColdSeries
	}{{"VM cold boot to first response, after deploy", r.ColdAfterDeploy}, {"VM cold boot to first response, after scale-to-zero", r.ColdAfterScaleZero}} {
		t := Target{Name: c.name, Goal: "p50 ≤ 0.6 s (provided function)"}
		if c.s.TTFB.N > 0 {
			t.Measured = true
			t.Value = fmt.Sprintf("%s (init %s)", fmtMs(c.s.TTFB.P50), fmtMs(c.s.Init.P50))
			t.Met = c.s.TTFB.P50 <= 600*time.Millisecond
			if !t.Met {
				t.Miss = fmt.Sprintf("%s over (%s)", fmtMs(c.s.TTFB.P50-600*time.Millisecond), pctOver(ms(c.s.TTFB.P50), 600))
			}
		}
		ts = append(ts, t)
	}
	t := Target{Name: "warm invoke through the VM", Goal: "p50 ≤ 1 ms"}
	if w, ok := r.warm(1); ok && w.InvokeX.OK > 0 {
		p50 := w.InvokeX.Latency.P50
		t.Measured = true
		t.Value = fmtMs(p50)
		t.Met = p50 <= time.Millisecond
		if !t.Met {
			t.Miss = fmt.Sprintf("%s over (%s)", fmtMs(p50-time.Millisecond), pctOver(ms(p50), 1))
		}
	}
	ts = append(ts, t)
	t = Target{Name: "host memory per idle 128 MB VM", Goal: "≤ 80 MiB RSS"}
	if m := r.Memory; m.Instances > 0 {
		t.Measured = true
		t.Value = fmt.Sprintf("%s RSS (PSS %s)", fmtMiB(m.PerInstance.RSS), fmtMiB(m.PerInstance.PSS))
		t.Met = m.PerInstance.RSS <= 80<<20
		if !t.Met {
			t.Miss = fmt.Sprintf("%s over (%s)", fmtMiB(m.PerInstance.RSS-80<<20), pctOver(float64(m.PerInstance.RSS), 80<<20))
		}
	}
	ts = append(ts, t)
	return append(ts, r.snapStartTargets()...)
}

// pctOver renders how much a exceeds b as a percentage of b: "+21%".
func pctOver(a, b float64) string {
	if b <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%+.0f%%", (a-b)/b*100)
}

func joinComma(s []string) string {
	out := ""
	for i, v := range s {
		if i > 0 {
			out += ", "
		}
		out += v
	}
	return out
}
