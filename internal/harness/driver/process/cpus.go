package process

import (
	"slices"
	"sync"

	"github.com/invokex/invokex/internal/cpuset"
	"github.com/invokex/invokex/internal/harness/driver"
)

// cpuPlacer gives each sandbox the CPUs its memory buys, as the VM drivers
// give a VM its vCPUs (driver.VCPUsFor: one per 1,769 MB, as on Lambda), and
// spreads sandboxes over the host's CPUs.
//
// Why: without it a 128 MB function's runtime sees every host CPU. A Go
// runtime then runs with GOMAXPROCS = host CPUs and wakes idle threads on
// other CPUs at each hand-off between its goroutines, and the agent, the
// runtime and their handoffs bounce between CPUs: on a 2-core host about a
// fifth more CPU per warm invocation (measured with `make bench`). A
// sandbox on one CPU keeps its agent-runtime ping-pong on that CPU.
//
// It is placement, not a limit: the init is forked with the affinity
// mask (hostproc.Forker.StartOn) and everything in the sandbox inherits
// it, but a function may widen its own mask. CPU time is not capped.
//
// Safe for concurrent use.
type cpuPlacer struct {
	mu   sync.Mutex
	cpus []int       // CPUs this process may run on, ascending
	load map[int]int // sandboxes placed on each CPU
	next int         // where ties start, so equal loads rotate
}

// newCPUPlacer places on the CPUs the calling process may use.
func newCPUPlacer() *cpuPlacer {
	p := &cpuPlacer{load: map[int]int{}}
	// On an error no placement: acquire returns nil.
	p.cpus, _ = cpuset.Allowed()
	return p
}

// acquire picks the CPUs of a sandbox of memoryMB: the least loaded ones.
// nil means no placement (the sandbox gets every CPU the host has); pass
// the result to release when the sandbox is gone.
func (p *cpuPlacer) acquire(memoryMB int) []int {
	if p == nil || len(p.cpus) < 2 {
		return nil
	}
	n := driver.VCPUsFor(memoryMB, len(p.cpus))
	if n >= len(p.cpus) {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	order := make([]int, len(p.cpus))
	for k := range order {
		order[k] = p.cpus[(p.next+k)%len(p.cpus)]
	}
	// Stable: among equal loads, the rotation decides.
	slices.SortStableFunc(order, func(a, b int) int { return p.load[a] - p.load[b] })
	picked := slices.Clone(order[:n])
	slices.Sort(picked)
	for _, c := range picked {
		p.load[c]++
	}
	p.next = (p.next + 1) % len(p.cpus)
	return picked
}

// release returns CPUs that acquire gave out. nil is a no-op.
func (p *cpuPlacer) release(cpus []int) {
	if p == nil || len(cpus) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range cpus {
		if p.load[c] > 0 {
			p.load[c]--
		}
	}
}
