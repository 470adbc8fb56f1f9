package hostproc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// Supervise starts the goroutine that is cmd's only Wait; cmd must have
// been started. When the process has exited and its output is drained
// (bounded by cmd.WaitDelay), the goroutine calls exited, then closes
// done. exited gets Wait's error, except that a SIGKILL — how drivers end
// their children — counts as a clean exit (nil): exited is where a driver
// flushes the child's output and logs an unexpected death.
func Supervise(cmd *exec.Cmd, done chan<- struct{}, exited func(err error)) {
	go func() {
		err := cmd.Wait()
		if killed(err) {
			err = nil
		}
		exited(err)
		close(done)
	}()
}

func killed(err error) bool {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	return false
}

// Stop ends the child p whose Supervise closes done. Unless ctx is
// already done and if grace (shortened to ctx's deadline) is positive, it
// asks the child to exit — ask(grace), or SIGTERM when ask is nil — and
// waits for done up to grace, or until ctx is done. Then it sends SIGKILL
// (os.Process signals through a pidfd: never a recycled pid) and waits
// for done up to KillWait; the only error is a child that outlives that.
// A child already gone makes Stop return at once.
func Stop(ctx context.Context, p *os.Process, done <-chan struct{}, grace time.Duration, ask func(grace time.Duration)) error {
	select {
	case <-done:
		return nil
	default:
	}
	if dl, ok := ctx.Deadline(); ok {
		grace = min(grace, time.Until(dl))
	}
	if ctx.Err() != nil {
		grace = 0
	}
	if grace > 0 {
		if ask != nil {
			ask(grace)
		} else {
			_ = p.Signal(syscall.SIGTERM)
		}
		t := time.NewTimer(grace)
		select {
		case <-done:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	_ = p.Signal(syscall.SIGKILL)
	t := time.NewTimer(KillWait)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
		return fmt.Errorf("pid %d did not exit within %s of SIGKILL", p.Pid, KillWait)
	}
}
