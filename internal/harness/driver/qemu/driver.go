// Package qemu is the QEMU microvm driver: each instance is one
// qemu-system-x86_64 process running a "microvm" machine with the guest
// kernel of package guest, the runtime's root image (/dev/vda, read-only),
// the function's code image (/dev/vdb, read-only) and a scratch disk for
// /tmp (/dev/vdc, writable, sized by EphemeralMB, deleted with the
// instance). The guest's init is the agent (package vminit): it talks to
// the harness over a virtio-serial port whose host end is a unix socket
// QEMU serves in the instance directory. A second socket carries QMP, the
// driver's control channel.
//
// KVM is used when /dev/kvm runs a standard guest (probed once per
// process, vmm.ProbeKVM), TCG software emulation otherwise; Describe says
// which.
//
// What every microVM driver shares (images and their code keys, records,
// the console log, the start, stop and recovery sequences, Prepare and
// DetectRuntimes) is package vmm's; this package has QEMU's own: its
// command line, QMP, the virtio-serial agent socket and the VM users.
//
// # Files and privileges
//
// StateDir/<id>/ (mode 0700, the driver's) holds instance.json (written
// before QEMU starts: its pid and start time once known), agent.sock and
// qmp.sock (listening sockets the driver binds and QEMU serves) and
// scratch.img. QEMU is given descriptors, never paths: the sockets, the
// kernel and the three disks are inherited, and it runs in / with an empty
// environment. A driver running as root runs each VM's QEMU as a user of
// its own (Options.UIDBase), which owns only its scratch disk, under
// QEMU's seccomp sandbox (-sandbox on, no privilege gain, no spawning).
// The console is a pipe drained into the harness's log under a byte
// budget, never a file.
//
// # Spares and templates
//
// Spare VMs (vmm.SpareMachine) wait for cold starts with a placeholder
// code disk. The first spare of a shape is booted as a template and
// snapshotted; later spares, and cold starts that find no spare, are
// restored from it and renewed (template.go). StateDir/template-*/ are
// the templates (the driver's own: Close removes them).
//
// # Network
//
// A VM has loopback only unless Spec.Network is set; then it gets a
// virtio-net NIC, configured by the kernel (ip=) before init runs. With
// Options.Network (package network) the NIC's backend is a tap in a
// network namespace of the VM's own, linked to the host, which forwards
// and masquerades its traffic to the internet and keeps it from the host,
// private networks and other VMs; the namespace (tap and link) goes when
// QEMU exits. Every guest has the same address (network.GuestAddr), so a
// snapshot's guest keeps working when restored into a new namespace.
// Without Options.Network the backend is QEMU's user-mode network (slirp):
// connections leave as QEMU's own, which can reach the host's loopback
// services through the gateway address.
//
// # Recovery
//
// Recover kills every QEMU a previous harness left running on the same
// StateDir and removes its directory. Re-adopting a running VM would be
// possible (QEMU is the server of the agent socket, so a new harness could
// connect to it), but the harness cannot use re-adopted instances yet (it
// stops them all), so the driver does not pretend to: it kills and removes.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

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
	// Booting under TCG takes about a second, several when the host is
	// busy with other VMs; KVM boots in a fraction of that.
	defaultReadyTimeoutTCG = 30 * time.Second
	defaultReadyTimeoutKVM = 10 * time.Second
	// qmpQuitTimeout bounds the graceful QMP quit before SIGTERM.
	qmpQuitTimeout = time.Second
)

