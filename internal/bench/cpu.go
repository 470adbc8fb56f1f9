package bench

import (
	"fmt"
	"os"
	"strconv"
	"strings"
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

// total is all of it (sandbox is part of platform).
func (t cpuTicks) total() int64 { return t.platform + t.function + t.client }

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

// parseProcStatBusy returns the machine's busy CPU time, in ticks, from
// /proc/stat's first line: everything but idle and iowait.
func parseProcStatBusy(b []byte) (int64, error) {
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("malformed /proc/stat line %q", truncate(line, 80))
	}
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest and guest_nice are already in user and nice
			break
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("malformed /proc/stat line %q: %w", truncate(line, 80), err)
		}
		busy += n
	}
	return busy, nil
}

// machineBusy reads the machine's busy CPU ticks, or -1.
func (p procFS) machineBusy() int64 {
	b, err := os.ReadFile(p.Root + "/stat")
	if err != nil {
		return -1
	}
	n, err := parseProcStatBusy(b)
	if err != nil {
		return -1
	}
	return n
}

// otherShare is the share of the machine's CPU capacity that processes
// other than the measured ones used over wall: busy ticks of the whole
// machine minus ours, over cores × wall.
func otherShare(busyDelta, oursTicks int64, wall time.Duration, cores int) float64 {
	if busyDelta < 0 || wall <= 0 || cores <= 0 {
		return -1
	}
	capacity := float64(wall) / float64(clockTick) * float64(cores)
	other := float64(busyDelta - oursTicks)
	if other < 0 {
		other = 0
	}
	return other / capacity
}
