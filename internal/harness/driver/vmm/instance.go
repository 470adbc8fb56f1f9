package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Instance is the state every VM has, whatever its VMM. A driver's VM
// type embeds *Instance (see Machine); Host.Start makes it. Its fields
// are set while Boot runs and read-only once Start has returned.
type Instance struct {
	id   string
	name string // the VMM's; see Name
	// spare: launched as a spare, at SpareNice until assigned.
	spare bool
	dir   string
	slot  int
	log   *slog.Logger
	host  hostRef
	m     machineSteps

	cmd     *exec.Cmd
	conn    net.Conn
	console *hostproc.LineLog // the VMM's stdout: the guest's serial console
	stderr  *hostproc.LineLog // the VMM's own diagnostics
	// done is closed when the VMM has exited (the only cmd.Wait).
	done chan struct{}
	// started is closed when Start has returned; cancelStart aborts it.
	started     chan struct{}
	startCtx    context.Context
	cancelStart context.CancelFunc

	stopOnce sync.Once
	stopErr  error
	// netns is the network namespace Launch starts the VMM in (0: the
	// harness's).
	netns int
}

// hostRef is what an Instance needs of its Host, which is generic.
type hostRef interface {
	config() *Config
	forker() *hostproc.Forker
	// forget unregisters the instance; destroyed reports that its VMM is
	// gone, so its slot may be reused.
	forget(i *Instance, destroyed bool)
}

// machineSteps are the Machine methods the stop sequence calls.
type machineSteps interface {
	Ask(ctx context.Context, grace time.Duration)
	Release(ctx context.Context) error
}

// OutputTailer is implemented by a Machine whose VMM says things
// elsewhere than on its stderr (Firecracker's logger): WithOutput adds
// OutputTail, its last lines, to a failed start's error.
type OutputTailer interface {
	OutputTail() string
}

var _ driver.Instance = (*Instance)(nil)

// ID returns Spec.ID.
func (i *Instance) ID() string { return i.id }

// Conn is the stream to the guest's agent (after AwaitAgent).
func (i *Instance) Conn() io.ReadWriteCloser { return i.conn }

// Done is closed when the VMM has exited.
func (i *Instance) Done() <-chan struct{} { return i.done }

// PID is the VMM's pid (after Launch).
func (i *Instance) PID() int { return i.cmd.Process.Pid }

// Dir is the instance directory, StateDir/<id>, which Stop removes.
func (i *Instance) Dir() string { return i.dir }

// Slot is the VM's slot, 0 to Slots-1, unique among the driver's running
// VMs (it is reused once a VM is stopped).
func (i *Instance) Slot() int { return i.slot }

// Log is the logger of the instance (with its ID and function).
func (i *Instance) Log() *slog.Logger { return i.log }

// Cmd is the VMM's command; nil before Launch. Its ProcessState is set
// once Done is closed.
func (i *Instance) Cmd() *exec.Cmd { return i.cmd }

// ConsoleTail is the last lines of the guest's console, "; "-joined.
func (i *Instance) ConsoleTail() string {
	if i.console == nil {
		return ""
	}
	return i.console.LastLines()
}

// instance makes *Instance, and so the driver types embedding it, the
// only implementations of Machine.
func (i *Instance) instance() *Instance { return i }

