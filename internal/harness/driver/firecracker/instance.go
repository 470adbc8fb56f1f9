package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// instance is one VM. Its fields are set by start and read-only once
// started is closed.
type instance struct {
	d    *Driver
	id   string
	dir  string
	log  *slog.Logger
	slot int
	// root is the host directory Firecracker sees as its own: dir, or the
	// jail's chroot. Its sockets are there.
	root string
	// jail is the jailer's configuration (nil: not jailed); cgroups the
	// directories it creates.
	jail    *jail
	cgroups []string

	cmd     *exec.Cmd
	api     *apiClient
	conn    net.Conn
	console *hostproc.LineLog // Firecracker's stdout: the guest's serial console
	stderr  *hostproc.LineLog // Firecracker's (and the jailer's) own diagnostics
	// done is closed when the VMM has exited (the only cmd.Wait).
	done chan struct{}
	// started is closed when Start has returned; cancelStart aborts it.
	started     chan struct{}
	cancelStart context.CancelFunc

	stopOnce syncOnceErr
}

var _ driver.Instance = (*instance)(nil)

func (i *instance) ID() string               { return i.id }
func (i *instance) Conn() io.ReadWriteCloser { return i.conn }
func (i *instance) Done() <-chan struct{}    { return i.done }

// PID is the VMM's pid (the jailer's, which execs Firecracker in place).
func (i *instance) PID() int { return i.cmd.Process.Pid }

// vmFiles are the paths of a VM's kernel and disks as Firecracker opens
// them (inside its chroot when jailed).
type vmFiles struct {
	kernel, root, code, scratch, vsock string
}

