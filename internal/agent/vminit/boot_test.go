package vminit_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/agent/vminit"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// bootWait bounds each step of the boot test so a wedged guest fails the
// test instead of hanging it; it asserts nothing about speed.
const bootWait = 2 * time.Minute

// kernelForTest returns the guest kernel, building it only when
// INVOKEX_BUILD_KERNEL=1 (minutes); otherwise the test skips when it is
// not cached.
func kernelForTest(t *testing.T) string {
	t.Helper()
	cache := guest.DefaultCacheDir()
	if p, ok := guest.KernelPath(cache); ok {
		return p
	}
	if os.Getenv("INVOKEX_BUILD_KERNEL") != "1" {
		t.Skipf("no guest kernel in %s (build it with scripts/build-kernel.sh, or set INVOKEX_BUILD_KERNEL=1 or INVOKEX_KERNEL)", cache)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	p, err := guest.EnsureKernel(ctx, cache, nil)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// buildInit builds the static stand-in for invokex as /sbin/init.
func buildInit(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "init")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building init: %v\n%s", err, out)
	}
	return bin
}

// TestBootProvided boots a microVM with the provided runtime's root, the
// probe function as code and a scratch disk, then drives INIT and an
// invocation through the agent over virtio-serial.
func TestBootProvided(t *testing.T) {
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	vmlinux := kernelForTest(t)
	ctx := context.Background()
	cache := t.TempDir()
	rt := &runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided, Bootstrap: []string{"/var/task/bootstrap"}}
	root, err := guest.RootImage(ctx, cache, rt, buildInit(t))
	if err != nil {
		t.Fatal(err)
	}
	code, err := guest.CodeImage(ctx, cache, drivertest.BuildProbe(t), "", "probe")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	scratch := filepath.Join(dir, "scratch.ext4")
	if err := guest.ScratchImage(ctx, scratch, 64); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	console := filepath.Join(dir, "console.log")
	extra := append([]string{"invokex.hostname=boot-test"}, strings.Fields(os.Getenv("INVOKEX_TEST_CMDLINE"))...)
	args := QEMUArgs(vmlinux, root, code, scratch, sock, console, extra...)

	start := time.Now()
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() || os.Getenv("INVOKEX_TEST_CONSOLE") == "1" {
			b, _ := os.ReadFile(console)
			t.Logf("guest console:\n%s", b)
		}
	})

	conn := dialAgent(t, sock, exited)
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(bootWait))
	br := bufio.NewReader(conn)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("waiting for the handshake: %v", err)
	}
	if line != vminit.Ready {
		t.Fatalf("handshake %q, want %q", line, vminit.Ready)
	}
	t.Logf("agent ready %v after QEMU started", time.Since(start).Round(time.Millisecond))

	pc := protocol.NewConn(bufferedConn{br, conn})
	initMsg := protocol.Init{
		FunctionName: "probe", FunctionVersion: "$LATEST", MemoryMB: 128, TimeoutSec: 30,
		Command: []string{"/var/task/bootstrap"},
		Env: []string{
			"_HANDLER=bootstrap", "AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001", "LAMBDA_TASK_ROOT=/var/task",
			"AWS_LAMBDA_FUNCTION_NAME=probe", "AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
			"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128", "PATH=/usr/local/bin:/usr/bin/:/bin", "TZ=:UTC",
		},
		Dir: "/var/task", UID: 993, GID: 993, InitTimeoutMs: 60000,
	}
	if err := pc.WriteFrame(protocol.TypeInit, initMsg); err != nil {
		t.Fatal(err)
	}
	f := readType(t, pc, protocol.TypeInitDone)
	var done protocol.InitDone
	if err := f.Decode(&done); err != nil {
		t.Fatal(err)
	}
	if done.Error != nil {
		t.Fatalf("INIT failed: %+v: %s", *done.Error, f.Body)
	}

	event := `{"action":"echo","marker":"hello-from-the-host"}`
	inv := protocol.Invoke{RequestID: "req-1", DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
	if err := pc.WriteFrame(protocol.TypeInvoke, inv, []byte(event)); err != nil {
		t.Fatal(err)
	}
	f = readType(t, pc, protocol.TypeResult)
	var res protocol.Result
	if err := f.Decode(&res); err != nil {
		t.Fatal(err)
	}
	payload, log := res.Split(f.Body)
	if res.FunctionError != "" {
		t.Fatalf("invocation failed: %s: %s\nlog: %s", res.FunctionError, payload, log)
	}
	var answer struct {
		Event map[string]any `json:"event"`
		Facts struct {
			PID      int      `json:"pid"`
			UID      int      `json:"uid"`
			Hostname string   `json:"hostname"`
			Task     []string `json:"task"`
		} `json:"facts"`
	}
	if err := json.Unmarshal(payload, &answer); err != nil {
		t.Fatalf("decoding %s: %v", payload, err)
	}
	if answer.Event["marker"] != "hello-from-the-host" {
		t.Errorf("echoed event %v, want the marker back; payload %s", answer.Event, payload)
	}
	if answer.Facts.UID != 993 {
		t.Errorf("runtime uid %d, want 993", answer.Facts.UID)
	}
	if answer.Facts.Hostname != "boot-test" {
		t.Errorf("hostname %q, want boot-test", answer.Facts.Hostname)
	}
	if !contains(answer.Facts.Task, "bootstrap") {
		t.Errorf("/var/task holds %v, want the bootstrap", answer.Facts.Task)
	}

	// Writes to /tmp land on the scratch disk and stop at its size.
	fill := invoke(t, pc, "req-2", `{"action":"fill-tmp","mb":200,"name":"big"}`)
	if !strings.Contains(strings.ToLower(string(fill)), "no space left") {
		t.Errorf("filling a 64 MiB /tmp with 200 MiB: %s, want ENOSPC", fill)
	}

	if err := pc.WriteFrame(protocol.TypeShutdown, protocol.Shutdown{}); err != nil {
		t.Fatal(err)
	}
	readType(t, pc, protocol.TypeShutdownDone)
	select {
	case err := <-exited:
		exited <- err // for the cleanup
		if err != nil {
			t.Errorf("QEMU exited with %v after the agent's shutdown, want 0", err)
		}
	case <-time.After(bootWait):
		t.Fatal("the VM did not end after the agent's shutdown")
	}
}