// Options configures New.
type Options struct {
	// StateDir holds one directory per instance; required. Recover
	// cleans up what it finds there.
	StateDir string
	// CacheDir is package guest's cache (kernel, root and code images);
	// default guest.DefaultCacheDir().
	CacheDir string
	// QEMUPath is qemu-system-x86_64; default: looked up in PATH.
	QEMUPath string
	// KernelPath is the guest kernel (an uncompressed vmlinux); default
	// the one `invokex guest kernel` built into CacheDir.
	KernelPath string
	// AgentBin is the statically linked invokex binary that becomes the
	// guest's /sbin/init; default this executable.
	AgentBin string
	// Accel is "auto" (default: KVM if it runs a guest here, else TCG),
	// "kvm" (New fails without it) or "tcg".
	Accel string
	// Logger receives the driver's and the guests' diagnostics; default
	// slog.Default().
	Logger *slog.Logger
	// StopGrace bounds the graceful part of Stop; default 2 s.
	StopGrace time.Duration
	// ReadyTimeout bounds a boot, from QEMU's start to the agent's ready
	// line; default 30 s under TCG, 10 s with KVM.
	ReadyTimeout time.Duration
	// KeepUser runs QEMU as the driver's own user. By default a driver
	// running as root runs each VM's QEMU as a user of its own (uid and
	// gid UIDBase+n, no other groups), so a guest that escaped into QEMU
	// holds no privilege on the host and cannot reach other VMs.
	KeepUser bool
	// UIDBase is the first uid of the VMs' users; default 1<<30 plus a
	// multiple of 4096 derived from StateDir (drivers with different state
	// directories use different uids). A driver runs at most 4096 VMs.
	UIDBase int
	// SpareVMs is how many VMs the driver keeps booted ahead of need, for
	// the shapes (runtime, memory, /tmp size, network) cold starts asked
	// for last: a cold start that finds one swaps in its code and skips
	// the boot (see vmm.SpareMachine). 0: DefaultSpareVMs; negative: none.
	SpareVMs int
	// BootSpares boots every spare VM instead of restoring spares from a
	// snapshot of the first one booted for their shape (a template; see
	// template.go).
	BootSpares bool
	// TCGCacheMB is the size of QEMU's cache of translated code, under TCG
	// only: memory of every VM traded for speed (see DefaultTCGCacheMB).
	// 0: DefaultTCGCacheMB.
	TCGCacheMB int
	// Network, if set, gives a VM whose Spec.Network is true a network
	// namespace of its own with a tap for its NIC and a link to the
	// outside (package network: the internet, not the host). Without it
	// such a VM's NIC is on QEMU's user-mode network, whose connections
	// are QEMU's own and reach the host's services (Describe says so).
	// The caller owns it and closes it after the driver.
	Network *network.Manager
}

// DefaultTCGCacheMB is Options.TCGCacheMB's default. Under TCG every
// guest instruction runs as host code QEMU translated, once, into this
// cache; when it is full QEMU empties it and translates again whatever
// runs next. It costs host memory as it fills: a VM holds what it
// translated, up to this size. Measured here (QEMU 7.2, a Go function): a
// boot translates ~33 MB of host code, a cold start's INIT and first
// invocation ~28 MB (50 k blocks), a warm invocation's working set is
// ~17 MB. At 16 MiB a cold start emptied the cache mid-way and translated
// 88 k blocks, and warm invocations emptied it every few hundred calls; in
// alternating runs 24 and 32 MiB cut INIT from ~1.1 s to ~0.75 s alike,
// and 24 costs 8 MiB less of every booted VM. A VM restored from a spare
// template gets twice this (templateCacheMB): it translates no boot. QEMU's
// own default (1 GiB) would keep all code a VM ever ran.
const DefaultTCGCacheMB = 24

// DefaultSpareVMs is Options.SpareVMs's default: one spare, of the shape
// asked for last. Each costs what an idle VM costs the host.
const DefaultSpareVMs = 1

// Driver is the QEMU microvm driver. See package driver for the contract.
type Driver struct {
	opts     Options
	log      *slog.Logger
	accel    accel
	why      string // why this accel
	host     *vmm.Host[*instance]
	tscKHz   int64
	kernelHz int

	// vmGroups are the supplementary groups of the VMs' users (the group
	// of /dev/kvm under KVM); asRoot says why VMs keep the driver's user.
	vmGroups []uint32
	asRoot   string
	// sharedNet is set once a VM had a network on QEMU's user-mode
	// network (no Options.Network): warned once, then in Describe.
	sharedNet atomic.Bool
	// templates are the spare templates; nil with BootSpares or no spares.
	templates *templates
}

