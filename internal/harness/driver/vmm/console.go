package vmm

import (
	"log/slog"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Bounds of what one VM may put into the harness's log (its VMM's stdout,
// which carries the guest's serial console, and its stderr, each): a
// misbehaving guest must not flood the host's log or disk. Nothing of it
// is written to a file.
const (
	maxLogBudget = 256 << 10
	tailLines    = 12
)

// newConsoleLog is the log of the VMM's stdout: the guest's serial
// console (the kernel's lines at debug level, the guest init's slog
// records at their own level but never above info: the guest is not
// trusted to raise alarms) and whatever the VMM itself prints there.
func newConsoleLog(log *slog.Logger) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{
		Msg: "vm output", Level: slog.LevelDebug, Max: slog.LevelInfo,
		Budget: maxLogBudget, Tail: tailLines,
	})
}

// NewVMMLog is the log of what the VMM itself says (its stderr, a
// jailer's, Firecracker's logger): plain lines at level, records at most
// at warn, under the same budget as the console.
func NewVMMLog(log *slog.Logger, level slog.Level) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{
		Msg: "vm output", Level: level, Max: slog.LevelWarn,
		Budget: maxLogBudget, Tail: tailLines,
	})
}
