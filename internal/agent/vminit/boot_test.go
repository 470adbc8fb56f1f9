package vminit_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/agent/vminit"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// bootWait bounds each step of the boot tests so a wedged guest fails the
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

func requireQEMU(t *testing.T) string {
	t.Helper()
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("qemu-system-x86_64 is not installed")
	}
	return qemu
}

// buildInit builds the static stand-in for invokex as /sbin/init, or
// returns $INVOKEX_TEST_INIT (e.g. a CGO_ENABLED=0 build of invokex).
func buildInit(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("INVOKEX_TEST_INIT"); p != "" {
		return p
	}
	bin := filepath.Join(t.TempDir(), "init")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/init")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building init: %v\n%s", err, out)
	}
	return bin
}

// vm is one booted guest with its agent connected.
type vm struct {
	start   time.Time // QEMU started
	pc      *protocol.Conn
	exited  chan error
	console string
}

// bootVM boots QEMU microvm with the three disks and returns once the
// agent's handshake has arrived.
func bootVM(t *testing.T, root, code string) *vm {
	t.Helper()
	qemu := requireQEMU(t)
	vmlinux := kernelForTest(t)
	dir := t.TempDir()
	scratch := filepath.Join(dir, "scratch.ext4")
	if err := guest.ScratchImage(context.Background(), scratch, 64); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "agent.sock")
	v := &vm{exited: make(chan error, 1), console: filepath.Join(dir, "console.log")}
	extra := append([]string{"invokex.hostname=boot-test"}, strings.Fields(os.Getenv("INVOKEX_TEST_CMDLINE"))...)
	args := QEMUArgs(vmlinux, root, code, scratch, sock, v.console, extra...)

	start := time.Now()
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { v.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-v.exited
		if t.Failed() || os.Getenv("INVOKEX_TEST_CONSOLE") == "1" {
			b, _ := os.ReadFile(v.console)
			t.Logf("guest console:\n%s", b)
		}
	})

	conn := dialAgent(t, sock, v.exited)
	t.Cleanup(func() { conn.Close() })
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
	v.pc = protocol.NewConn(bufferedConn{br, conn})
	v.start = start
	return v
}

// initRuntime sends Init and fails the test on an INIT error.
func (v *vm) initRuntime(t *testing.T, command []string, handler string) {
	t.Helper()
	msg := protocol.Init{
		FunctionName: "boot", FunctionVersion: "$LATEST", MemoryMB: 128, TimeoutSec: 60,
		Command: command,
		Env: []string{
			"_HANDLER=" + handler, "AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001", "LAMBDA_TASK_ROOT=/var/task",
			"LAMBDA_RUNTIME_DIR=/var/runtime", "AWS_LAMBDA_FUNCTION_NAME=boot", "AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
			"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128", "PATH=/usr/local/bin:/usr/bin/:/bin", "TZ=:UTC", "LANG=en_US.UTF-8",
		},
		Dir: "/var/task", UID: 993, GID: 993, InitTimeoutMs: 60000,
	}
	if err := v.pc.WriteFrame(protocol.TypeInit, msg); err != nil {
		t.Fatal(err)
	}
	f := readType(t, v.pc, protocol.TypeInitDone)
	var done protocol.InitDone
	if err := f.Decode(&done); err != nil {
		t.Fatal(err)
	}
	if done.Error != nil {
		t.Fatalf("INIT failed: %+v: %s", *done.Error, f.Body)
	}
}

