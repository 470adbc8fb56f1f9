package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/network"
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
	// from is the snapshot a restored VM starts from (nil: a fresh boot).
	from *snapSource
	// spec is what the VM was started with, images the host files behind
	// its kernel, root and code images, and nic whether it has a network
	// interface: what Snapshot needs.
	spec   driver.Spec
	images hostImages
	vcpus  int
	nic    bool
	// paused is set once the VM was paused for a snapshot: Ask then ends
	// Firecracker at once (a paused guest cannot act on Ctrl-Alt-Del).
	paused atomic.Bool
	// rec is the VM's record, which Assign rewrites.
	rec *record
	// obs drains Firecracker's logger and metrics pipes (observe.go); set
	// by Boot before Firecracker starts, closed by Release after it ended.
	obs *observer
	// vnet is the VM's namespace and tap (Options.Network), nil without;
	// Release closes it.
	vnet *network.VMNet
}

var _ vmm.SpareMachine = (*instance)(nil)

func (d *Driver) newInstance(base *vmm.Instance) *instance {
	return &instance{Instance: base, d: d}
}

// vmFiles are the paths of a VM's files as Firecracker opens them:
// relative to its working directory (the instance directory), or, jailed,
// absolute in its chroot. Either way they name files in the VM's own root,
// so a snapshot, which records the drive and vsock paths, resolves them to
// the restored VM's own files (see snapshot.go). state and memory are set
// for a restore only.
type vmFiles struct {
	kernel, root, code, scratch, vsock string
	state, memory                      string
}

// hostImages are the host files behind a VM's kernel, root and code
// images (never a symbolic link: Snapshot hard-links them).
type hostImages struct {
	kernel, root, code string
}

// inRoot is how Firecracker names the file name of its root: relative to
// its working directory, or absolute in its chroot.
func (i *instance) inRoot(name string) string {
	if i.jail != nil {
		return "/" + name
	}
	return name
}

// Boot records the VM, makes its disks (in its jail, if jailed), starts
// Firecracker, configures the VM over the API (or loads the snapshot it
// is restored from) and waits until the agent inside is ready (or
// attaches to the restored one); see vmm.Machine.
func (i *instance) Boot(ctx context.Context, spec driver.Spec) error {
	return i.boot(ctx, spec, false)
}

// BootSpare boots a spare VM; see vmm.SpareMachine.
func (i *instance) BootSpare(ctx context.Context, spec driver.Spec) error {
	return i.boot(ctx, spec, true)
}

