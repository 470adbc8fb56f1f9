// Package firecracker is the Firecracker driver: each instance is one
// firecracker process (optionally started through Firecracker's jailer)
// booting the guest kernel of package guest with the runtime's root image
// (/dev/vda, read-only), the function's code image (/dev/vdb, read-only)
// and a scratch disk for /tmp (/dev/vdc, writable, sized by EphemeralMB,
// deleted with the instance). The guest's init is the agent (package
// vminit), which listens on a vsock port (invokex.vsock); the driver
// reaches it through Firecracker's hybrid vsock: the unix socket
// Firecracker serves, "CONNECT <port>", "OK <n>", then the guest's ready
// line and the framed protocol, as with the qemu driver.
//
// The driver configures Firecracker over its API socket with a small
// client of its own (api.go): machine config, boot source, three drives,
// the vsock device, an entropy device, a network interface when asked
// for, then InstanceStart. Firecracker runs only under KVM.
//
// What every microVM driver shares is package vmm's: the images (the
// qemu driver's, cached under the same keys, built at deploy by Prepare),
// the runtimes they provide (DetectRuntimes), records, the console log and
// the start, stop and recovery sequences. This package has Firecracker's
// own: its API client, the jailer and its cgroups, and the hybrid vsock.
//
// # Files and privileges
//
// StateDir/<id>/ (mode 0700, the driver's) holds instance.json (written
// before Firecracker starts: its pid and start time once known). Without
// the jailer it is Firecracker's working directory and holds its API
// socket (firecracker.sock), the vsock socket (vsock.sock), scratch.ext4
// and symbolic links vmlinux, root.ext4 and code.ext4 to the images;
// Firecracker is given these paths relative to it, so the paths a
// snapshot records resolve to a restored VM's own files (snapshot.go).
// Firecracker runs as the driver's user with an empty
// environment. With Options.JailerPath the jailer builds a chroot at
// StateDir/<id>/jail/<firecracker's file name>/<id>/root holding the
// kernel, root and code images (hard links into the image cache, copies
// when it is on another file system), the scratch disk and the sockets;
// it puts the VMM in cgroups of its own (memory and pids limits), joins
// Options.NetNS if set, and runs it as a user of its own (uid and gid
// Options.UIDBase+n). The console (Firecracker's stdout) is a pipe drained
// into the harness's log under a byte budget, never a file.
//
// # Recovery
//
// Recover kills every Firecracker a previous harness left running on the
// same StateDir (by its recorded pid and start time, by its command line,
// and, jailed, by its cgroups) and removes its cgroups and directory. It
// re-adopts nothing, like the qemu driver.
package firecracker

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/network"
	"github.com/invokex/invokex/internal/runtimes"
)

var (
	_ driver.Driver    = (*Driver)(nil)
	_ driver.Closer    = (*Driver)(nil)
	_ driver.Describer = (*Driver)(nil)
	_ driver.Preparer  = (*Driver)(nil)

	_ driver.RuntimeDetector = (*Driver)(nil)
)

// Timeouts of the driver's own steps. They bound cleanup even when the
// caller's context has no deadline.
const (
	defaultStopGrace = 2 * time.Second
	// A KVM boot of the guest takes a fraction of a second; the rest is
	// room for a busy host.
	defaultReadyTimeout = 10 * time.Second
	// actionTimeout bounds the Ctrl-Alt-Del request of Stop.
	actionTimeout = time.Second
)

// DefaultSpareVMs is Options.SpareVMs's default.
const DefaultSpareVMs = 1

