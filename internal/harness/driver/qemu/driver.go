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
// process), TCG software emulation otherwise; Describe says which.
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
// # Network
//
// A VM has loopback only unless Spec.Network is set; then it gets a
// virtio-net NIC on QEMU's user-mode network (slirp), configured by the
// kernel (ip=) before init runs. Its connections leave as connections of
// its QEMU process (so, like the process sandbox with Network, they can
// reach the host's loopback services through the gateway address);
// nothing can connect into the VM and VMs cannot reach each other. Slirp
// costs CPU per packet; a tap-and-bridge setup would be faster but needs
// host network configuration the driver does not make.
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
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
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
}

// vmSlots is how many VMs (and so uids) one driver can have at a time.
const vmSlots = 4096

// imageMaker builds the disks of an instance (package guest in
// production, fakes in unit tests). Implementations are safe for
// concurrent use and cache what they can.
type imageMaker interface {
	// Root returns the root image of rt (shared, never written).
	Root(ctx context.Context, rt *runtimes.Runtime) (string, error)
	// Code returns the image of codeDir and runtimeDir, cached by key.
	Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error)
	// Scratch creates an empty writable file system of sizeMB at path.
	Scratch(ctx context.Context, path string, sizeMB int) error
}

// Driver is the QEMU microvm driver. See package driver for the contract.
type Driver struct {
	opts     Options
	log      *slog.Logger
	accel    accel
	why      string // why this accel
	images   imageMaker
	fork     *hostproc.Forker
	hostCPUs int
	tscKHz   int64
	kernelHz int

	// vmGroups are the supplementary groups of the VMs' users (the group
	// of /dev/kvm under KVM); asRoot says why VMs keep the driver's user.
	vmGroups []uint32
	asRoot   string

	instances hostproc.Table[*instance]

	mu    sync.Mutex   // guards slots
	slots map[int]bool // uid slots in use
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
	if opts.CacheDir == "" {
		opts.CacheDir = defaultCacheDir()
	}
	if opts.KernelPath == "" {
		k, ok := defaultKernel(opts.CacheDir)
		if !ok {
			return nil, fmt.Errorf("qemu driver: no guest kernel in %s: run `invokex guest kernel`: %w",
				opts.CacheDir, errdefs.ErrUnavailable)
		}
		opts.KernelPath = k
	}
	if opts.AgentBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("qemu driver: finding own executable: %w", err)
		}
		opts.AgentBin = exe
	}
	if err := guest.CheckStatic(opts.AgentBin); err != nil {
		return nil, fmt.Errorf("qemu driver: agent binary: %w", err)
	}
	d, err := newDriver(opts, nil)
	if err != nil {
		return nil, err
	}
	d.images = newGuestImages(opts.CacheDir, opts.AgentBin, d.log)
	return d, nil
}

// newDriver is New without the guest package: unit tests pass their own
// imageMaker.
func newDriver(opts Options, images imageMaker) (*Driver, error) {
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
	if p, err := filepath.Abs(opts.QEMUPath); err == nil {
		opts.QEMUPath = p
	}
	if fi, err := os.Stat(opts.QEMUPath); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("qemu driver: %s is not a qemu binary: %w", opts.QEMUPath, errdefs.ErrUnavailable)
	}
	if fi, err := os.Stat(opts.KernelPath); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("qemu driver: guest kernel %s missing: run `invokex guest kernel`: %w", opts.KernelPath, errdefs.ErrUnavailable)
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = defaultStopGrace
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("qemu driver: creating state directory: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*kvmProbeTimeout)
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
	d := &Driver{
		opts:     opts,
		log:      opts.Logger.With("driver", "qemu"),
		accel:    acc,
		why:      why,
		images:   images,
		fork:     hostproc.NewForker(),
		hostCPUs: runtime.NumCPU(),
		tscKHz:   hostTSCkHz(),
		kernelHz: kernelHzOf(opts.KernelPath),
		slots:    map[int]bool{},
	}
	d.setUsers()
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
		sum := sha256.Sum256([]byte(d.opts.StateDir))
		d.opts.UIDBase = 1<<30 + int(binary.BigEndian.Uint16(sum[:2])%4096)*vmSlots
	}
	if d.asRoot != "" && !d.opts.KeepUser && os.Geteuid() == 0 {
		d.log.Warn("qemu runs as root", "reason", d.asRoot)
	}
}

// takeUID reserves a uid for a new VM (0: the driver's own user).
func (d *Driver) takeUID() (int, error) {
	if d.asRoot != "" {
		return 0, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for n := range vmSlots {
		if !d.slots[n] {
			d.slots[n] = true
			return d.opts.UIDBase + n, nil
		}
	}
	return 0, fmt.Errorf("all %d vm users in use: %w", vmSlots, errdefs.ErrUnavailable)
}

// releaseUID frees what takeUID reserved.
func (d *Driver) releaseUID(uid int) {
	if uid != 0 {
		d.mu.Lock()
		delete(d.slots, uid-d.opts.UIDBase)
		d.mu.Unlock()
	}
}

// Name returns "qemu".
func (d *Driver) Name() string { return "qemu" }

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
	return s
}

