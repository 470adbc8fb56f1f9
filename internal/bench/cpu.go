package bench

import (
	"os"
	"strconv"
	"time"
)

// CPUPerInvoke is the CPU time (user + system) spent per successful
// invocation during a load, by component. It is the profile's cheapest
// evidence: what each hop costs, independent of how the scheduler
// overlapped them.
type CPUPerInvoke struct {
	// Platform is InvokeX's server plus its sandboxes' own processes (init
	// and agent), or RIE's emulator process.
	Platform time.Duration
	// Sandbox is the part of Platform spent in InvokeX's sandbox
	// processes (0 for RIE).
	Sandbox time.Duration
	// Function is the function processes; Client the benchmark itself.
	Function time.Duration
	Client   time.Duration
	// Measured is false when no sample was taken.
	Measured bool
}

// cpuSample is CPU ticks per pid, by component.
type cpuSample struct {
	platform, sandbox, function map[int]int64
	client                      int64
}

// sampleCPU reads the CPU ticks of root and everything under it: root is
// InvokeX's server or RIE's emulator; processes named fnComm are the
// function; any other descendant is a sandbox process.
func sampleCPU(fs procFS, root int, fnComm string) (cpuSample, error) {
	s := cpuSample{platform: map[int]int64{}, sandbox: map[int]int64{}, function: map[int]int64{}}
	procs, err := fs.Procs()
	if err != nil {
		return s, err
	}
	for _, p := range procs {
		if p.PID == root {
			s.platform[p.PID] = p.CPU
		}
	}
	for _, p := range Descendants(procs, root) {
		if p.Comm == fnComm {
			s.function[p.PID] = p.CPU
		} else {
			s.sandbox[p.PID] = p.CPU
		}
	}
	if b, err := os.ReadFile(fs.Root + "/" + strconv.Itoa(os.Getpid()) + "/stat"); err == nil {
		if p, err := parseStat(b); err == nil {
			s.client = p.CPU
		}
	}
	return s, nil
}

// cpuTicks is CPU time by component, in clock ticks.
type cpuTicks struct{ platform, sandbox, function, client int64 }

func (t cpuTicks) add(o cpuTicks) cpuTicks {
	return cpuTicks{t.platform + o.platform, t.sandbox + o.sandbox, t.function + o.function, t.client + o.client}
}

// cpuDelta is the CPU used between two samples. A process seen only in
// after started in between and counts whole; one seen only in before
// exited and its time is lost (the kernel keeps no account of it).
func cpuDelta(before, after cpuSample) cpuTicks {
	delta := func(b, a map[int]int64) int64 {
		var d int64
		for pid, v := range a {
			d += v - b[pid]
		}
		return d
	}
	sb := delta(before.sandbox, after.sandbox)
	return cpuTicks{
		platform: delta(before.platform, after.platform) + sb,
		sandbox:  sb,
		function: delta(before.function, after.function),
		client:   after.client - before.client,
	}
}

// per returns the CPU per invocation for n invocations.
func (t cpuTicks) per(n int) CPUPerInvoke {
	if n <= 0 {
		return CPUPerInvoke{}
	}
	per := func(ticks int64) time.Duration { return time.Duration(ticks) * clockTick / time.Duration(n) }
	return CPUPerInvoke{
		Platform: per(t.platform),
		Sandbox:  per(t.sandbox),
		Function: per(t.function),
		Client:   per(t.client),
		Measured: true,
	}
}

// perInvoke turns two samples into CPU per invocation.
func perInvoke(before, after cpuSample, n int) CPUPerInvoke {
	return cpuDelta(before, after).per(n)
}

// loadTicks runs load and measures the CPU it cost under root. ok is false
// when /proc could not be read.
func (r *runner) loadTicks(root int, load func() LoadResult) (LoadResult, cpuTicks, bool) {
	before, err := sampleCPU(r.fs, root, r.fnComm)
	res := load()
	if err != nil {
		return res, cpuTicks{}, false
	}
	after, err := sampleCPU(r.fs, root, r.fnComm)
	if err != nil {
		return res, cpuTicks{}, false
	}
	return res, cpuDelta(before, after), true
}