// Create makes the instance directory and writes rec (a driver's record,
// embedding Record) into it: record first, then create, so Recover knows
// of every VM and every resource it may have.
func (i *Instance) Create(rec any) error {
	if err := os.Mkdir(i.dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	return i.Record(rec)
}

// Record rewrites the instance's record (see hostproc.WriteRecord).
func (i *Instance) Record(rec any) error { return hostproc.WriteRecord(i.dir, rec) }

// Launch starts cmd, the VMM, from the driver's fork thread, with its
// stdout (the guest's console) and stderr drained into the log under a
// byte budget, and supervises it: Done closes when it exits. The caller
// sets cmd's path, arguments, directory, environment and SysProcAttr
// (Pdeathsig, Setsid, credentials). Launch sets rec's pid and start time;
// the caller saves them with Record. Once Launch has started the VMM,
// the VMM is the instance's: Stop ends it even if Launch then fails.
func (i *Instance) Launch(cmd *exec.Cmd, rec *Record) error {
	name := i.host.config().Name
	i.console = newConsoleLog(i.log.With("source", "console"))
	i.stderr = NewVMMLog(i.log.With("source", name), slog.LevelInfo)
	cmd.Stdout = i.console
	cmd.Stderr = i.stderr
	// Bounds cmd.Wait if something kept the pipes open after the VMM died.
	cmd.WaitDelay = time.Second
	place := hostproc.Placement{NetNS: i.netns}
	if i.spare {
		place.Nice = SpareNice
	}
	if err := i.host.forker().StartPlaced(cmd, place); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	i.cmd = cmd
	hostproc.Supervise(cmd, i.done, func(err error) {
		i.console.Flush()
		i.stderr.Flush()
		if err != nil {
			i.log.Info("vm exited", "err", err)
		}
	})
	p, err := hostproc.Lookup(cmd.Process.Pid)
	if err != nil {
		return i.WithOutput(fmt.Errorf("reading %s's start time: %w", name, err))
	}
	rec.PID, rec.StartTime = p.PID, p.StartTime
	return nil
}

// StartInNetNS makes Launch start the VMM in the network namespace ns (a
// descriptor the machine keeps open until the VMM has started), for a VMM
// that opens its tap by name (package network's VM namespaces).
func (i *Instance) StartInNetNS(ns int) { i.netns = ns }

// WithOutput adds what the VMM and the guest's console said last to err,
// an error of the VM's start, first waiting a moment (Config.ExitWait)
// for the last lines of a VMM that is exiting.
func (i *Instance) WithOutput(err error) error {
	cfg := i.host.config()
	select {
	case <-i.done:
	case <-time.After(cfg.ExitWait):
	}
	var said []string
	if i.stderr != nil {
		if t := i.stderr.LastLines(); t != "" {
			said = append(said, cfg.Name+" said: "+t)
		}
	}
	if ot, ok := i.m.(OutputTailer); ok {
		if t := ot.OutputTail(); t != "" {
			said = append(said, cfg.Name+" logged: "+t)
		}
	}
	if t := i.ConsoleTail(); t != "" {
		said = append(said, "console: "+t)
	}
	if len(said) == 0 {
		return err
	}
	return fmt.Errorf("%w (%s)", err, strings.Join(said, "; "))
}

// ReadyContext bounds the rest of a boot: the returned context ends after
// timeout (its cause says "vm not ready within"), when ctx ends, or when
// the VMM exits, whichever is first, so every wait of Boot ends with the
// VMM. The caller must call cancel.
func (i *Instance) ReadyContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, fmt.Errorf("vm not ready within %s", timeout))
	go func() {
		select {
		case <-i.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// ReadyErr explains why a wait of Boot (what) ended with ctx: the VMM
// exited (with what it said), the ready timeout, or the caller.
func (i *Instance) ReadyErr(ctx context.Context, what string) error {
	select {
	case <-i.done:
		return i.WithOutput(fmt.Errorf("%s: %s exited", what, i.host.config().Name))
	default:
	}
	err := fmt.Errorf("%s: %w", what, context.Cause(ctx))
	if errors.Is(context.Cause(ctx), context.Canceled) || errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
		return err // the caller gave up; the guest's output adds nothing
	}
	return i.WithOutput(err)
}

// AwaitAgent connects to the guest's agent with dial (the driver's way:
// a virtio-serial socket, the hybrid vsock) and waits for its ReadyLine.
// ctx (see ReadyContext) bounds both; what names the connection in
// errors. The connection becomes the instance's Conn, which Stop closes
// whatever AwaitAgent returns.
func (i *Instance) AwaitAgent(ctx context.Context, what string, dial func(context.Context) (net.Conn, error)) error {
	conn, err := i.dial(ctx, what, dial)
	if err != nil {
		return err
	}
	return i.awaitReady(ctx, conn)
}

// dial connects with the driver's dial; an error carries why: the VMM's
// exit or the ready timeout (ReadyErr), or dial's own with the VM's
// output.
func (i *Instance) dial(ctx context.Context, what string, dial func(context.Context) (net.Conn, error)) (net.Conn, error) {
	conn, err := dial(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, i.ReadyErr(ctx, what)
		}
		return nil, i.WithOutput(fmt.Errorf("%s: %w", what, err))
	}
	return conn, nil
}