// invoke sends one event and returns the Result, its payload and its log.
func (v *vm) invoke(t *testing.T, id, event string) (protocol.Result, []byte, []byte) {
	t.Helper()
	inv := protocol.Invoke{RequestID: id, DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
	if err := v.pc.WriteFrame(protocol.TypeInvoke, inv, []byte(event)); err != nil {
		t.Fatal(err)
	}
	f := readType(t, v.pc, protocol.TypeResult)
	var res protocol.Result
	if err := f.Decode(&res); err != nil {
		t.Fatal(err)
	}
	payload, log := res.Split(f.Body)
	return res, payload, log
}

// readFile returns a file's content as the function reads it in the guest.
func (v *vm) readFile(t *testing.T, path string) string {
	t.Helper()
	ev, _ := json.Marshal(map[string]string{"action": "read-file", "path": path})
	res, payload, log := v.invoke(t, "req-read", string(ev))
	var o struct{ Data, Error string }
	if err := json.Unmarshal(payload, &o); err != nil || res.FunctionError != "" || o.Error != "" {
		t.Fatalf("reading %s in the guest: %s %s %v\nlog: %s", path, res.FunctionError, payload, err, log)
	}
	return o.Data
}

// shutdown asks the agent to stop and waits for the VM to end by itself.
func (v *vm) shutdown(t *testing.T) {
	t.Helper()
	if err := v.pc.WriteFrame(protocol.TypeShutdown, protocol.Shutdown{}); err != nil {
		t.Fatal(err)
	}
	readType(t, v.pc, protocol.TypeShutdownDone)
	select {
	case err := <-v.exited:
		v.exited <- err // for the cleanup
		if err != nil {
			t.Errorf("QEMU exited with %v after the agent's shutdown, want 0", err)
		}
	case <-time.After(bootWait):
		t.Fatal("the VM did not end after the agent's shutdown")
	}
}

// TestBootProvided boots a microVM with the provided runtime's root, the
// probe function as code and a scratch disk, then drives INIT and
// invocations through the agent over virtio-serial.
func TestBootProvided(t *testing.T) {
	requireQEMU(t)
	kernelForTest(t)
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
	v := bootVM(t, root, code)
	v.initRuntime(t, rt.Bootstrap, "bootstrap")

	res, payload, log := v.invoke(t, "req-1", `{"action":"echo","marker":"hello-from-the-host"}`)
	t.Logf("first response %v after QEMU started", time.Since(v.start).Round(time.Millisecond))
	if res.FunctionError != "" {
		t.Fatalf("invocation failed: %s: %s\nlog: %s", res.FunctionError, payload, log)
	}
	var answer struct {
		Event map[string]any `json:"event"`
		Facts struct {
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

	// The runtime is held to Lambda's 1,024 processes and threads, a limit
	// it cannot raise, and the system-wide task limit is above it.
	limits := v.readFile(t, "/proc/self/limits")
	if !regexp.MustCompile(`(?m)^Max processes\s+1024\s+1024\s`).MatchString(limits) {
		t.Errorf("the runtime's limits:\n%s\nwant Max processes 1024 1024", limits)
	}
	threadsMax := v.readFile(t, "/proc/sys/kernel/threads-max")
	if n, err := strconv.Atoi(strings.TrimSpace(threadsMax)); err != nil || n <= 1024 {
		t.Errorf("threads-max %q, want more than the runtime's 1024", threadsMax)
	}

	// A fork bomb in this smallest (128 MB) guest is stopped by that limit,
	// not by the guest's memory or its system-wide task limit, and the
	// agent lives on to answer.
	_, bomb, _ := v.invoke(t, "req-bomb", `{"action":"forkbomb","max":4096}`)
	var o struct {
		Count int
		Error string
	}
	if err := json.Unmarshal(bomb, &o); err != nil {
		t.Fatalf("decoding %s: %v", bomb, err)
	}
	t.Logf("fork bomb: %d children, then %q", o.Count, o.Error)
	if o.Count == 0 || o.Count > 1024 || !strings.Contains(o.Error, "resource temporarily unavailable") {
		t.Errorf("fork bomb: %s, want up to 1024 children stopped by EAGAIN", bomb)
	}
	if b, _ := os.ReadFile(v.console); strings.Contains(string(b), "Out of memory") {
		t.Errorf("the fork bomb ran the guest out of memory:\n%s", b)
	}

	// Writes to /tmp land on the scratch disk and stop at its size.
	_, fill, _ := v.invoke(t, "req-2", `{"action":"fill-tmp","mb":200,"name":"big"}`)
	if !strings.Contains(strings.ToLower(string(fill)), "no space left") {
		t.Errorf("filling a 64 MiB /tmp with 200 MiB: %s, want ENOSPC", fill)
	}
	// The code is read-only.
	_, wr, _ := v.invoke(t, "req-3", `{"action":"write-file","path":"/var/task/x","data":"y"}`)
	if !strings.Contains(strings.ToLower(string(wr)), "read-only") {
		t.Errorf("writing /var/task: %s, want a read-only file system", wr)
	}
	v.shutdown(t)
}

// TestBootInterpreted boots the Debian roots of python3.11/3.13 and
// nodejs18.x/20.x when they are in the shared cache (built by `invokex guest runtime
// build`, or INVOKEX_BUILD_ROOTS=1 in package guest's tests) and runs a
// handler through InvokeX's runtime interface client.
func TestBootInterpreted(t *testing.T) {
	const (
		pySrc   = "import os, sys\ndef lambda_handler(event, context):\n    return {'event': event, 'version': sys.version, 'uid': os.getuid()}\n"
		nodeSrc = "exports.handler = async (event) => ({event, version: process.version, uid: process.getuid()});\n"
	)
	type bootCase struct {
		id, handler, file, src string
		family                 runtimes.Family
	}
	var cases []bootCase
	for _, id := range []string{"python3.11", "python3.13"} {
		cases = append(cases, bootCase{id, "lambda_function.lambda_handler", "lambda_function.py", pySrc, runtimes.FamilyPython})
	}
	for _, id := range []string{"nodejs18.x", "nodejs20.x"} {
		cases = append(cases, bootCase{id, "index.handler", "index.js", nodeSrc, runtimes.FamilyNode})
	}
	for _, c := range cases {
		t.Run(c.id, func(t *testing.T) {
			requireQEMU(t)
			kernelForTest(t)
			cache := guest.DefaultCacheDir()
			if _, ok := guest.CurrentRoot(cache, c.id); !ok {
				t.Skipf("no %s root in %s (invokex guest runtime build %s)", c.id, cache, c.id)
			}
			rec, _ := guest.DebianRecipe(c.id)
			bootstrap := map[runtimes.Family]string{runtimes.FamilyPython: "/var/runtime/python/bootstrap.py", runtimes.FamilyNode: "/var/runtime/nodejs/bootstrap.mjs"}[c.family]
			rt := &runtimes.Runtime{ID: c.id, Family: c.family, Interpreter: rec.Interpreter, Bootstrap: []string{rec.Interpreter, bootstrap}}
			ctx := context.Background()
			root, err := guest.RootImage(ctx, cache, rt, buildInit(t))
			if err != nil {
				t.Fatal(err)
			}
			codeDir, rtDir := t.TempDir(), t.TempDir()
			if err := os.WriteFile(filepath.Join(codeDir, c.file), []byte(c.src), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.CopyFS(rtDir, runtimes.SupportFiles(c.family)); err != nil {
				t.Fatal(err)
			}
			code, err := guest.CodeImage(ctx, t.TempDir(), codeDir, rtDir, "code")
			if err != nil {
				t.Fatal(err)
			}
			v := bootVM(t, root, code)
			v.initRuntime(t, rt.Bootstrap, c.handler)
			res, payload, log := v.invoke(t, "req-1", `{"marker":"hi"}`)
			t.Logf("first response %v after QEMU started", time.Since(v.start).Round(time.Millisecond))
			if res.FunctionError != "" {
				t.Fatalf("invocation failed: %s: %s\nlog: %s", res.FunctionError, payload, log)
			}
			var answer struct {
				Event   map[string]any `json:"event"`
				Version string         `json:"version"`
				UID     int            `json:"uid"`
			}
			if err := json.Unmarshal(payload, &answer); err != nil {
				t.Fatalf("decoding %s: %v", payload, err)
			}
			if answer.Event["marker"] != "hi" || answer.UID != 993 {
				t.Errorf("answer %s, want the event back from uid 993", payload)
			}
			want := strings.TrimSuffix(rec.Version, ".")
			if c.family == runtimes.FamilyNode {
				want = "v" + want
			}
			if !strings.HasPrefix(answer.Version, want) {
				t.Errorf("interpreter version %q, want %s", answer.Version, want)
			}
			t.Logf("%s answered from %s", c.id, answer.Version)
			v.shutdown(t)
		})
	}
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

// bufferedConn reads through the reader that consumed the handshake.
type bufferedConn struct {
	r *bufio.Reader
	net.Conn
}

func (c bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
