package hostproc

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// supervised starts sh -c script under Supervise and returns the process,
// its done channel and the error exited got (valid once done is closed).
func supervised(t *testing.T, script string) (*exec.Cmd, chan struct{}, *error) {
	t.Helper()
	cmd := exec.Command("sh", "-c", script)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var got error
	calls := 0
	Supervise(cmd, done, func(err error) { got = err; calls++ })
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		if calls != 1 {
			t.Errorf("exited called %d times, want once", calls)
		}
	})
	return cmd, done, &got
}

func waitDone(t *testing.T, done <-chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("done not closed")
	}
}

func TestSupervise(t *testing.T) {
	_, done, got := supervised(t, "exit 3")
	waitDone(t, done)
	var ee *exec.ExitError
	if !errors.As(*got, &ee) || ee.ExitCode() != 3 {
		t.Errorf("exited got %v, want exit status 3", *got)
	}

	_, done, got = supervised(t, "exit 0")
	waitDone(t, done)
	if *got != nil {
		t.Errorf("clean exit: exited got %v", *got)
	}

	cmd, done, got := supervised(t, "sleep 60")
	cmd.Process.Signal(syscall.SIGKILL)
	waitDone(t, done)
	if *got != nil {
		t.Errorf("SIGKILL counts as a clean exit; exited got %v", *got)
	}

	cmd, done, got = supervised(t, "sleep 60")
	cmd.Process.Signal(syscall.SIGTERM)
	waitDone(t, done)
	if *got == nil || !strings.Contains((*got).Error(), "terminated") {
		t.Errorf("SIGTERM: exited got %v, want the signal", *got)
	}
}

// Scripts that say "ready" once their SIGTERM trap is set: one exits
// cleanly on SIGTERM, one ignores it.
const (
	trapsTerm   = `trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done`
	ignoresTerm = `trap '' TERM; echo ready; while :; do sleep 0.05; done`
)

// supervisedReady is supervised for a script that prints "ready" once
// its traps are in place.
func supervisedReady(t *testing.T, script string) (*exec.Cmd, chan struct{}, *error) {
	t.Helper()
	cmd := exec.Command("sh", "-c", script)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("ready\n"))
	if _, err := out.Read(buf); err != nil || string(buf) != "ready\n" {
		t.Fatalf("child said %q, %v", buf, err)
	}
	done := make(chan struct{})
	var got error
	Supervise(cmd, done, func(err error) { got = err })
	t.Cleanup(func() { cmd.Process.Kill(); <-done })
	return cmd, done, &got
}

func TestStopGraceful(t *testing.T) {
	cmd, done, got := supervisedReady(t, trapsTerm)
	if err := Stop(context.Background(), cmd.Process, done, 10*time.Second, nil); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	// Stop returns after done: the child's own exit status is known.
	if *got != nil || cmd.ProcessState == nil || !cmd.ProcessState.Exited() || cmd.ProcessState.ExitCode() != 0 {
		t.Errorf("child ended with %v (%v), want its own clean exit on SIGTERM", cmd.ProcessState, *got)
	}
}

func TestStopKillsAfterGrace(t *testing.T) {
	cmd, done, _ := supervisedReady(t, ignoresTerm)
	var asked time.Duration
	ask := func(grace time.Duration) { asked = grace }
	if err := Stop(context.Background(), cmd.Process, done, 50*time.Millisecond, ask); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if asked != 50*time.Millisecond {
		t.Errorf("ask got grace %v, want 50ms", asked)
	}
	if ws := cmd.ProcessState.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("child ended with %v, want SIGKILL", cmd.ProcessState)
	}
}

func TestStopCancelledSkipsGrace(t *testing.T) {
	cmd, done, _ := supervisedReady(t, trapsTerm)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	asked := false
	if err := Stop(ctx, cmd.Process, done, time.Hour, func(time.Duration) { asked = true }); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if asked {
		t.Errorf("a cancelled stop asked the child to exit")
	}
	if ws := cmd.ProcessState.Sys().(syscall.WaitStatus); !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Errorf("child ended with %v, want SIGKILL", cmd.ProcessState)
	}
}

func TestStopGone(t *testing.T) {
	cmd, done, _ := supervised(t, "exit 0")
	waitDone(t, done)
	if err := Stop(context.Background(), cmd.Process, done, time.Second, func(time.Duration) {
		t.Errorf("asked a gone child to exit")
	}); err != nil {
		t.Errorf("Stop of a gone child: %v", err)
	}
}