// AttachAgent connects to an agent that is already serving (a VM restored
// from a snapshot: its agent sent its ReadyLine before the snapshot and
// waits for a frame) and makes the connection the instance's Conn; no
// ReadyLine is read. ctx bounds the dial.
func (i *Instance) AttachAgent(ctx context.Context, what string, dial func(context.Context) (net.Conn, error)) error {
	conn, err := i.dial(ctx, what, dial)
	if err != nil {
		return err
	}
	i.conn = conn
	return nil
}

// awaitReady makes conn the instance's Conn and reads the guest's
// ReadyLine from it.
func (i *Instance) awaitReady(ctx context.Context, conn net.Conn) error {
	i.conn = conn
	return i.awaitLine(ctx, ReadyLine, "waiting for the guest agent")
}

// awaitLine reads line from the instance's Conn, byte by byte so that no
// byte of what follows is consumed; what names the wait in errors.
func (i *Instance) awaitLine(ctx context.Context, line, what string) error {
	conn := i.conn
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()
	got := make([]byte, 0, len(line))
	var b [1]byte
	for len(got) < len(line) {
		n, err := conn.Read(b[:])
		if err != nil {
			if ctx.Err() != nil {
				return i.ReadyErr(ctx, what)
			}
			return i.WithOutput(fmt.Errorf("%s: reading %q: %w", what, strings.TrimSpace(line), err))
		}
		if n == 0 {
			continue // an empty read (io.Reader allows it) carries no byte
		}
		got = append(got, b[0])
		if b[0] != line[len(got)-1] {
			return i.WithOutput(fmt.Errorf("guest sent %q instead of %q", got, strings.TrimSpace(line)))
		}
	}
	// The whole line arrived. If the VMM's exit or ctx raced with the
	// last byte, the read deadline may be set already: clear it, since the
	// connection is handed over; a VM that exited meanwhile shows up
	// through Done like any later exit.
	if !stop() {
		if err := conn.SetReadDeadline(time.Time{}); err != nil {
			return i.WithOutput(fmt.Errorf("clearing the agent connection's deadline: %w", err))
		}
	}
	return nil
}

// stop runs the teardown exactly once, after a Boot in progress has been
// aborted and has returned; concurrent callers wait for it and get its
// error. grace bounds the graceful part (0: kill at once).
func (i *Instance) stop(ctx context.Context, grace time.Duration) error {
	i.cancelStart()
	<-i.started
	i.stopOnce.Do(func() {
		i.stopErr = i.destroy(ctx, grace)
		// The VMM is dead, or destroy failed and the slot stays taken:
		// its user or tap may still be in use.
		i.host.forget(i, i.stopErr == nil)
	})
	return i.stopErr
}

// destroy closes the stream (the guest's agent then ends the VM by
// itself), asks the VMM to exit (Machine.Ask), kills it after the grace
// period, releases what else the machine holds (Machine.Release) and
// removes the instance directory. The VM is never reused, so "graceful"
// only lets the VMM exit by itself; the guest's disks are read-only or
// thrown away. It runs to completion even when ctx is cancelled; ctx only
// shortens the grace period.
func (i *Instance) destroy(ctx context.Context, grace time.Duration) error {
	var errs []error
	if i.conn != nil {
		i.conn.Close()
	}
	if i.cmd != nil {
		ask := func(g time.Duration) { i.m.Ask(ctx, g) }
		if err := hostproc.Stop(ctx, i.cmd.Process, i.done, grace, ask); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", i.host.config().Name, err))
		}
	}
	if err := i.m.Release(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(i.dir); err != nil {
		errs = append(errs, fmt.Errorf("removing state directory: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stopping vm %s: %w", i.id, err)
	}
	return nil
}