func (i *instance) start(ctx context.Context, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := i.d
	rec := &record{
		ID: spec.ID, Function: spec.Function, RevisionID: spec.RevisionID,
		Firecracker: d.opts.FirecrackerPath, Jailer: d.opts.JailerPath,
		Created: time.Now().UTC(),
	}
	i.root = i.dir
	if d.opts.JailerPath != "" {
		i.jail = &jail{
			Jailer: d.opts.JailerPath, Firecracker: d.opts.FirecrackerPath, ID: spec.ID,
			UID: d.opts.UIDBase + i.slot, GID: d.opts.UIDBase + i.slot,
			ChrootBase: filepath.Join(i.dir, "jail"), NetNS: d.opts.NetNS,
			Cgroups: d.cgroups, Parent: d.opts.CgroupParent, MemoryMB: spec.MemoryMB,
		}
		i.root = i.jail.chroot()
		i.cgroups = d.cgroups.dirs(d.opts.CgroupParent, spec.ID)
		rec.UID, rec.Cgroups = i.jail.UID, i.cgroups
	}
	rec.Root = i.root
	// Record first, then create: Recover must know of every VM.
	if err := os.Mkdir(i.dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	files, err := i.disks(ctx, spec)
	if err != nil {
		return err
	}
	launched := time.Now()
	if err := i.launch(); err != nil {
		return err
	}
	p, err := hostproc.Lookup(i.cmd.Process.Pid)
	if err != nil {
		return i.withOutput(fmt.Errorf("reading firecracker's start time: %w", err))
	}
	rec.PID, rec.StartTime = p.PID, p.StartTime
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeoutCause(ctx, d.opts.ReadyTimeout,
		fmt.Errorf("vm not ready within %s", d.opts.ReadyTimeout))
	defer cancel()
	// The VMM's exit ends every wait below.
	go func() {
		select {
		case <-i.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := i.waitAPI(ctx); err != nil {
		return err
	}
	if err := i.configure(ctx, spec, files); err != nil {
		return err
	}
	if err := i.waitReady(ctx); err != nil {
		return err
	}
	i.log.Debug("vm ready", "boot", time.Since(launched), "disks", launched.Sub(rec.Created))
	return nil
}

// disks makes the root, code and scratch images and, jailed, puts them
// and the kernel into the chroot.
func (i *instance) disks(ctx context.Context, spec driver.Spec) (vmFiles, error) {
	d := i.d
	rt := spec.Runtime
	root, err := d.images.Root(ctx, &rt)
	if err != nil {
		return vmFiles{}, fmt.Errorf("root image of %s: %w", spec.Runtime.ID, err)
	}
	key, err := codeKey(spec)
	if err != nil {
		return vmFiles{}, err
	}
	code, err := d.images.Code(ctx, spec.CodeDir, spec.RuntimeDir, key)
	if err != nil {
		return vmFiles{}, fmt.Errorf("code image: %w", err)
	}
	if err := os.MkdirAll(i.root, 0o700); err != nil {
		return vmFiles{}, fmt.Errorf("creating the vm's root: %w", err)
	}
	scratch := filepath.Join(i.root, scratchImage)
	if err := d.images.Scratch(ctx, scratch, spec.EphemeralMB); err != nil {
		return vmFiles{}, fmt.Errorf("scratch image: %w", err)
	}
	if i.jail == nil {
		return vmFiles{kernel: d.opts.KernelPath, root: root, code: code, scratch: scratch, vsock: vsockSock}, nil
	}
	for _, f := range []struct{ src, name string }{
		{d.opts.KernelPath, kernelFile}, {root, rootImage}, {code, codeImage},
	} {
		copied, err := linkOrCopy(f.src, filepath.Join(i.root, f.name))
		if err != nil {
			return vmFiles{}, fmt.Errorf("putting %s into the jail: %w", f.name, err)
		}
		if copied {
			d.warnOnce(&d.warnedCopy, "images are copied into every jail: put the state and cache directories on one file system so they can be hard links",
				"state_dir", d.opts.StateDir)
		}
	}
	// The jailed VMM writes the scratch disk as its own user.
	if err := os.Chown(scratch, i.jail.UID, i.jail.GID); err != nil {
		return vmFiles{}, fmt.Errorf("handing the scratch image to the vm user: %w", err)
	}
	return vmFiles{
		kernel: "/" + kernelFile, root: "/" + rootImage, code: "/" + codeImage,
		scratch: "/" + scratchImage, vsock: "/" + vsockSock,
	}, nil
}

// launch starts Firecracker, or the jailer that becomes it.
func (i *instance) launch() error {
	d := i.d
	var cmd *exec.Cmd
	if i.jail != nil {
		cmd = exec.Command(i.jail.Jailer, i.jail.args()...)
		cmd.Dir = "/"
	} else {
		// Relative socket paths: Firecracker binds them in its working
		// directory, so a deep StateDir never exceeds sun_path.
		cmd = exec.Command(d.opts.FirecrackerPath, "--api-sock", apiSock, "--id", i.id)
		cmd.Dir = i.dir
	}
	// Firecracker needs nothing of the harness's environment (the jailer
	// clears it anyway).
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	i.console = newConsoleLog(i.log.With("source", "console"))
	i.stderr = newVMMLog(i.log.With("source", "firecracker"))
	cmd.Stdout = i.console
	cmd.Stderr = i.stderr
	// Bounds cmd.Wait if something kept the pipes open after the VMM died.
	cmd.WaitDelay = time.Second
	// Setsid: a terminal's Ctrl-C reaches only the server, which then
	// stops VMs in order. Pdeathsig: a harness that dies takes its VMs
	// (not a jailed one: dropping to its user clears Pdeathsig, so Recover
	// is what removes those).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	i.log.Debug("starting vm", "args", cmd.Args)
	if err := d.fork.Start(cmd); err != nil {
		return fmt.Errorf("starting firecracker: %w", err)
	}
	i.cmd = cmd
	i.api = newAPIClient(filepath.Join(i.root, apiSock))
	hostproc.Supervise(cmd, i.done, func(err error) {
		i.console.Flush()
		i.stderr.Flush()
		if err != nil {
			i.log.Info("vm exited", "err", err)
		}
	})
	return nil
}

// apiPoll is how often waitAPI looks for Firecracker's API socket.
const apiPoll = 5 * time.Millisecond

// waitAPI waits until Firecracker accepts connections on its API socket
// (it binds the socket a moment after it starts; jailed, after the
// jailer's work).
func (i *instance) waitAPI(ctx context.Context) error {
	path := filepath.Join(i.root, apiSock)
	for {
		c, err := dialUnix(ctx, path)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return i.readyErr(ctx, "waiting for firecracker's api socket")
		case <-time.After(apiPoll):
		}
	}
}

// configure sets the VM up over the API and starts it. The order is the
// documented one (docs/getting-started.md): machine, boot source, drives,
// devices, then InstanceStart; the drives' order makes root /dev/vda,
// code /dev/vdb and scratch /dev/vdc.
func (i *instance) configure(ctx context.Context, spec driver.Spec, f vmFiles) error {
	d := i.d
	boot := bootConfig{ID: spec.ID}
	var nic *networkInterface
	if spec.Network && d.opts.TapName != "" {
		nic = &networkInterface{IfaceID: "eth0", HostDevName: slotString(d.opts.TapName, i.slot), GuestMAC: guestMAC(i.slot)}
		boot.IP = slotString(d.opts.GuestIP, i.slot)
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"machine config", func() error {
			return i.api.putMachineConfig(ctx, machineConfig{VCPUCount: vcpusFor(spec.MemoryMB, d.hostCPUs), MemSizeMiB: spec.MemoryMB})
		}},
		{"boot source", func() error {
			boot.ClockUnixMs = time.Now().UnixMilli()
			return i.api.putBootSource(ctx, bootSource{KernelImagePath: f.kernel, BootArgs: boot.kernelCmdline()})
		}},
		{"root drive", func() error {
			return i.api.putDrive(ctx, drive{DriveID: driveRoot, PathOnHost: f.root, IsRootDevice: true, IsReadOnly: true})
		}},
		{"code drive", func() error {
			return i.api.putDrive(ctx, drive{DriveID: driveCode, PathOnHost: f.code, IsReadOnly: true})
		}},
		{"scratch drive", func() error {
			return i.api.putDrive(ctx, drive{DriveID: driveScratch, PathOnHost: f.scratch})
		}},
		{"vsock", func() error { return i.api.putVsock(ctx, vsockDevice{GuestCID: guestCID, UDSPath: f.vsock}) }},
		{"entropy device", func() error { return i.api.putEntropy(ctx) }},
		{"network interface", func() error {
			if nic == nil {
				return nil
			}
			return i.api.putNetworkInterface(ctx, *nic)
		}},
		{"instance start", func() error { return i.api.action(ctx, actionInstanceStart) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			if ctx.Err() != nil && !isAPIError(err) {
				return i.readyErr(ctx, "configuring the vm ("+s.what+")")
			}
			return i.withOutput(fmt.Errorf("configuring the vm (%s): %w", s.what, err))
		}
	}
	return nil
}

// guestMAC is a locally administered unicast MAC for slot.
func guestMAC(slot int) string {
	return fmt.Sprintf("06:00:00:00:%02x:%02x", slot>>8&0xff, slot&0xff)
}

// waitReady connects to the agent through the hybrid vsock and reads the
// guest's ready line, byte by byte so no byte of the protocol that
// follows is consumed.
func (i *instance) waitReady(ctx context.Context) error {
	conn, err := connectGuest(ctx, filepath.Join(i.root, vsockSock), agentVsockPort)
	if err != nil {
		if ctx.Err() != nil {
			return i.readyErr(ctx, "connecting to the guest agent")
		}
		return i.withOutput(fmt.Errorf("connecting to the guest agent: %w", err))
	}
	i.conn = conn
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()
	got := make([]byte, 0, len(readyLine))
	var b [1]byte
	for len(got) < len(readyLine) {
		if _, err := conn.Read(b[:]); err != nil {
			if ctx.Err() != nil {
				return i.readyErr(ctx, "waiting for the guest agent")
			}
			return i.withOutput(fmt.Errorf("reading the agent's ready line: %w", err))
		}
		got = append(got, b[0])
		if b[0] != readyLine[len(got)-1] {
			return i.withOutput(fmt.Errorf("guest sent %q instead of its ready line", got))
		}
	}
	// The whole ready line arrived: the agent is up. If the VMM's exit or
	// ctx raced with the last byte, the deadline may be set already:
	// clear it, the connection is handed over; a VM that exited meanwhile
	// shows up through Done like any later exit.
	if !stop() {
		if err := conn.SetReadDeadline(time.Time{}); err != nil {
			return i.withOutput(fmt.Errorf("clearing the agent connection's deadline: %w", err))
		}
	}
	return nil
}

// readyErr explains why a wait of start ended with ctx: the VMM exited
// (with what it said), the ready timeout, or the caller.
func (i *instance) readyErr(ctx context.Context, what string) error {
	select {
	case <-i.done:
		return i.withOutput(fmt.Errorf("%s: firecracker exited", what))
	default:
	}
	err := fmt.Errorf("%s: %w", what, context.Cause(ctx))
	if errors.Is(context.Cause(ctx), context.Canceled) || errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
		return err // the caller gave up; the guest's output adds nothing
	}
	return i.withOutput(err)
}

// withOutput adds what Firecracker and the guest console said last to an
// error, waiting a moment for the last lines of a VMM that is exiting.
func (i *instance) withOutput(err error) error {
	select {
	case <-i.done:
	case <-time.After(100 * time.Millisecond):
	}
	var said []string
	if t := i.stderr.LastLines(); t != "" {
		said = append(said, "firecracker said: "+t)
	}
	if t := i.console.LastLines(); t != "" {
		said = append(said, "console: "+t)
	}
	if len(said) == 0 {
		return err
	}
	return fmt.Errorf("%w (%s)", err, strings.Join(said, "; "))
}

// stop runs the teardown exactly once; concurrent callers wait for it.
func (i *instance) stop(ctx context.Context) error {
	return i.stopWithGrace(ctx, i.d.opts.StopGrace)
}

func (i *instance) stopWithGrace(ctx context.Context, grace time.Duration) error {
	i.cancelStart()
	<-i.started
	return i.stopOnce.do(func() error {
		err := i.destroy(ctx, grace)
		i.d.instances.Remove(i.id)
		// The VMM is dead (or destroy failed and the slot stays taken:
		// its uid or tap may still be in use).
		if err == nil {
			i.d.releaseSlot(i.slot)
		}
		return err
	})
}

// destroy closes the stream (the guest's agent then ends the VM by
// itself), asks Firecracker to stop, kills it after the grace period, and
// removes its cgroups and the instance directory. The VM is never reused,
// so "graceful" only lets the guest end by itself; its disks are
// read-only or thrown away. It runs to completion even when ctx is
// cancelled; ctx only shortens the grace period.
func (i *instance) destroy(ctx context.Context, grace time.Duration) error {
	var errs []error
	if i.conn != nil {
		i.conn.Close()
	}
	if i.cmd != nil {
		// Half the grace for the guest after Ctrl-Alt-Del, half for
		// Firecracker after SIGTERM.
		ask := func(g time.Duration) { i.shutdown(ctx, g) }
		if err := hostproc.Stop(ctx, i.cmd.Process, i.done, grace/2, ask); err != nil {
			errs = append(errs, fmt.Errorf("firecracker: %w", err))
		}
	}
	if i.api != nil {
		i.api.Close()
	}
	if err := removeCgroups(context.WithoutCancel(ctx), i.cgroups); err != nil {
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

// shutdown asks the VM to end: Ctrl-Alt-Del through the API (a guest
// with an i8042 driver reboots, which ends Firecracker; ours has none and
// ends itself when its stream closes), then, if Firecracker is still
// running after grace, SIGTERM.
func (i *instance) shutdown(ctx context.Context, grace time.Duration) {
	select {
	case <-i.done:
		return
	default:
	}
	actx, cancel := context.WithTimeout(ctx, min(grace, actionTimeout))
	err := i.api.action(actx, actionSendCtrlAltDel)
	cancel()
	if err != nil {
		i.log.Debug("ctrl-alt-del failed; sending SIGTERM", "err", err)
		_ = i.cmd.Process.Signal(syscall.SIGTERM)
		return
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-i.done:
	case <-ctx.Done():
	case <-t.C:
		_ = i.cmd.Process.Signal(syscall.SIGTERM)
	}
}
