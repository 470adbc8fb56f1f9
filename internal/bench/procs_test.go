package bench

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestChildStopKillsItsGroup(t *testing.T) {
	dir := t.TempDir()
	// The shell ignores SIGTERM and leaves a grandchild behind, like RIE's
	// function process: stop must kill both.
	pidFile := filepath.Join(dir, "grandchild")
	c, err := startChild("sh", []string{"/bin/sh", "-c", "trap '' TERM; sleep 300 & echo $! > " + pidFile + "; wait"},
		os.Environ(), dir, filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	var gc int
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(pidFile)
		if err == nil && strings.TrimSpace(string(b)) != "" {
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				gc = v
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("grandchild never started")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !c.alive() {
		t.Fatal("child not alive")
	}
	err = c.stop(200 * time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "did not stop") {
		t.Errorf("stop of a child ignoring SIGTERM = %v, want a 'did not stop' error", err)
	}
	if c.alive() {
		t.Error("child alive after stop")
	}
	deadline = time.Now().Add(5 * time.Second)
	for syscall.Kill(gc, 0) == nil {
		// A zombie until its (now dead) parent's reaper collects it: check
		// the state instead of existence.
		if b, err := os.ReadFile("/proc/" + itoa(gc) + "/stat"); err == nil {
			if p, err := parseStat(b); err == nil && p.PPID != 0 && strings.Contains(string(b), ") Z") {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("grandchild %d still alive after stop", gc)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Idempotent.
	if err := c.stop(time.Second); err != nil {
		t.Errorf("second stop = %v", err)
	}
}

func TestWaitListeningOnADeadChild(t *testing.T) {
	dir := t.TempDir()
	c, err := startChild("false", []string{"/bin/sh", "-c", "echo going away; exit 3"}, os.Environ(), dir, filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.stop(0)
	addr, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	err = waitListening(context.Background(), c, addr, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "exited before listening") || !strings.Contains(err.Error(), "going away") {
		t.Errorf("waitListening = %v, want an exit error with the log's last line", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c2, err := startChild("sleep", []string{"/bin/sh", "-c", "sleep 300"}, os.Environ(), dir, filepath.Join(dir, "log2"))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.stop(0)
	if err := waitListening(ctx, c2, addr, 30*time.Second); !errors.Is(err, context.Canceled) {
		t.Errorf("waitListening with a cancelled context = %v", err)
	}
}

func TestEnvironWithout(t *testing.T) {
	t.Setenv("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:1")
	t.Setenv("BENCH_KEEP", "yes")
	env := strings.Join(environWithout("AWS_LAMBDA_RUNTIME_API"), "\n")
	if strings.Contains(env, "AWS_LAMBDA_RUNTIME_API=") || !strings.Contains(env, "BENCH_KEEP=yes") {
		t.Errorf("environWithout kept the wrong variables")
	}
}

func TestFindModuleDir(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "go.mod"), "module github.com/invokex/invokex\n\ngo 1.26\n")
	sub := filepath.Join(dir, "internal", "bench")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if got, err := FindModuleDir(sub); err != nil || got != dir {
		t.Errorf("FindModuleDir = %q, %v; want %q", got, err, dir)
	}
	other := t.TempDir()
	write(t, filepath.Join(other, "go.mod"), "module example.com/other\n")
	if _, err := FindModuleDir(other); err == nil {
		t.Error("FindModuleDir accepted another module")
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
