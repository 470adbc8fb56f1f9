// Package agent runs inside every sandbox: it serves the Lambda Runtime API
// to the function's runtime and speaks package protocol to the harness.
//
// # Pieces
//
//   - agent.go: Run and the session, which reads the harness's frames and
//     drives INIT, invocations and shutdown.
//   - session.go: the INIT and invocation flows and the frames they answer.
//   - env.go: the execution environment (runtime, current invocation,
//     output sinks) and its atomic transitions.
//   - state.go: the state machine every transition goes through.
//   - runtimeapi.go: the Runtime API (net/http) the runtime calls.
//   - supervisor.go: starting, limiting, killing and reaping the runtime
//     (including PID 1 duties in a pid namespace).
//   - logs.go: the output pipe and the capped per-invocation log buffers.
//   - report.go: Lambda's log lines and error documents.
//
// # Guarantees
//
// The runtime's output never blocks it: one pipe is drained continuously
// into bounded buffers. Output written before the runtime posts a response
// is in that invocation's log. When Run returns, the runtime and everything
// it started are dead and reaped, and every goroutine Run started has ended.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// Options configures Run.
type Options struct {
	// RuntimeAPIAddr is where the Runtime API listens; default 127.0.0.1:9001.
	// Port 0 picks a free port.
	RuntimeAPIAddr string
	// Logger receives the agent's own diagnostics (not function output);
	// default slog.Default().
	Logger *slog.Logger
	// OwnsKernel is set by an agent that is its kernel's only tenant, a
	// microVM's PID 1. It then keeps the system clock in step with the
	// harness's (Init and Invoke carry it), and an idle trim also drops the
	// kernel's clean caches, whose pages the VMM can take back. Anywhere
	// else either would act on the host.
	OwnsKernel bool
	// SplitCPUs is set by a VM's PID 1 whose VMM gave it one vCPU more
	// than the function's share: the agent then runs on the first CPU it
	// may use and the runtime (and all it starts) on the others. Neither
	// waits for the other to be scheduled out, and under software
	// emulation (QEMU's TCG) no switch between their address spaces
	// flushes the emulated TLB and the translated-code jump cache, which
	// dominated a warm invocation there. Ignored with fewer than 2 CPUs.
	SplitCPUs bool
}

// DefaultRuntimeAPIAddr is Lambda's Runtime API address.
const DefaultRuntimeAPIAddr = "127.0.0.1:9001"

// shutdownWait bounds how long Run waits for Runtime API handlers to end.
const shutdownWait = 5 * time.Second

// Run serves the harness on conn until Shutdown, until conn closes, or until ctx is done.
//
// Run owns conn and closes it before returning; closing conn must unblock a
// pending Read on it (true of sockets and pollable files). It returns nil after a
// Shutdown or when the harness closed the stream between frames, ctx.Err()
// when ctx was cancelled, and an error for a broken stream or protocol.
// In every case the runtime and all processes it started have been killed
// and reaped when Run returns.
func Run(ctx context.Context, conn io.ReadWriteCloser, opts Options) error {
	if os.Getpid() == 1 {
		// As PID 1 the agent owns its process. It serves one invocation at
		// a time and needs no parallelism, and one P keeps each hand-off
		// between its goroutines (frame reader, session, Runtime API
		// handlers) on the same thread instead of waking another one:
		// about a fifth of its CPU per invocation on a 2-core host.
		runtime.GOMAXPROCS(1)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	addr := opts.RuntimeAPIAddr
	if addr == "" {
		addr = DefaultRuntimeAPIAddr
	}
	pc := protocol.NewConn(conn)
	defer pc.Close()

	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listening for the runtime api on %s: %w", addr, err)
	}
	defer ln.Close() // no-op after the server closed it; covers early returns
	pre := newCapBuffer(defaultLogLimit)
	out, err := newOutput(pre)
	if err != nil {
		return err
	}
	defer out.close()
	sup := newSupervisor(os.Getpid() == 1, log)
	defer sup.close()
	if opts.SplitCPUs {
		sup.runtimeCPUs = splitCPUs(log)
	}

	e := newEnv(log, sup, out, pre, ln.Addr().String())
	srv := newRuntimeAPI(e)
	srv.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelDebug)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln) // returns ErrServerClosed after Shutdown/Close
	}()

	s := &session{e: e, conn: pc, log: log, frames: readFrames(pc), ownsKernel: opts.OwnsKernel}

	err = s.serve(ctx)
	if errors.Is(err, errStopped) {
		err = s.stopErr
	}

	// Teardown, in dependency order; none of it depends on ctx.
	killErr := e.close()
	var doneErr error
	if s.shutdown {
		doneErr = pc.WriteFrame(protocol.TypeShutdownDone, protocol.ShutdownDone{})
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownWait)
	if serr := srv.Shutdown(sctx); serr != nil {
		srv.Close()
	}
	cancel()
	<-served
	pc.Close() // unblocks the frame reader, which then ends
	for range s.frames {
	}
	return errors.Join(err, killErr, doneErr)
}

// frameMsg is one ReadFrame result.
type frameMsg struct {
	f   *protocol.Frame
	err error
}

// readFrames reads frames until an error (including the conn being closed
// by Run) and delivers them in order; the channel is closed after the error.
// It is unbuffered so the reader never runs ahead of the session by more
// than one frame.
func readFrames(pc *protocol.Conn) <-chan frameMsg {
	ch := make(chan frameMsg)
	go func() {
		defer close(ch)
		for {
			f, err := pc.ReadFrame()
			ch <- frameMsg{f, err}
			if err != nil {
				return
			}
		}
	}()
	return ch
}
