package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/protocol"
)

// agentAsPID1 is the "agent-pid1" role: the agent as PID 1 of a fresh pid
// and mount namespace (with its own /proc), serving the harness on fd 3,
// protected from the OOM killer the way a driver may protect it.
func agentAsPID1() int {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "agent-pid1: not PID 1")
		return 2
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		fmt.Fprintln(os.Stderr, "agent-pid1: making / private:", err)
		return 2
	}
	if err := unix.Mount("proc", "/proc", "proc", 0, ""); err != nil {
		fmt.Fprintln(os.Stderr, "agent-pid1: mounting /proc:", err)
		return 2
	}
	// Lowering needs CAP_SYS_RESOURCE, which some hosts withhold; the test
	// then checks less (see TestAgentAsPID1).
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-500"), 0); err != nil {
		fmt.Fprintln(os.Stderr, "agent-pid1: cannot protect the agent:", err)
	}
	f := os.NewFile(3, "harness")
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		fmt.Fprintln(os.Stderr, "agent-pid1:", err)
		return 2
	}
	if err := Run(context.Background(), conn, Options{RuntimeAPIAddr: "127.0.0.1:0"}); err != nil {
		fmt.Fprintln(os.Stderr, "agent-pid1: Run:", err)
		return 1
	}
	return 0
}

// startPID1Agent runs the test binary as the agent, PID 1 of new pid and
// mount namespaces, and returns the harness's end of its stream.
func startPID1Agent(t *testing.T) (*testAgent, *exec.Cmd) {
	t.Helper()
	harnessEnd, agentEnd := socketpair(t)
	f, err := agentEnd.(*net.UnixConn).File()
	agentEnd.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	exe, _ := os.Executable()
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envRole+"=agent-pid1")
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = testWriter{t}, testWriter{t}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWPID | syscall.CLONE_NEWNS,
		Pdeathsig:  syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot create pid and mount namespaces: %v", err)
	}
	t.Cleanup(func() {
		harnessEnd.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	ta := &testAgent{t: t, raw: harnessEnd, conn: protocol.NewConn(harnessEnd), done: make(chan error, 1), cancel: func() {}}
	return ta, cmd
}

// awaitProcs invokes "procs" until the sandbox holds exactly want
// processes and no zombie, and fails the test if it never does.
func awaitProcs(t *testing.T, ta *testAgent, want int) {
	t.Helper()
	var got map[string]int
	for end := time.Now().Add(failsafe); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		r := ta.invoke(action{Do: "procs"})
		mustSucceed(t, r)
		got = decodeJSON[map[string]int](t, r.payload)
		if got["total"] == want && got["Z"] == 0 {
			return
		}
	}
	t.Fatalf("sandbox processes = %v, want %d and no zombie", got, want)
}

func TestAgentAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for pid and mount namespaces")
	}
	t.Parallel()
	ta, cmd := startPID1Agent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}

	// The runtime is the OOM killer's first choice, not protected like
	// the agent.
	r := ta.invoke(action{Do: "limits"})
	mustSucceed(t, r)
	l := decodeJSON[map[string]int64](t, r.payload)
	if l["oom"] != runtimeOOMScoreAdj || l["agentOom"] >= runtimeOOMScoreAdj || l["nofileMax"] != 1024 || l["pid"] == 1 {
		t.Errorf("runtime limits under PID 1: %v, want oom %d above the agent's", l, runtimeOOMScoreAdj)
	}
	if r.MaxMemoryMB < 2 {
		t.Errorf("MaxMemoryMB = %d; VmHWM not read under PID 1", r.MaxMemoryMB)
	}

	// Orphans are reaped: only the agent and the runtime remain.
	mustSucceed(t, ta.invoke(action{Do: "orphan"}))
	awaitProcs(t, ta, 2)

	// A crash: the reaper hands the runtime its own exit status, and the
	// reset kills a process that left the runtime's session.
	mustSucceed(t, ta.invoke(action{Do: "spawn"}))
	r = ta.invoke(action{Do: "exit"})
	if ei := decodeJSON[protocol.ErrorInfo](t, r.payload); r.ErrorType != "Runtime.ExitError" ||
		ei.ErrorMessage != "RequestId: "+r.RequestID+" Error: Runtime exited with error: exit status 3" {
		t.Fatalf("crash under PID 1: %+v %s", r.Result, r.payload)
	}
	awaitProcs(t, ta, 2)

	// A timeout kills every process in the sandbox.
	mustSucceed(t, ta.invoke(action{Do: "spawn"}))
	id := ta.nextID()
	ta.sendInvoke(id, action{Do: "sleep"}, 500*time.Millisecond)
	if r := ta.readResult(); r.ErrorType != "Sandbox.Timedout" || !r.Reset {
		t.Fatalf("timeout under PID 1: %+v", r.Result)
	}
	awaitProcs(t, ta, 2)

	ta.send(protocol.TypeShutdown, protocol.Shutdown{})
	if f := ta.read(); f.Type != protocol.TypeShutdownDone {
		t.Fatalf("got %s, want ShutdownDone", f.Type)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("agent as PID 1 exited with %v", err)
	}
}
