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

// perInvoke turns two samples into CPU per invocation. A process seen only
// in after started during the load and counts whole; one seen only in
// before exited and its time is lost (the kernel keeps no account of it).
func perInvoke(before, after cpuSample, n int) CPUPerInvoke {
	if n <= 0 {
		return CPUPerInvoke{}
	}
	delta := func(b, a map[int]int64) int64 {
		var d int64
		for pid, v := range a {
			d += v - b[pid]
		}
		return d
	}
	per := func(ticks int64) time.Duration { return time.Duration(ticks) * clockTick / time.Duration(n) }
	sb := delta(before.sandbox, after.sandbox)
	return CPUPerInvoke{
		Platform: per(delta(before.platform, after.platform) + sb),
		Sandbox:  per(sb),
		Function: per(delta(before.function, after.function)),
		Client:   per(after.client - before.client),
		Measured: true,
	}
}

// loadWithCPU runs load and measures the CPU it cost under root.
func (r *runner) loadWithCPU(root int, load func() LoadResult) (LoadResult, CPUPerInvoke) {
	before, err := sampleCPU(r.fs, root, r.fnComm)
	res := load()
	if err != nil {
		return res, CPUPerInvoke{}
	}
	after, err := sampleCPU(r.fs, root, r.fnComm)
	if err != nil {
		return res, CPUPerInvoke{}
	}
	return res, perInvoke(before, after, res.OK)
}
