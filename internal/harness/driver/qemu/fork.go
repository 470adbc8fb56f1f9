package qemu

import (
	"os/exec"
	"runtime"
)

// forker starts every QEMU process from one OS thread that lives as long as
// the driver. Pdeathsig (SIGKILL to QEMU when the harness dies) fires when
// the *thread* that forked the child exits, not the process, and the Go
// runtime does end threads: one whose goroutine exits while locked to it.
// Forking from an arbitrary goroutine would let an unrelated
// runtime.LockOSThread user elsewhere in the harness kill VMs.
type forker struct {
	reqs chan forkReq
}

type forkReq struct {
	cmd *exec.Cmd
	err chan error
}

func newForker() *forker {
	f := &forker{reqs: make(chan forkReq)}
	go f.loop()
	return f
}

func (f *forker) loop() {
	runtime.LockOSThread()
	for r := range f.reqs {
		r.err <- r.cmd.Start()
	}
	// Every VM is gone (see close): hand the thread back to the runtime
	// instead of ending it.
	runtime.UnlockOSThread()
}

// start runs cmd.Start on the forker's thread.
func (f *forker) start(cmd *exec.Cmd) error {
	ch := make(chan error, 1)
	f.reqs <- forkReq{cmd: cmd, err: ch}
	return <-ch
}

// close ends the forker; start must not be called afterwards.
func (f *forker) close() { close(f.reqs) }
