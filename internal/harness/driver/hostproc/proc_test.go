package hostproc

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// comm may hold spaces and parentheses; fields count after the last ')'.
	line := "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10\n"
	st, state, err := parseStat(4242, line)
	if err != nil || st != 987654 || state != 'S' {
		t.Errorf("parseStat = %d, %q, %v; want 987654, 'S', nil", st, state, err)
	}
	for _, bad := range []string{"", "4242 (x S 1", "4242 (x) S 1 2 3", "4242 (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 notanumber 1"} {
		if _, _, err := parseStat(4242, bad); err == nil {
			t.Errorf("parseStat(%q) succeeded", bad)
		}
	}
}

func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func lookup(t *testing.T, pid int) Proc {
	t.Helper()
	p, err := Lookup(pid)
	if err != nil {
		t.Fatalf("Lookup(%d): %v", pid, err)
	}
	return p
}

// waitGone polls until p is no longer running (a zombie counts as gone).
func waitGone(t *testing.T, p Proc) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.Running() {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still running", p.PID)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestLookupRunning(t *testing.T) {
	self := lookup(t, os.Getpid())
	if self.StartTime == 0 || !self.Running() {
		t.Errorf("this process: %+v, running %v", self, self.Running())
	}
	if _, err := Lookup(1 << 30); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Lookup of a pid that cannot exist = %v, want fs.ErrNotExist", err)
	}
	// The same pid with another start time is another process (a
	// recycled pid).
	if other := (Proc{PID: self.PID, StartTime: self.StartTime + 1}); other.Running() {
		t.Errorf("%+v counts as running", other)
	}
	if (Proc{}).Running() || (Proc{PID: -1}).Running() {
		t.Errorf("a zero or negative pid counts as running")
	}
	// A child that died but is not yet waited for is a zombie: gone,
	// though its pid still exists.
	cmd := startSleep(t)
	p := lookup(t, cmd.Process.Pid)
	if !p.Running() {
		t.Fatalf("fresh child %+v not running", p)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitGone(t, p)
	if _, err := os.Stat("/proc/" + strconv.Itoa(p.PID)); err != nil {
		t.Errorf("the zombie's pid should still exist: %v", err)
	}
}

func TestKill(t *testing.T) {
	ctx := context.Background()
	cmd := startSleep(t)
	p := lookup(t, cmd.Process.Pid)

	// still saying no (the pid runs something else) spares it.
	asked := false
	if err := p.Kill(ctx, func() bool { asked = true; return false }); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if !asked || !p.Running() {
		t.Fatalf("Kill with still false: asked %v, running %v; want asked and running", asked, p.Running())
	}
	// A record of another start time (a recycled pid) is never killed.
	stale := Proc{PID: p.PID, StartTime: p.StartTime - 1}
	if err := stale.Kill(ctx, nil); err != nil {
		t.Fatalf("Kill of a stale record: %v", err)
	}
	if !p.Running() {
		t.Fatalf("Kill of a stale record killed pid %d", p.PID)
	}

	if err := p.Kill(ctx, func() bool { return true }); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	// Kill returns once the process is gone.
	if p.Running() {
		t.Errorf("pid %d still running after Kill", p.PID)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Errorf("child ended with %v, want SIGKILL", err)
	}
	// Gone: nothing to do, no error.
	if err := p.Kill(ctx, nil); err != nil {
		t.Errorf("Kill of a gone process: %v", err)
	}
}