// invoke sends one event and returns the answer's payload.
func invoke(t *testing.T, pc *protocol.Conn, id, event string) []byte {
	t.Helper()
	inv := protocol.Invoke{RequestID: id, DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
	if err := pc.WriteFrame(protocol.TypeInvoke, inv, []byte(event)); err != nil {
		t.Fatal(err)
	}
	f := readType(t, pc, protocol.TypeResult)
	var res protocol.Result
	if err := f.Decode(&res); err != nil {
		t.Fatal(err)
	}
	payload, _ := res.Split(f.Body)
	return payload
}

func readType(t *testing.T, pc *protocol.Conn, want protocol.Type) *protocol.Frame {
	t.Helper()
	f, err := pc.ReadFrame()
	if err != nil {
		t.Fatalf("waiting for %s: %v", want, err)
	}
	if f.Type != want {
		t.Fatalf("got %s %s, want %s", f.Type, f.Header, want)
	}
	return f
}

// dialAgent connects to QEMU's chardev socket once QEMU has created it.
func dialAgent(t *testing.T, sock string, exited chan error) net.Conn {
	t.Helper()
	deadline := time.Now().Add(bootWait)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			return c
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("QEMU exited before its socket was up: %v", err)
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("connecting to %s: %v", sock, err)
		}
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// bufferedConn reads through the reader that consumed the handshake.
type bufferedConn struct {
	r *bufio.Reader
	net.Conn
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
