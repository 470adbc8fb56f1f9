package harness

import "time"

// Stats is a snapshot of the harness, for tests, metrics and operators.
// Counters count since New.
type Stats struct {
	// Functions maps a function name to its instances.
	Functions map[string]FunctionStats
	// Instances counts instances that are not gone; MemoryMB is the memory
	// they reserve on the host.
	Instances int
	MemoryMB  int

	Invocations uint64 // admitted invocations (not throttled)
	ColdStarts  uint64 // sandboxes that reached INIT's end
	Throttles   uint64
	InitErrors  uint64 // cold starts whose INIT failed
	Resets      uint64 // instances destroyed after the agent reported a reset
	Timeouts    uint64 // invocations the agent never answered (safety net)
	Exits       uint64 // sandboxes that exited on their own
	Evictions   uint64 // idle instances stopped to make room on the host
	Stops       uint64 // instances gone

	// DriverStart and Init sum the phases of all cold starts.
	DriverStart time.Duration
	Init        time.Duration
}

// FunctionStats counts one function's instances by state.
type FunctionStats struct {
	Starting, Idle, Busy, Stopping int
	// Revisions counts instances (any state but gone) per revision.
	Revisions map[string]int
}

// Total is the number of instances that are not gone.
func (f FunctionStats) Total() int { return f.Starting + f.Idle + f.Busy + f.Stopping }

// Stats returns a snapshot. Pools are read one at a time, so the snapshot
// is consistent per function but not across functions.
func (h *Harness) Stats() Stats {
	s := Stats{Functions: map[string]FunctionStats{}}
	for _, p := range h.poolList() {
		p.mu.Lock()
		f := FunctionStats{
			Starting:  p.counts[StateStarting],
			Idle:      p.counts[StateIdle],
			Busy:      p.counts[StateBusy],
			Stopping:  p.counts[StateStopping],
			Revisions: map[string]int{},
		}
		for _, i := range p.instances {
			f.Revisions[i.revision]++
		}
		p.mu.Unlock()
		if f.Total() > 0 {
			s.Functions[p.name] = f
		}
		s.Instances += f.Total()
	}
	h.capMu.Lock()
	s.MemoryMB = h.hostMemoryMB
	h.capMu.Unlock()
	c := &h.stats
	s.Invocations = c.invocations.Load()
	s.ColdStarts = c.coldStarts.Load()
	s.Throttles = c.throttles.Load()
	s.InitErrors = c.initErrors.Load()
	s.Resets = c.resets.Load()
	s.Timeouts = c.timeouts.Load()
	s.Exits = c.exits.Load()
	s.Evictions = c.evictions.Load()
	s.Stops = c.stops.Load()
	s.DriverStart = time.Duration(c.driverStartNs.Load())
	s.Init = time.Duration(c.initNs.Load())
	return s
}
