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
// # Files and privileges
//
// StateDir/<id>/ (mode 0700, the driver's) holds instance.json (written
// before Firecracker starts: its pid and start time once known). Without
// the jailer it is Firecracker's working directory and holds its API
// socket (firecracker.sock), the vsock socket (vsock.sock) and
// scratch.ext4; Firecracker runs as the driver's user with an empty
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
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

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
}

// vmSlots is how many VMs one driver can have at a time.
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

// Driver is the Firecracker driver. See package driver for the contract.
type Driver struct {
	opts     Options
	log      *slog.Logger
	images   imageMaker
	fork     *hostproc.Forker
	hostCPUs int
	cgroups  cgroupSetup

	instances hostproc.Table[*instance]

	mu          sync.Mutex   // guards slots, warnedNetwk and warnedCopy
	slots       map[int]bool // slots in use
	warnedNetwk bool
	warnedCopy  bool
}

// New checks Firecracker (and the jailer), the kernel and the agent binary
// and prepares the state directory. It fails with ErrUnavailable when
// /dev/kvm cannot be opened: Firecracker has no software emulation.
func New(opts Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errdefs.Invalid("firecracker driver: state directory is required")
	}
	if opts.CacheDir == "" {
		opts.CacheDir = defaultCacheDir()
	}
	if opts.KernelPath == "" {
		k, ok := defaultKernel(opts.CacheDir)
		if !ok {
			return nil, fmt.Errorf("firecracker driver: no guest kernel in %s: run `invokex guest kernel`: %w",
				opts.CacheDir, errdefs.ErrUnavailable)
		}
		opts.KernelPath = k
	}
	if opts.AgentBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("firecracker driver: finding own executable: %w", err)
		}
		opts.AgentBin = exe
	}
	if err := guest.CheckStatic(opts.AgentBin); err != nil {
		return nil, fmt.Errorf("firecracker driver: agent binary: %w", err)
	}
	if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err != nil {
		return nil, fmt.Errorf("firecracker driver: firecracker needs KVM: %w: %w", err, errdefs.ErrUnavailable)
	} else {
		f.Close()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	d, err := newDriver(opts, &guestImages{cacheDir: opts.CacheDir, agentBin: opts.AgentBin, log: opts.Logger})
	if err != nil {
		return nil, err
	}
	return d, nil
}

// newDriver is New without package guest and the KVM check: unit tests
// pass their own imageMaker and run a stand-in for Firecracker.
func newDriver(opts Options, images imageMaker) (*Driver, error) {
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
	if opts.FirecrackerPath, err = resolveBinary(opts.FirecrackerPath, "firecracker"); err != nil {
		return nil, err
	}
	if opts.JailerPath != "" {
		if opts.JailerPath, err = resolveBinary(opts.JailerPath, "jailer"); err != nil {
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
	if fi, err := os.Stat(opts.KernelPath); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("firecracker driver: guest kernel %s missing: run `invokex guest kernel`: %w", opts.KernelPath, errdefs.ErrUnavailable)
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = defaultStopGrace
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = defaultReadyTimeout
	}
	if opts.CgroupParent == "" {
		opts.CgroupParent = "invokex-firecracker"
	}
	if opts.UIDBase <= 0 {
		sum := sha256.Sum256([]byte(opts.StateDir))
		opts.UIDBase = 1<<30 + int(binary.BigEndian.Uint16(sum[:2])%4096)*vmSlots
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("firecracker driver: creating state directory: %w", err)
	}
	d := &Driver{
		opts:     opts,
		log:      opts.Logger.With("driver", "firecracker"),
		images:   images,
		fork:     hostproc.NewForker(),
		hostCPUs: runtime.NumCPU(),
		slots:    map[int]bool{},
	}
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

// resolveBinary resolves path to an absolute path of an existing file.
func resolveBinary(path, what string) (string, error) {
	if p, err := filepath.Abs(path); err == nil {
		path = p
	}
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return "", fmt.Errorf("firecracker driver: %s is not a %s binary: %w", path, what, errdefs.ErrUnavailable)
	}
	return path, nil
}

// takeSlot reserves a slot (and so a uid and a tap) for a new VM.
func (d *Driver) takeSlot() (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for n := range vmSlots {
		if !d.slots[n] {
			d.slots[n] = true
			return n, nil
		}
	}
	return 0, fmt.Errorf("all %d vm slots in use: %w", vmSlots, errdefs.ErrUnavailable)
}

// releaseSlot frees what takeSlot reserved.
func (d *Driver) releaseSlot(n int) {
	d.mu.Lock()
	delete(d.slots, n)
	d.mu.Unlock()
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
	if d.opts.TapName == "" {
		s = append(s, "no guest network: Spec.Network is ignored (no TapName configured) and VMs have loopback only")
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
	slot, err := d.takeSlot()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	inst.slot = slot
	if err := d.instances.Add(spec.ID, inst); err != nil {
		d.releaseSlot(slot)
		cancel()
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	if spec.Network && d.opts.TapName == "" {
		d.warnOnce(&d.warnedNetwk, "sandbox network requested but no tap is configured: vms get loopback only")
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

// Stop destroys the instance; see driver.Driver. Unknown IDs are nil.
func (d *Driver) Stop(ctx context.Context, id string) error {
	inst, ok := d.instances.Get(id)
	if !ok {
		return nil
	}
	return inst.stop(ctx)
}

// Recover kills every Firecracker a previous driver on the same StateDir
// left running (by its recorded pid and start time, else by its command
// line, and everything in its recorded cgroups; never a process that is
// not that instance's VMM, even if a recycled pid says so), removes its
// cgroups and its instance directory. It re-adopts nothing and always
// returns an empty slice.
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
	fcPath, jailerPath := d.opts.FirecrackerPath, d.opts.JailerPath
	var cgroups []string
	if rec != nil {
		if rec.Firecracker != "" {
			fcPath, jailerPath = rec.Firecracker, rec.Jailer
		}
		cgroups = rec.Cgroups
	}
	// The pid is recorded right after the VMM starts; a crash in between
	// leaves one only Pdeathsig should have killed (and a jailed one
	// loses Pdeathsig when the jailer drops to its user), found by its
	// command line.
	var pids []int
	if rec != nil && (hostproc.Proc{PID: rec.PID, StartTime: rec.StartTime}).Running() && isOurVMM(rec.PID, fcPath, jailerPath, id) {
		pids = append(pids, rec.PID)
	} else {
		pids = findVMMs(fcPath, jailerPath, id)
	}
	for _, pid := range pids {
		p, err := hostproc.Lookup(pid)
		if err != nil {
			continue
		}
		d.log.Info("killing leftover vm", "instance", id, "pid", pid)
		if err := p.Kill(ctx, func() bool { return isOurVMM(pid, fcPath, jailerPath, id) }); err != nil {
			return err
		}
	}
	if err := removeCgroups(ctx, cgroups); err != nil {
		return err
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
	}
	return err
}