// Start builds the instance's disks, boots its VM and waits until the
// agent inside is ready.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Instance, error) {
	if err := validate(spec); err != nil {
		return nil, err
	}
	startCtx, cancel := context.WithCancel(ctx)
	inst := &instance{
		d:           d,
		id:          spec.ID,
		dir:         filepath.Join(d.opts.StateDir, spec.ID),
		done:        make(chan struct{}),
		started:     make(chan struct{}),
		cancelStart: cancel,
		log:         d.log.With("instance", spec.ID, "function", spec.Function),
	}
	uid, err := d.takeUID()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	inst.uid = uid
	if err := d.instances.Add(spec.ID, inst); err != nil {
		d.releaseUID(uid)
		cancel()
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	err = inst.start(startCtx, spec)
	cancel()
	close(inst.started)
	if err != nil {
		// A VM that never became ready has nothing to shut down gracefully.
		if cerr := inst.stopWithGrace(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	return inst, nil
}

func validate(spec driver.Spec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.MemoryMB < minMemoryMB {
		return errdefs.Invalid("sandbox %s: a vm needs at least %d MB of memory, got %d", spec.ID, minMemoryMB, spec.MemoryMB)
	}
	return nil
}

// minMemoryMB is Lambda's smallest memory size, which the guest kernel
// and agent fit in with room for a runtime.
const minMemoryMB = 128

// DetectRuntimes reports the runtimes this driver's images provide; see
// guest.DetectRuntimes.
func (d *Driver) DetectRuntimes(ctx context.Context) []*runtimes.Runtime {
	return guest.DetectRuntimes(ctx, d.opts.CacheDir)
}

// Prepare builds (or finds cached) the root image of spec's runtime and
// the code image of its revision, the two disks Start would otherwise
// build on a cold start; see driver.Preparer.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) error {
	if spec.Runtime.ID == "" || spec.CodeDir == "" {
		return errdefs.Invalid("preparing %s: runtime and code directory are required", spec.Function)
	}
	rt := spec.Runtime
	if _, err := d.images.Root(ctx, &rt); err != nil {
		return fmt.Errorf("preparing the root image of %s: %w", rt.ID, err)
	}
	key, err := codeKey(spec)
	if err != nil {
		return err
	}
	if _, err := d.images.Code(ctx, spec.CodeDir, spec.RuntimeDir, key); err != nil {
		return fmt.Errorf("preparing the code image of %s: %w", spec.Function, err)
	}
	return nil
}

// Stop destroys the instance; see driver.Driver. Unknown IDs are nil.
func (d *Driver) Stop(ctx context.Context, id string) error {
	inst, ok := d.instances.Get(id)
	if !ok {
		return nil
	}
	return inst.stop(ctx)
}

// Recover kills every QEMU a previous driver on the same StateDir left
// running (identified by its recorded pid and start time, or, if it
// crashed before recording them, by QEMU's command line; in both cases
// only a process running QEMUPath with the instance's -name, so a recycled
// pid is never hit) and removes the instance directories. It re-adopts nothing (see the package documentation) and
// always returns an empty slice.
func (d *Driver) Recover(ctx context.Context) ([]driver.Instance, error) {
	ctx = context.WithoutCancel(ctx)
	ents, err := os.ReadDir(d.opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("recovering: reading state directory: %w", err)
	}
	var errs []error
	for _, e := range ents {
		id := e.Name()
		if !e.IsDir() || d.known(id) {
			continue
		}
		if err := d.removeLeftover(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("recovering vm %s: %w", id, err))
		}
	}
	return []driver.Instance{}, errors.Join(errs...)
}

func (d *Driver) known(id string) bool {
	_, ok := d.instances.Get(id)
	return ok
}

func (d *Driver) removeLeftover(ctx context.Context, id string) error {
	dir := filepath.Join(d.opts.StateDir, id)
	rec, err := hostproc.ReadRecord[record](dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn("unreadable vm record; removing the directory", "instance", id, "err", err)
	}
	qemuPath := d.opts.QEMUPath
	if rec != nil && rec.QEMU != "" {
		qemuPath = rec.QEMU
	}
	// The pid is recorded right after QEMU starts; a crash in between
	// leaves a QEMU only Pdeathsig should have killed, found by its name.
	var pids []int
	if rec != nil && (hostproc.Proc{PID: rec.PID, StartTime: rec.StartTime}).Running() && isOurQEMU(rec.PID, qemuPath, id) {
		pids = append(pids, rec.PID)
	} else {
		pids = findQEMU(qemuPath, id)
	}
	for _, pid := range pids {
		p, err := hostproc.Lookup(pid)
		if err != nil {
			continue
		}
		d.log.Info("killing leftover vm", "instance", id, "pid", pid)
		if err := p.Kill(ctx, func() bool { return isOurQEMU(pid, qemuPath, id) }); err != nil {
			return err
		}
	}
	d.log.Info("removing leftover vm", "instance", id)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing state directory: %w", err)
	}
	return nil
}

// Close stops every instance; Start fails with ErrUnavailable afterwards.
// Close is idempotent.
func (d *Driver) Close(ctx context.Context) error {
	first, err := d.instances.Close(func(i *instance) error { return i.stop(ctx) })
	// Every instance is gone and no Start can follow: nothing forks any
	// more.
	if first {
		d.fork.Close()
		if c, ok := d.images.(interface{ close() }); ok {
			c.close()
		}
	}
	return err
}
