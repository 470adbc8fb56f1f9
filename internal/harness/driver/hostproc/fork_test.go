package hostproc

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startOnDyingThread starts cmd (with Pdeathsig SIGKILL) through start,
// called on a goroutine locked to its thread that then exits, which ends
// the thread; it returns once the thread is gone.
func startOnDyingThread(t *testing.T, start func(*exec.Cmd) error) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	type result struct {
		tid int
		err error
	}
	res := make(chan result)
	var r result
	for r.tid == 0 {
		go func() {
			runtime.LockOSThread()
			if unix.Gettid() == os.Getpid() {
				// The main thread never ends (the runtime parks it
				// instead). Hold it until the test ends, so that the
				// next try runs on another thread.
				release := make(chan struct{})
				t.Cleanup(func() { close(release) })
				res <- result{}
				<-release
				runtime.UnlockOSThread()
				return
			}
			res <- result{unix.Gettid(), start(cmd)}
			// Returning while locked makes the runtime end the thread.
		}()
		r = <-res
	}
	if r.err != nil {
		t.Fatalf("starting %v: %v", cmd.Args, r.err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	task := "/proc/self/task/" + strconv.Itoa(r.tid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(task); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("thread %d did not end", r.tid)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return cmd
}

// signalledBy sends SIGTERM to cmd and returns the signal it died of: a
// Pdeathsig already sent (when its forking thread ended) wins over it.
func signalledBy(t *testing.T, cmd *exec.Cmd) syscall.Signal {
	t.Helper()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("wait: %v", err)
	}
	ws := ee.Sys().(syscall.WaitStatus)
	if !ws.Signaled() {
		t.Fatalf("child exited with %v, not by a signal", ws)
	}
	return ws.Signal()
}

// TestForkerOutlivesThreads: a child started by a Forker keeps running
// when the goroutine (and thread) that asked for it ends; one started
// directly from that thread is killed by its Pdeathsig, which is what
// the Forker is for.
func TestForkerOutlivesThreads(t *testing.T) {
	f := NewForker()
	defer f.Close()
	if sig := signalledBy(t, startOnDyingThread(t, f.Start)); sig != syscall.SIGTERM {
		t.Errorf("child started by the Forker died of %v, want our SIGTERM (its Pdeathsig fired)", sig)
	}
	direct := func(cmd *exec.Cmd) error { return cmd.Start() }
	if sig := signalledBy(t, startOnDyingThread(t, direct)); sig != syscall.SIGKILL {
		t.Errorf("control: child started directly died of %v, want the Pdeathsig SIGKILL", sig)
	}
}

func TestForkerStartError(t *testing.T) {
	f := NewForker()
	defer f.Close()
	cmd := exec.Command("/nonexistent/binary")
	if err := f.Start(cmd); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Start = %v, want not exist", err)
	}
	ok := exec.Command("true")
	if err := f.Start(ok); err != nil {
		t.Fatalf("Start after a failed start: %v", err)
	}
	if err := ok.Wait(); err != nil {
		t.Errorf("true: %v", err)
	}
}

// cpusAllowed runs a child through start and returns its Cpus_allowed_list.
func cpusAllowed(t *testing.T, start func(*exec.Cmd) error) string {
	t.Helper()
	cmd := exec.Command("grep", "Cpus_allowed_list", "/proc/self/status")
	var out strings.Builder
	cmd.Stdout = &out
	if err := start(cmd); err != nil {
		t.Fatalf("starting grep: %v", err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("grep: %v", err)
	}
	_, v, _ := strings.Cut(out.String(), ":")
	return strings.TrimSpace(v)
}

func TestForkerStartOn(t *testing.T) {
	var mine unix.CPUSet
	if err := unix.SchedGetaffinity(0, &mine); err != nil || mine.Count() < 2 {
		t.Skipf("skipping: needs a process allowed on 2 CPUs (have %d, err %v)", mine.Count(), err)
	}
	last := -1
	for c := 0; c < len(mine)*64; c++ {
		if mine.IsSet(c) {
			last = c
		}
	}
	f := NewForker()
	defer f.Close()
	want := strconv.Itoa(last)
	if got := cpusAllowed(t, func(c *exec.Cmd) error { return f.StartOn(c, []int{last}) }); got != want {
		t.Errorf("child started on CPU %d is allowed on %q, want %q", last, got, want)
	}
	// The Forker's thread got its own mask back: a plain Start is not narrowed.
	direct := cpusAllowed(t, func(c *exec.Cmd) error { return c.Start() })
	if got := cpusAllowed(t, f.Start); got != direct {
		t.Errorf("child started after StartOn is allowed on %q, want the process's %q", got, direct)
	}
}

// niceOf reads the nice value of pid's thread tid (/proc/.../stat field 19).
func niceOf(t *testing.T, pid, tid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	n, err := strconv.Atoi(f[16]) // field 19; f[0] is field 3
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestForkerStartNice(t *testing.T) {
	if !canRenice() {
		t.Skip("skipping: lowering a nice value again needs root")
	}
	f := NewForker()
	defer f.Close()
	start := func(nice int) *exec.Cmd {
		c := exec.Command("sleep", "30")
		var err error
		if nice != 0 {
			err = f.StartNice(c, nice)
		} else {
			err = f.Start(c)
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		return c
	}
	niced := start(15)
	pid := niced.Process.Pid
	if got := niceOf(t, pid, pid); got != 15 {
		t.Errorf("child started with nice 15 runs at %d", got)
	}
	// The Forker's thread got its priority back.
	plain := start(0)
	if got := niceOf(t, plain.Process.Pid, plain.Process.Pid); got != 0 {
		t.Errorf("child started after StartNice runs at nice %d, want 0", got)
	}
	if err := Renice(pid, 0); err != nil {
		t.Fatal(err)
	}
	if got := niceOf(t, pid, pid); got != 0 {
		t.Errorf("after Renice(0) the child runs at nice %d", got)
	}
}

// TestForkerStartInNetNS: a child placed in a network namespace starts
// there, and the Forker's next child in the process's own again.
func TestForkerStartInNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: entering a network namespace needs root")
	}
	holder := exec.Command("unshare", "--net", "sleep", "60")
	if err := holder.Start(); err != nil {
		t.Skipf("unshare: %v", err)
	}
	defer func() { holder.Process.Kill(); holder.Wait() }()
	self, _ := os.Readlink("/proc/self/ns/net")
	nsPath := fmt.Sprintf("/proc/%d/ns/net", holder.Process.Pid)
	var want string
	for range 200 {
		if want, _ = os.Readlink(nsPath); want != "" && want != self {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if want == self {
		t.Fatal("unshare never left the process's namespace")
	}
	ns, err := os.Open(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	f := NewForker()
	defer f.Close()
	start := func(p Placement) string {
		c := exec.Command("sleep", "30")
		if err := f.StartPlaced(c, p); err != nil {
			t.Fatal(err)
		}
		defer func() { c.Process.Kill(); c.Wait() }()
		got, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", c.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := start(Placement{NetNS: int(ns.Fd())}); got != want {
		t.Errorf("child placed in %s runs in %s", want, got)
	}
	if got := start(Placement{}); got != self {
		t.Errorf("the next child runs in %s, not the process's %s", got, self)
	}
}