// boot is Boot, or BootSpare if spare.
func (i *instance) boot(ctx context.Context, spec driver.Spec, spare bool) error {
	d := i.d
	i.spec = spec
	if spec.Network && d.opts.TapName == "" && d.opts.Network == nil {
		d.warnOnce(&d.warnedNetwk, "sandbox network requested but no tap is configured: vms get loopback only")
	}
	i.rec = &record{Record: vmm.NewRecord(spec), Firecracker: d.opts.FirecrackerPath, Jailer: d.opts.JailerPath}
	rec := i.rec
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
	makeDisks := i.disks
	switch {
	case i.from != nil:
		makeDisks = i.restoredDisks
	case spare:
		makeDisks = i.spareDisks
	}
	files, err := makeDisks(ctx, spec)
	if err != nil {
		return err
	}
	uid, gid := 0, 0
	if i.jail != nil {
		uid, gid = i.jail.UID, i.jail.GID
	}
	if err := i.observe(uid, gid); err != nil {
		return err
	}
	if err := i.connect(ctx, spec, uid, gid); err != nil {
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
	if i.from != nil {
		if err := i.resume(ctx, files); err != nil {
			return err
		}
		i.Log().Debug("vm restored", "restore", time.Since(launched), "disks", launched.Sub(rec.Created), "snapshot", i.from.dir)
		return nil
	}
	if err := i.configure(ctx, spec, files, spare); err != nil {
		return err
	}
	if spare {
		if err := i.waitSpare(ctx); err != nil {
			return err
		}
	} else if err := i.waitReady(ctx); err != nil {
		return err
	}
	i.Log().Debug("vm ready", "boot", time.Since(launched), "disks", launched.Sub(rec.Created), "spare", spare)
	return nil
}

// Assign makes a spare the instance of spec; see vmm.SpareMachine. Its
// jail (chroot, cgroups, --id) keeps the spare's name; only the instance
// directory around it is renamed.
func (i *instance) Assign(ctx context.Context, spec driver.Spec, code string) error {
	began := time.Now()
	// Renamed before the record says so: a crash in between leaves a
	// record naming the spare (ID), which is the VMM's name all the same.
	if err := i.Rename(); err != nil {
		return err
	}
	i.root = i.Dir()
	if i.jail != nil {
		i.jail.ChrootBase = filepath.Join(i.Dir(), "jail")
		i.root = i.jail.chroot()
	}
	rec := i.rec
	rec.ID, rec.Function, rec.RevisionID, rec.Machine = spec.ID, spec.Function, spec.RevisionID, i.Name()
	rec.Root = i.root
	if err := i.Record(rec); err != nil {
		return err
	}
	i.api.Close()
	i.api = newAPIClient(filepath.Join(i.root, apiSock))
	i.spec = spec
	src, err := i.placeImage(code, assignedCode)
	if err != nil {
		return err
	}
	if err := i.api.patchDrive(ctx, driveCode, i.inRoot(assignedCode)); err != nil {
		return i.WithOutput(fmt.Errorf("attaching the code image: %w", err))
	}
	i.images.code = src
	if err := i.SendAssignment(ctx, i.d.opts.ReadyTimeout); err != nil {
		return err
	}
	i.Log().Debug("spare vm assigned", "spare", i.Name(), "took", time.Since(began))
	return nil
}

// disks makes the root, code and scratch images and puts them and the
// kernel into the VM's root.
func (i *instance) disks(ctx context.Context, spec driver.Spec) (vmFiles, error) {
	return i.makeDisks(ctx, spec, false)
}

// spareDisks is disks for a spare: where its code image goes, a sparse
// placeholder of vmm.SpareCodeBytes.
func (i *instance) spareDisks(ctx context.Context, spec driver.Spec) (vmFiles, error) {
	return i.makeDisks(ctx, spec, true)
}

func (i *instance) makeDisks(ctx context.Context, spec driver.Spec, spare bool) (vmFiles, error) {
	d := i.d
	if err := os.MkdirAll(i.root, 0o700); err != nil {
		return vmFiles{}, fmt.Errorf("creating the vm's root: %w", err)
	}
	scratch := filepath.Join(i.root, scratchImage)
	imgs := hostImages{kernel: d.opts.KernelPath}
	var err error
	if spare {
		imgs.root, err = d.host.SpareDisks(ctx, spec, scratch)
	} else {
		imgs.root, imgs.code, err = d.host.Disks(ctx, spec, scratch)
	}
	if err != nil {
		return vmFiles{}, err
	}
	if err := i.placeImages(imgs); err != nil {
		return vmFiles{}, err
	}
	if spare {
		if err := sparseFile(filepath.Join(i.root, codeImage), vmm.SpareCodeBytes); err != nil {
			return vmFiles{}, fmt.Errorf("creating the code placeholder: %w", err)
		}
	}
	if err := i.ownScratch(scratch); err != nil {
		return vmFiles{}, err
	}
	return i.files(), nil
}

// sparseFile creates path (mode 0644, not there before) as a hole of size
// bytes.
func sparseFile(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// files are the paths Firecracker is given for the VM's root files.
func (i *instance) files() vmFiles {
	return vmFiles{
		kernel: i.inRoot(kernelFile), root: i.inRoot(rootImage), code: i.inRoot(codeImage),
		scratch: i.inRoot(scratchImage), vsock: i.inRoot(vsockSock),
	}
}

// placeImages puts the kernel and the read-only images (but a code
// image src does not name, a spare's) into the VM's root under their
// fixed names; see placeImage.
func (i *instance) placeImages(src hostImages) error {
	for _, f := range []struct {
		src  *string
		name string
	}{{&src.kernel, kernelFile}, {&src.root, rootImage}, {&src.code, codeImage}} {
		if *f.src == "" {
			continue
		}
		placed, err := i.placeImage(*f.src, f.name)
		if err != nil {
			return err
		}
		*f.src = placed
	}
	i.images = src
	return nil
}

// placeImage puts the file src into the VM's root as name: a symbolic
// link (free, across file systems) for a Firecracker that sees the host,
// a hard link or copy for a jailed one, which reaches nothing outside its
// chroot. It returns the host file behind it (the jail's file is as good a
// source as the cache's).
func (i *instance) placeImage(src, name string) (string, error) {
	d := i.d
	dst := filepath.Join(i.root, name)
	if i.jail == nil {
		abs, err := filepath.Abs(src)
		if err != nil {
			return "", fmt.Errorf("linking %s into the vm's directory: %w", name, err)
		}
		if err := os.Symlink(abs, dst); err != nil {
			return "", fmt.Errorf("linking %s into the vm's directory: %w", name, err)
		}
		return abs, nil
	}
	copied, err := linkOrCopy(src, dst)
	if err != nil {
		return "", fmt.Errorf("putting %s into the jail: %w", name, err)
	}
	if copied {
		d.warnOnce(&d.warnedCopy, "images are copied into every jail: put the state, cache and snapshot directories on one file system so they can be hard links",
			"state_dir", d.opts.StateDir)
	}
	return dst, nil
}

// ownScratch hands the scratch disk to the jailed VMM's user, which
// writes it.
func (i *instance) ownScratch(scratch string) error {
	if i.jail == nil {
		return nil
	}
	if err := os.Chown(scratch, i.jail.UID, i.jail.GID); err != nil {
		return fmt.Errorf("handing the scratch image to the vm user: %w", err)
	}
	return nil
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
// documented one (docs/getting-started.md): logger and metrics, machine,
// boot source, drives, devices, then InstanceStart; the drives' order
// makes root /dev/vda, code /dev/vdb and scratch /dev/vdc.
func (i *instance) configure(ctx context.Context, spec driver.Spec, f vmFiles, spare bool) error {
	d := i.d
	boot := bootConfig{ID: spec.ID, AgentCPU: d.host.AgentCPU(), Spare: spare}
	var nic *networkInterface
	switch {
	case i.vnet != nil:
		nic = &networkInterface{IfaceID: "eth0", HostDevName: network.TapName, GuestMAC: network.GuestMAC()}
		boot.IP = network.KernelIP(network.KernelDNS(i.vnet.DNS))
		i.nic = true
	case spec.Network && d.opts.TapName != "":
		nic = &networkInterface{IfaceID: "eth0", HostDevName: slotString(d.opts.TapName, i.Slot()), GuestMAC: guestMAC(i.Slot())}
		boot.IP = slotString(d.opts.GuestIP, i.Slot())
		i.nic = true
	}
	steps := []struct {
		what string
		do   func() error
	}{
		{"logger and metrics", func() error { return i.configureObservers(ctx) }},
		{"machine config", func() error {
			i.vcpus = d.host.VCPUs(spec.MemoryMB)
			return i.api.putMachineConfig(ctx, machineConfig{VCPUCount: i.vcpus, MemSizeMiB: spec.MemoryMB})
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

// waitSpare connects to the guest's init like waitReady and waits for a
// spare's line.
func (i *instance) waitSpare(ctx context.Context) error {
	return i.AwaitSpare(ctx, "connecting to the guest agent", func(ctx context.Context) (net.Conn, error) {
		return connectGuest(ctx, filepath.Join(i.root, vsockSock), agentVsockPort)
	})
}

// Ask asks the VM to end: Ctrl-Alt-Del through the API (a guest with an
// i8042 driver reboots, which ends Firecracker; ours has none and ends
// itself when its stream closes, which Stop did before asking), then, if
// Firecracker is still running after grace, SIGTERM; see vmm.Machine.
// A VM paused for a snapshot gets SIGTERM at once: its guest runs no more.
// The driver's stop grace is split in two (see newDriver): grace for the
// guest after Ctrl-Alt-Del, grace for Firecracker after SIGTERM.
func (i *instance) Ask(ctx context.Context, grace time.Duration) {
	select {
	case <-i.Done():
		return
	default:
	}
	if i.paused.Load() {
		_ = i.Cmd().Process.Signal(syscall.SIGTERM)
		return
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

// Release closes the API client, reads what Firecracker's logger and
// metrics said last and removes the jail's cgroups (killing what is left
// in them); see vmm.Machine.
func (i *instance) Release(ctx context.Context) error {
	if i.api != nil {
		i.api.Close()
	}
	// The cgroups first: removing them kills a Firecracker that survived,
	// which lets its pipes end.
	err := removeCgroups(context.WithoutCancel(ctx), i.cgroups)
	i.stopObserving()
	if i.vnet != nil {
		// Firecracker is gone: the namespace goes with this descriptor,
		// and with it the persistent tap.
		err = errors.Join(err, i.vnet.Close())
		i.vnet = nil
	}
	return err
}

// connect makes the VM's network (Options.Network) when it has one: a
// fresh VM whose spec asks for it, a restored one whose snapshot had it.
// Firecracker opens its tap by name, so it starts in the namespace: the
// jailer joins it (--netns), else the driver's fork thread does.
func (i *instance) connect(ctx context.Context, spec driver.Spec, uid, gid int) error {
	mgr := i.d.opts.Network
	want := spec.Network
	if i.from != nil {
		want = i.from.meta.Network
	}
	if !want || mgr == nil {
		return nil
	}
	// Persistent: Firecracker opens the tap itself, after the driver has
	// let go of its descriptor; the tap goes with the namespace.
	v, err := mgr.NewVMNet(ctx, network.TapOptions{Persistent: true, Owner: uid, Group: gid})
	if err != nil {
		return fmt.Errorf("connecting the vm's network: %w", err)
	}
	i.vnet = v
	if i.jail != nil {
		i.jail.NetNS = v.NSPath()
	} else {
		i.StartInNetNS(v.NSFD())
	}
	return nil
}
