package hostproc

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/cpuset"
)

// Forker starts every child of a driver from one OS thread that lives as
// long as the driver. A child's Pdeathsig (e.g. SIGKILL when the harness
// dies) fires when the *thread* that forked it exits, not the process, and
// the Go runtime does end threads: one whose goroutine exits while locked
// to it. Forking from an arbitrary goroutine would let an unrelated
// runtime.LockOSThread user elsewhere in the harness kill the children.
//
// Start is safe for concurrent use; starts are serialized on the thread.
// Close ends the Forker once no Start can be running or follow: the
// driver calls it after its last child is gone.
type Forker struct {
	reqs chan forkReq
}

type forkReq struct {
	cmd *exec.Cmd
	Placement
	err chan error
}

// Placement is where a child starts: what it inherits from the forking
// thread at clone, before it runs any code.
type Placement struct {
	// CPUs is its CPU affinity (nil: the process's).
	CPUs []int
	// Nice is its CPU priority (see StartNice).
	Nice int
	// NetNS, if > 0, is a descriptor of the network namespace it starts
	// in (the thread joins it for the clone and goes back).
	NetNS int
}

// NewForker starts the Forker's thread.
func NewForker() *Forker {
	f := &Forker{reqs: make(chan forkReq)}
	go f.loop()
	return f
}

func (f *Forker) loop() {
	runtime.LockOSThread()
	for r := range f.reqs {
		// The child inherits the thread's narrowed mask and its nice
		// value at clone.
		r.err <- cpuset.OnThread(r.CPUs, func() error {
			return withNice(r.Nice, func() error { return withNetNS(r.NetNS, r.cmd.Start) })
		})
	}
	// Every child is gone (see Close): hand the thread back to the
	// runtime instead of ending it.
	runtime.UnlockOSThread()
}

// Start runs cmd.Start on the Forker's thread and returns its error.
func (f *Forker) Start(cmd *exec.Cmd) error {
	return f.StartOn(cmd, nil)
}

// StartOn is Start with the child's CPU affinity set to cpus (nil: the
// Forker's own, i.e. the process's). The child inherits the mask from the
// forking thread at clone, before it runs any code, so all of its threads
// and children have it; setting it from outside afterwards would race with
// the threads the child's runtime starts.
func (f *Forker) StartOn(cmd *exec.Cmd, cpus []int) error {
	return f.StartPlaced(cmd, Placement{CPUs: cpus})
}

// StartPlaced is Start with the child placed as p says.
func (f *Forker) StartPlaced(cmd *exec.Cmd, p Placement) error {
	if p.Nice != 0 && !canRenice() {
		p.Nice = 0
	}
	ch := make(chan error, 1)
	f.reqs <- forkReq{cmd: cmd, Placement: p, err: ch}
	return <-ch
}

// StartNice is Start with the child (and all its threads) at CPU priority
// nice (the forking thread's is set for the clone and set back after),
// for work that should take only CPU time nothing else wants: a spare VM
// booting in the background. Renice raises it later. It needs
// CAP_SYS_NICE (root), since the thread's priority must be restored;
// without it the child runs at normal priority.
func (f *Forker) StartNice(cmd *exec.Cmd, nice int) error {
	return f.StartPlaced(cmd, Placement{Nice: nice})
}

// Close ends the Forker; Start must not be called afterwards. Calling
// Close twice panics, like closing a channel twice.
func (f *Forker) Close() { close(f.reqs) }

// canRenice reports whether this process may lower nice values again
// (CAP_SYS_NICE; root has it).
func canRenice() bool { return os.Geteuid() == 0 }

// withNice runs fn with the calling (locked) thread's nice value set to
// nice, then restores it; nice 0 runs fn as is. If the old value cannot
// be restored, the thread would start every later child niced: that
// error wins.
func withNice(nice int, fn func() error) error {
	if nice == 0 {
		return fn()
	}
	tid := unix.Gettid()
	// getpriority's raw return is 20-nice (see getpriority(2)).
	old, err := unix.Getpriority(unix.PRIO_PROCESS, tid)
	if err != nil {
		return fmt.Errorf("reading the fork thread's priority: %w", err)
	}
	if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil {
		return fmt.Errorf("lowering the fork thread's priority: %w", err)
	}
	ferr := fn()
	if err := unix.Setpriority(unix.PRIO_PROCESS, tid, 20-old); err != nil {
		panic(fmt.Sprintf("hostproc: restoring the fork thread's priority: %v", err))
	}
	return ferr
}

// withNetNS runs fn with the calling (locked) thread in the network
// namespace ns (a descriptor; <= 0: as is), then puts it back. A thread
// that could not go back would start every later child there: that
// panics, as withNice does. Threads the runtime starts meanwhile come
// from its template thread (the caller is locked), not from this one.
func withNetNS(ns int, fn func() error) error {
	if ns <= 0 {
		return fn()
	}
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening the fork thread's network namespace: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("entering the child's network namespace: %w", err)
	}
	ferr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		panic(fmt.Sprintf("hostproc: returning the fork thread to its network namespace: %v", err))
	}
	return ferr
}

// Renice sets the nice value of every thread of process pid (a thread
// created meanwhile inherits its creator's, old or new).
func Renice(pid, nice int) error {
	tasks, err := os.ReadDir(filepath.Join("/proc", strconv.Itoa(pid), "task"))
	if err != nil {
		return fmt.Errorf("renicing %d: %w", pid, err)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && err != unix.ESRCH {
			return fmt.Errorf("renicing %d's thread %d: %w", pid, tid, err)
		}
	}
	return nil
}
