package qemu

import (
	"log/slog"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Bounds of what one VM may put into the harness's log (its serial
// console and QEMU's stderr, each): a misbehaving guest must not flood the
// host's log or disk. Nothing of the console is written to a file.
const (
	maxLogBudget = 256 << 10
	tailLines    = 12
)

// newConsoleLog is the log of the guest's serial console (QEMU's stdout):
// the kernel's lines at debug level, the guest init's slog records at
// their own level but never above info: the guest is not trusted to raise
// alarms.
func newConsoleLog(log *slog.Logger) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{
		Msg: "vm output", Level: slog.LevelDebug, Max: slog.LevelInfo,
		Budget: maxLogBudget, Tail: tailLines,
	})
}

// newQEMULog is the log of QEMU's own stderr, at info level, at most warn.
func newQEMULog(log *slog.Logger) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{
		Msg: "vm output", Level: slog.LevelInfo, Max: slog.LevelWarn,
		Budget: maxLogBudget, Tail: tailLines,
	})
}
