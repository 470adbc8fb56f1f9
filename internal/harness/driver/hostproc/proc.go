package hostproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// KillWait bounds how long Kill and Stop wait for a process to be gone
// after SIGKILL. SIGKILL cannot be caught; a process that outlives this is
// stuck in the kernel (e.g. uninterruptible I/O) and is reported.
const KillWait = 10 * time.Second

// Proc names one process for its whole life. A pid alone may be recycled
// once the process is gone; a pid with its start time cannot within a
// boot. Drivers record it (see WriteRecord) so that a restarted harness
// finds and kills exactly the processes its predecessor left.
type Proc struct {
	PID int
	// StartTime is field 22 of /proc/<pid>/stat: when the process started,
	// in clock ticks since boot.
	StartTime uint64
}

// Lookup returns the Proc that pid is now. Its error wraps fs.ErrNotExist
// when there is no such process.
func Lookup(pid int) (Proc, error) {
	st, _, err := stat(pid)
	if err != nil {
		return Proc{}, err
	}
	return Proc{PID: pid, StartTime: st}, nil
}

// Running reports whether p is alive: its pid exists with p's start time
// and is not a zombie (which has released everything but its pid, and
// which only its parent can remove).
func (p Proc) Running() bool {
	if p.PID <= 0 {
		return false
	}
	st, state, err := stat(p.PID)
	return err == nil && st == p.StartTime && state != 'Z' && state != 'X'
}

// Kill SIGKILLs p and waits until it is gone, at most KillWait (less if
// ctx ends first). It first pins the process with a pidfd, so the signal
// cannot reach a process that took over the pid; it then sends nothing
// if p is no longer running or still (nil: no further check) reports
// false, e.g. because the pid runs some other program. A p already gone
// is not an error.
func (p Proc) Kill(ctx context.Context, still func() bool) error {
	if p.PID <= 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(p.PID, 0)
	if err != nil {
		return nil // already gone
	}
	defer unix.Close(fd)
	if !p.Running() || (still != nil && !still()) {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("killing pid %d: %w", p.PID, err)
	}
	ctx, cancel := context.WithTimeout(ctx, KillWait)
	defer cancel()
	for p.Running() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for pid %d to exit: %w", p.PID, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	return nil
}

// stat returns pid's start time (clock ticks since boot) and state letter
// (R, S, Z ...) from /proc/<pid>/stat.
func stat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	return parseStat(pid, string(b))
}

func parseStat(pid int, s string) (uint64, byte, error) {
	// comm (field 2) may contain spaces and parentheses: fields are
	// counted after its last ')'.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); start time is field 22.
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
	}
	return st, f[0][0], nil
}