// Options configures New.
type Options struct {
	// StateDir holds one directory per instance; required. Recover
	// cleans up what it finds there.
	StateDir string
	// CacheDir is package guest's cache (kernel, root and code images);
	// default guest.DefaultCacheDir().
	CacheDir string
	// FirecrackerPath is the firecracker binary; default: looked up in
	// PATH. With the jailer its file name must contain "firecracker".
	FirecrackerPath string
	// JailerPath, if set, starts every VM through Firecracker's jailer
	// (same version as FirecrackerPath): chroot, cgroups, a user per VM.
	// Needs root.
	JailerPath string
	// KernelPath is the guest kernel (the ELF vmlinux); default the one
	// `invokex guest kernel` built into CacheDir.
	KernelPath string
	// AgentBin is the statically linked invokex binary that becomes the
	// guest's /sbin/init; default this executable.
	AgentBin string
	// Logger receives the driver's and the guests' diagnostics; default
	// slog.Default().
	Logger *slog.Logger
	// StopGrace bounds the graceful part of Stop; default 2 s.
	StopGrace time.Duration
	// ReadyTimeout bounds a boot, from Firecracker's start to the agent's
	// ready line; default 10 s.
	ReadyTimeout time.Duration
	// SpareVMs is how many VMs the driver keeps booted ahead of need, as
	// the qemu driver does (see qemu.Options.SpareVMs): a cold start that
	// finds one has Firecracker switch its code drive to the instance's
	// image (PATCH /drives) and skips the boot. 0: DefaultSpareVMs;
	// negative: none.
	SpareVMs int
	// UIDBase is the first uid (and gid) of the jailed VMs' users;
	// default 1<<30 plus a multiple of 4096 derived from StateDir, as the
	// qemu driver does. A driver runs at most 4096 VMs.
	UIDBase int
	// CgroupParent is the jailer's --parent-cgroup, under which each VM
	// gets a cgroup named after its ID; default "invokex-firecracker".
	CgroupParent string
	// NetNS is a network namespace (e.g. /var/run/netns/invokex) the
	// jailer puts every VM's Firecracker in. Jailer only.
	NetNS string
	// TapName, if set, gives VMs whose Spec.Network is true a network
	// interface (eth0) backed by the host tap device of that name, in
	// which "{slot}" is replaced by the VM's slot (0 to 4095, unique among
	// the driver's running VMs), e.g. "fc{slot}". The operator creates
	// the taps (in NetNS when set) and their routing or NAT; the driver
	// only attaches them. Without it Spec.Network is ignored.
	TapName string
	// GuestIP is the value of the guest kernel's ip= parameter for such a
	// VM, with "{slot}" replaced as in TapName, e.g.
	// "172.16.{slot}.2::172.16.{slot}.1:255.255.255.0::eth0:off".
	GuestIP string
	// Network, instead of TapName and NetNS, has the driver make each
	// such VM's network itself (package network): a namespace of the VM's
	// own with a tap (owned by the jailed user) and a link to the outside,
	// Firecracker started in it. Such VMs can be snapshotted: every guest
	// has the same address. The caller owns it and closes it after the
	// driver.
	Network *network.Manager
}

// Driver is the Firecracker driver. See package driver for the contract.
type Driver struct {
	opts    Options
	log     *slog.Logger
	host    *vmm.Host[*instance]
	cgroups cgroupSetup

	mu          sync.Mutex // guards warnedNetwk and warnedCopy
	warnedNetwk bool
	warnedCopy  bool

	// stats sums the VMs' metrics records (Collect).
	stats hostMetrics
}

// New checks Firecracker (and the jailer), the kernel and the agent binary
// and prepares the state directory. It fails with ErrUnavailable when
// /dev/kvm cannot be opened: Firecracker has no software emulation.
func New(opts Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errdefs.Invalid("firecracker driver: state directory is required")
	}
	g, err := vmm.ResolveGuest("firecracker", vmm.GuestFiles{CacheDir: opts.CacheDir, KernelPath: opts.KernelPath, AgentBin: opts.AgentBin})
	if err != nil {
		return nil, err
	}
	opts.CacheDir, opts.KernelPath, opts.AgentBin = g.CacheDir, g.KernelPath, g.AgentBin
	if err := vmm.OpenKVM(); err != nil {
		return nil, fmt.Errorf("firecracker driver: firecracker needs KVM: %w: %w", err, errdefs.ErrUnavailable)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	images := vmm.NewGuestImages(opts.CacheDir, opts.AgentBin, opts.Logger.With("driver", "firecracker"))
	d, err := newDriver(opts, images)
	if err != nil {
		images.Close()
		return nil, err
	}
	return d, nil
}

// newDriver is New without package guest and the KVM check: unit tests
// pass their own images and run a stand-in for Firecracker.
func newDriver(opts Options, images vmm.Images) (*Driver, error) {
	dir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("firecracker driver: resolving state directory: %w", err)
	}
	opts.StateDir = dir
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.FirecrackerPath == "" {
		p, err := exec.LookPath("firecracker")
		if err != nil {
			return nil, fmt.Errorf("firecracker driver: firecracker not found in PATH: %w", errdefs.ErrUnavailable)
		}
		opts.FirecrackerPath = p
	}
	if opts.FirecrackerPath, err = vmm.ResolveBinary("firecracker", opts.FirecrackerPath, "firecracker"); err != nil {
		return nil, err
	}
	if opts.JailerPath != "" {
		if opts.JailerPath, err = vmm.ResolveBinary("firecracker", opts.JailerPath, "jailer"); err != nil {
			return nil, err
		}
		if !strings.Contains(filepath.Base(opts.FirecrackerPath), "firecracker") {
			return nil, fmt.Errorf("firecracker driver: the jailer runs only a binary whose name contains \"firecracker\", not %s: %w",
				opts.FirecrackerPath, errdefs.ErrInvalidParameter)
		}
		if os.Geteuid() != 0 {
			return nil, fmt.Errorf("firecracker driver: the jailer needs root: %w", errdefs.ErrUnavailable)
		}
	} else if opts.NetNS != "" {
		return nil, fmt.Errorf("firecracker driver: NetNS needs the jailer: %w", errdefs.ErrInvalidParameter)
	}
	if opts.Network != nil && (opts.TapName != "" || opts.NetNS != "") {
		return nil, fmt.Errorf("firecracker driver: Network makes the VMs' namespaces and taps; TapName and NetNS are for taps made by the operator: %w", errdefs.ErrInvalidParameter)
	}
	if err := vmm.CheckKernel("firecracker", opts.KernelPath); err != nil {
		return nil, err
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = defaultStopGrace
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = defaultReadyTimeout
	}
	if opts.SpareVMs == 0 {
		opts.SpareVMs = DefaultSpareVMs
	}
	if opts.CgroupParent == "" {
		opts.CgroupParent = "invokex-firecracker"
	}
	if opts.UIDBase <= 0 {
		opts.UIDBase = vmm.DefaultUIDBase(opts.StateDir)
	}
	log := opts.Logger.With("driver", "firecracker")
	host, err := vmm.NewHost[*instance](vmm.Config{
		Name: "firecracker", StateDir: dir, CacheDir: opts.CacheDir, Images: images, Log: log,
		// Half the grace for the guest after Ctrl-Alt-Del, half for
		// Firecracker after SIGTERM (see instance.Ask).
		StopGrace: opts.StopGrace / 2,
		ExitWait:  100 * time.Millisecond,
		Spares:    opts.SpareVMs,
	})
	if err != nil {
		return nil, err
	}
	d := &Driver{opts: opts, log: log, host: host}
	if opts.JailerPath != "" {
		d.cgroups = detectCgroups("/proc/mounts")
		if d.cgroups.Version == 0 {
			d.log.Warn("jailed vms get no cgroup limits", "reason", d.cgroups.why)
		}
	} else if os.Geteuid() == 0 {
		d.log.Warn("firecracker runs as root: set a jailer for a chroot and a user per vm")
	}
	return d, nil
}