// New checks QEMU, the kernel and the agent binary, chooses the
// accelerator (logged once) and prepares the state directory.
func New(opts Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errdefs.Invalid("qemu driver: state directory is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	g, err := vmm.ResolveGuest("qemu", vmm.GuestFiles{CacheDir: opts.CacheDir, KernelPath: opts.KernelPath, AgentBin: opts.AgentBin})
	if err != nil {
		return nil, err
	}
	opts.CacheDir, opts.KernelPath, opts.AgentBin = g.CacheDir, g.KernelPath, g.AgentBin
	images := vmm.NewGuestImages(opts.CacheDir, opts.AgentBin, opts.Logger.With("driver", "qemu"))
	d, err := newDriver(opts, images)
	if err != nil {
		images.Close()
		return nil, err
	}
	return d, nil
}

// newDriver is New without the guest package: unit tests pass their own
// images.
func newDriver(opts Options, images vmm.Images) (*Driver, error) {
	if opts.TCGCacheMB < 0 {
		return nil, errdefs.Invalid("qemu driver: TCGCacheMB is %d, not a size", opts.TCGCacheMB)
	}
	dir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("qemu driver: resolving state directory: %w", err)
	}
	opts.StateDir = dir
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.QEMUPath == "" {
		p, err := exec.LookPath("qemu-system-x86_64")
		if err != nil {
			return nil, fmt.Errorf("qemu driver: qemu-system-x86_64 not found (install qemu-system-x86): %w", errdefs.ErrUnavailable)
		}
		opts.QEMUPath = p
	}
	if opts.QEMUPath, err = vmm.ResolveBinary("qemu", opts.QEMUPath, "qemu"); err != nil {
		return nil, err
	}
	if err := vmm.CheckKernel("qemu", opts.KernelPath); err != nil {
		return nil, err
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = defaultStopGrace
	}
	if opts.SpareVMs == 0 {
		opts.SpareVMs = DefaultSpareVMs
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*vmm.KVMProbeTimeout)
	acc, why, err := chooseAccel(ctx, opts.Accel, opts.QEMUPath)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("qemu driver: %w", err)
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = defaultReadyTimeoutTCG
		if acc == accelKVM {
			opts.ReadyTimeout = defaultReadyTimeoutKVM
		}
	}
	log := opts.Logger.With("driver", "qemu")
	host, err := vmm.NewHost[*instance](vmm.Config{
		Name: "qemu", StateDir: dir, CacheDir: opts.CacheDir, Images: images, Log: log,
		StopGrace: opts.StopGrace,
		// QEMU under TCG may take a while to print why it is exiting.
		ExitWait: time.Second,
		Spares:   opts.SpareVMs,
	})
	if err != nil {
		return nil, err
	}
	d := &Driver{
		opts:     opts,
		log:      log,
		accel:    acc,
		why:      why,
		host:     host,
		tscKHz:   hostTSCkHz(),
		kernelHz: kernelHzOf(opts.KernelPath),
	}
	d.setUsers()
	if opts.SpareVMs > 0 && !opts.BootSpares {
		d.templates = newTemplates(d)
	}
	if acc == accelTCG {
		d.log.Warn("qemu driver uses TCG software emulation", "reason", why)
	} else {
		d.log.Info("qemu driver uses KVM")
	}
	return d, nil
}

// setUsers decides whether VMs run as users of their own.
func (d *Driver) setUsers() {
	switch {
	case d.opts.KeepUser:
		d.asRoot = "KeepUser set"
	case os.Geteuid() != 0:
		d.asRoot = "not root"
	case d.accel == accelKVM:
		// QEMU opens /dev/kvm itself: its user needs the device's group.
		var st unix.Stat_t
		if err := unix.Stat("/dev/kvm", &st); err != nil || st.Mode&0o060 != 0o060 || st.Gid == 0 {
			d.asRoot = "/dev/kvm is not read-write for a group (e.g. kvm) the vm users could join"
			break
		}
		d.vmGroups = []uint32{st.Gid}
	}
	if d.opts.UIDBase <= 0 {
		d.opts.UIDBase = vmm.DefaultUIDBase(d.opts.StateDir)
	}
	if d.asRoot != "" && !d.opts.KeepUser && os.Geteuid() == 0 {
		d.log.Warn("qemu runs as root", "reason", d.asRoot)
	}
}

