package hostproc

import (
	"os/exec"
	"runtime"

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
	cmd  *exec.Cmd
	cpus []int
	err  chan error
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
		// The child inherits the thread's narrowed mask at clone.
		r.err <- cpuset.OnThread(r.cpus, r.cmd.Start)
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
	ch := make(chan error, 1)
	f.reqs <- forkReq{cmd: cmd, cpus: cpus, err: ch}
	return <-ch
}

// Close ends the Forker; Start must not be called afterwards. Calling
// Close twice panics, like closing a channel twice.
func (f *Forker) Close() { close(f.reqs) }