// Name returns "firecracker".
func (d *Driver) Name() string { return "firecracker" }

// Describe lists how the VMs on this host are weaker than intended.
func (d *Driver) Describe() []string {
	var s []string
	if d.opts.JailerPath == "" {
		s = append(s, "no jailer: firecracker runs as the harness's user without chroot or cgroups")
	} else if d.cgroups.Version == 0 {
		s = append(s, "jailed vms have no cgroup limits: "+d.cgroups.why)
	}
	if d.opts.TapName == "" && d.opts.Network == nil {
		s = append(s, "no guest network: Spec.Network is ignored (no TapName configured) and VMs have loopback only")
	}
	return s
}

// Start builds the instance's disks, boots its VM and waits until the
// agent inside is ready.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Instance, error) {
	return d.host.Start(ctx, spec, d.newInstance)
}

// DetectRuntimes reports the runtimes this driver's images provide (the
// qemu driver's: the same images); see guest.DetectRuntimes.
func (d *Driver) DetectRuntimes(ctx context.Context) []*runtimes.Runtime {
	return d.host.DetectRuntimes(ctx)
}

// Prepare builds (or finds cached) the root image of spec's runtime and
// the code image of its revision, the two disks Start would otherwise
// build on a cold start; see driver.Preparer.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) error {
	return d.host.Prepare(ctx, spec)
}

// warnOnce logs msg the first time *flag is seen false.
func (d *Driver) warnOnce(flag *bool, msg string, args ...any) {
	d.mu.Lock()
	first := !*flag
	*flag = true
	d.mu.Unlock()
	if first {
		d.log.Warn(msg, args...)
	}
}

// Stop destroys the instance; see driver.Driver. Unknown IDs are nil.
func (d *Driver) Stop(ctx context.Context, id string) error {
	return d.host.Stop(ctx, id)
}

// Recover kills every Firecracker a previous driver on the same StateDir
// left running (by its recorded pid and start time, else by its command
// line, and everything in its recorded cgroups; never a process that is
// not that instance's VMM, even if a recycled pid says so), removes its
// cgroups and its instance directory. It re-adopts nothing and always
// returns an empty slice.
func (d *Driver) Recover(ctx context.Context) ([]driver.Instance, error) {
	return d.host.Recover(ctx, d.killLeftover)
}

// killLeftover kills the Firecracker of instance id, whose directory is
// dir, and removes its cgroups.
func (d *Driver) killLeftover(ctx context.Context, id, dir string) error {
	rec := vmm.ReadLeftoverRecord[record](d.log, id, dir)
	fcPath, jailerPath := d.opts.FirecrackerPath, d.opts.JailerPath
	var cgroups []string
	var base *vmm.Record
	if rec != nil {
		base = &rec.Record
		if rec.Firecracker != "" {
			fcPath, jailerPath = rec.Firecracker, rec.Jailer
		}
		cgroups = rec.Cgroups
	}
	// A jailed VMM loses Pdeathsig when the jailer drops to its user, so
	// one whose pid was never recorded is found by its command line too.
	name := id // the --id the VMM was launched with
	if rec != nil {
		name = rec.MachineName()
	}
	isOurs := func(pid int) bool { return isOurVMM(pid, fcPath, jailerPath, name) }
	if err := vmm.KillLeftover(ctx, d.log, id, base, isOurs); err != nil {
		return err
	}
	return removeCgroups(ctx, cgroups)
}

// Close stops every instance; Start fails with ErrUnavailable afterwards.
// Close is idempotent.
func (d *Driver) Close(ctx context.Context) error {
	return d.host.Close(ctx)
}
