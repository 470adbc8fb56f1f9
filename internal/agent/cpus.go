package agent

import (
	"log/slog"

	"github.com/invokex/invokex/internal/cpuset"
)

// splitCPUs pins the agent to the first CPU it may use and returns the
// others, for the runtime (see Options.SplitCPUs); nil with fewer than 2
// CPUs or on an error (logged: the split only helps speed).
func splitCPUs(log *slog.Logger) []int {
	cpus, err := cpuset.Allowed()
	if err != nil || len(cpus) < 2 {
		if err != nil {
			log.Warn("splitting CPUs between agent and runtime", "err", err)
		}
		return nil
	}
	if err := cpuset.PinProcess(0, cpus[:1]); err != nil {
		log.Warn("splitting CPUs between agent and runtime", "err", err)
		return nil
	}
	return cpus[1:]
}