// Name returns "qemu".
func (d *Driver) Name() string { return "qemu" }

var _ driver.Emulator = (*Driver)(nil)

// Emulated reports whether VMs run under TCG; see driver.Emulator.
func (d *Driver) Emulated() bool { return d.accel == accelTCG }

// Describe lists how the VMs on this host are weaker or slower than
// intended.
func (d *Driver) Describe() []string {
	var s []string
	switch {
	case d.accel == accelTCG && d.opts.Accel == "tcg":
		s = append(s, "TCG software emulation (requested): ~10x slower than KVM")
	case d.accel == accelTCG:
		s = append(s, "TCG software emulation (no usable KVM: "+d.why+"): ~10x slower")
	}
	if d.asRoot != "" && os.Geteuid() == 0 {
		s = append(s, "qemu runs as root, not as a user per vm: "+d.asRoot)
	}
	if d.sharedNet.Load() {
		s = append(s, sharedNetNote)
	}
	return s
}

// sharedNetNote says what a VM's network is without Options.Network.
const sharedNetNote = "vms with a network use qemu's user-mode network: they reach the host's services, this server's API included"

// Start builds the instance's disks, boots its VM and waits until the
// agent inside is ready.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Instance, error) {
	inst, err := d.host.Start(ctx, spec, d.newInstance)
	if errors.Is(err, errFromTemplate) && ctx.Err() == nil {
		// The failed VM is gone (and the template dropped): boot one.
		d.log.Warn("restoring a vm from its spare template failed; booting it", "instance", spec.ID, "err", err)
		return d.host.StartFresh(ctx, spec, func(base *vmm.Instance) *instance {
			i := d.newInstance(base)
			i.noTemplate = true
			return i
		})
	}
	return inst, err
}

// DetectRuntimes reports the runtimes this driver's images provide; see
// guest.DetectRuntimes.
func (d *Driver) DetectRuntimes(ctx context.Context) []*runtimes.Runtime {
	return d.host.DetectRuntimes(ctx)
}

// Prepare builds (or finds cached) the root image of spec's runtime and
// the code image of its revision, the two disks Start would otherwise
// build on a cold start; see driver.Preparer.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) error {
	return d.host.Prepare(ctx, spec)
}

// Stop destroys the instance; see driver.Driver. Unknown IDs are nil.
func (d *Driver) Stop(ctx context.Context, id string) error {
	return d.host.Stop(ctx, id)
}

// Recover kills every QEMU a previous driver on the same StateDir left
// running (identified by its recorded pid and start time, or, if it
// crashed before recording them, by QEMU's command line; in both cases
// only a process running QEMUPath with the instance's -name, so a
// recycled pid is never hit) and removes the instance directories. It
// re-adopts nothing (see the package documentation) and always returns
// an empty slice.
func (d *Driver) Recover(ctx context.Context) ([]driver.Instance, error) {
	return d.host.Recover(ctx, d.killLeftover)
}

// killLeftover kills the QEMU of instance id, whose directory is dir.
func (d *Driver) killLeftover(ctx context.Context, id, dir string) error {
	rec := vmm.ReadLeftoverRecord[record](d.log, id, dir)
	qemuPath := d.opts.QEMUPath
	var base *vmm.Record
	name := id // the name QEMU was launched with
	if rec != nil {
		base = &rec.Record
		if rec.QEMU != "" {
			qemuPath = rec.QEMU
		}
		name = rec.MachineName()
	}
	return vmm.KillLeftover(ctx, d.log, id, base, func(pid int) bool { return isOurQEMU(pid, qemuPath, name) })
}

// Close stops every instance; Start fails with ErrUnavailable afterwards.
// Close is idempotent.
func (d *Driver) Close(ctx context.Context) error {
	err := d.host.Close(ctx)
	if d.templates != nil {
		d.templates.close()
	}
	return err
}
