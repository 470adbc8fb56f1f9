package firecracker

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// instance is one VM: the state every VM has (vmm.Instance) and
// Firecracker's own. Its fields are set by Boot and read-only once Start
// has returned.
type instance struct {
	*vmm.Instance
	d *Driver
	// root is the host directory Firecracker sees as its own: the
	// instance directory, or the jail's chroot. Its sockets are there.
	root string
	// jail is the jailer's configuration (nil: not jailed); cgroups the
	// directories it creates.
	jail    *jail
	cgroups []string
	api     *apiClient
}

var _ vmm.Machine = (*instance)(nil)

func (d *Driver) newInstance(base *vmm.Instance) *instance {
	return &instance{Instance: base, d: d}
}

// vmFiles are the paths of a VM's kernel and disks as Firecracker opens
// them (inside its chroot when jailed).
type vmFiles struct {
	kernel, root, code, scratch, vsock string
}

// Boot records the VM, makes its disks (in its jail, if jailed), starts
// Firecracker, configures the VM over the API and waits until the agent
// inside is ready; see vmm.Machine.
func (i *instance) Boot(ctx context.Context, spec driver.Spec) error {
	d := i.d
	if spec.Network && d.opts.TapName == "" {
		d.warnOnce(&d.warnedNetwk, "sandbox network requested but no tap is configured: vms get loopback only")
	}
	rec := &record{Record: vmm.NewRecord(spec), Firecracker: d.opts.FirecrackerPath, Jailer: d.opts.JailerPath}
	i.root = i.Dir()
	if d.opts.JailerPath != "" {
		i.jail = &jail{
			Jailer: d.opts.JailerPath, Firecracker: d.opts.FirecrackerPath, ID: spec.ID,
			UID: d.opts.UIDBase + i.Slot(), GID: d.opts.UIDBase + i.Slot(),
			ChrootBase: filepath.Join(i.Dir(), "jail"), NetNS: d.opts.NetNS,
			Cgroups: d.cgroups, Parent: d.opts.CgroupParent, MemoryMB: spec.MemoryMB,
		}
		i.root = i.jail.chroot()
		i.cgroups = d.cgroups.dirs(d.opts.CgroupParent, spec.ID)
		rec.UID, rec.Cgroups = i.jail.UID, i.cgroups
	}
	rec.Root = i.root
	if err := i.Create(rec); err != nil {
		return err
	}
	files, err := i.disks(ctx, spec)
	if err != nil {
		return err
	}
	launched := time.Now()
	if err := i.launch(&rec.Record); err != nil {
		return err
	}
	if err := i.Record(rec); err != nil {
		return err
	}
	ctx, cancel := i.ReadyContext(ctx, d.opts.ReadyTimeout)
	defer cancel()
	if err := i.waitAPI(ctx); err != nil {
		return err
	}
	if err := i.configure(ctx, spec, files); err != nil {
		return err
	}
	if err := i.waitReady(ctx); err != nil {
		return err
	}
	i.Log().Debug("vm ready", "boot", time.Since(launched), "disks", launched.Sub(rec.Created))
	return nil
}

// disks makes the root, code and scratch images and, jailed, puts them
// and the kernel into the chroot.
func (i *instance) disks(ctx context.Context, spec driver.Spec) (vmFiles, error) {
	d := i.d
	if err := os.MkdirAll(i.root, 0o700); err != nil {
		return vmFiles{}, fmt.Errorf("creating the vm's root: %w", err)
	}
	scratch := filepath.Join(i.root, scratchImage)
	root, code, err := d.host.Disks(ctx, spec, scratch)
	if err != nil {
		return vmFiles{}, err
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
func (i *instance) launch(rec *vmm.Record) error {
	d := i.d
	var cmd *exec.Cmd
	if i.jail != nil {
		cmd = exec.Command(i.jail.Jailer, i.jail.args()...)
		cmd.Dir = "/"
	} else {
		// Relative socket paths: Firecracker binds them in its working
		// directory, so a deep StateDir never exceeds sun_path.
		cmd = exec.Command(d.opts.FirecrackerPath, "--api-sock", apiSock, "--id", i.ID())
		cmd.Dir = i.Dir()
	}
	// Firecracker needs nothing of the harness's environment (the jailer
	// clears it anyway).
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	// Setsid: a terminal's Ctrl-C reaches only the server, which then
	// stops VMs in order. Pdeathsig: a harness that dies takes its VMs
	// (not a jailed one: dropping to its user clears Pdeathsig, so Recover
	// is what removes those).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	i.Log().Debug("starting vm", "args", cmd.Args)
	i.api = newAPIClient(filepath.Join(i.root, apiSock))
	return i.Launch(cmd, rec)
}

// apiPoll is how often waitAPI looks for Firecracker's API socket.
const apiPoll = 5 * time.Millisecond

// waitAPI waits until Firecracker accepts connections on its API socket
// (it binds the socket a moment after it starts; jailed, after the
// jailer's work).
func (i *instance) waitAPI(ctx context.Context) error {
	path := filepath.Join(i.root, apiSock)
	for {
		c, err := hostproc.DialUnix(ctx, path)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-ctx.Done():
			return i.ReadyErr(ctx, "waiting for firecracker's api socket")
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
		nic = &networkInterface{IfaceID: "eth0", HostDevName: slotString(d.opts.TapName, i.Slot()), GuestMAC: guestMAC(i.Slot())}
		boot.IP = slotString(d.opts.GuestIP, i.Slot())
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"machine config", func() error {
			return i.api.putMachineConfig(ctx, machineConfig{VCPUCount: d.host.VCPUs(spec.MemoryMB), MemSizeMiB: spec.MemoryMB})
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
				return i.ReadyErr(ctx, "configuring the vm ("+s.what+")")
			}
			return i.WithOutput(fmt.Errorf("configuring the vm (%s): %w", s.what, err))
		}
	}
	return nil
}

// guestMAC is a locally administered unicast MAC for slot.
func guestMAC(slot int) string {
	return fmt.Sprintf("06:00:00:00:%02x:%02x", slot>>8&0xff, slot&0xff)
}

// waitReady connects to the agent through the hybrid vsock and waits for
// the guest's ready line.
func (i *instance) waitReady(ctx context.Context) error {
	return i.AwaitAgent(ctx, "connecting to the guest agent", func(ctx context.Context) (net.Conn, error) {
		return connectGuest(ctx, filepath.Join(i.root, vsockSock), agentVsockPort)
	})
}

// Ask asks the VM to end: Ctrl-Alt-Del through the API (a guest with an
// i8042 driver reboots, which ends Firecracker; ours has none and ends
// itself when its stream closes, which Stop did before asking), then, if
// Firecracker is still running after grace, SIGTERM; see vmm.Machine.
// The driver's stop grace is split in two (see newDriver): grace for the
// guest after Ctrl-Alt-Del, grace for Firecracker after SIGTERM.
func (i *instance) Ask(ctx context.Context, grace time.Duration) {
	select {
	case <-i.Done():
		return
	default:
	}
	actx, cancel := context.WithTimeout(ctx, min(grace, actionTimeout))
	err := i.api.action(actx, actionSendCtrlAltDel)
	cancel()
	if err != nil {
		i.Log().Debug("ctrl-alt-del failed; sending SIGTERM", "err", err)
		_ = i.Cmd().Process.Signal(syscall.SIGTERM)
		return
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-i.Done():
	case <-ctx.Done():
	case <-t.C:
		_ = i.Cmd().Process.Signal(syscall.SIGTERM)
	}
}

// Release closes the API client and removes the jail's cgroups (killing
// what is left in them); see vmm.Machine.
func (i *instance) Release(ctx context.Context) error {
	if i.api != nil {
		i.api.Close()
	}
	return removeCgroups(context.WithoutCancel(ctx), i.cgroups)
}
