package vmm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/pool"
	"github.com/invokex/invokex/internal/runtimes"
)

// Machine is one VM of a driver: a pointer to a type of the driver's that
// embeds *Instance and does, with these methods, what only its VMM does.
// The Host calls them, never two of one machine at a time.
type Machine interface {
	driver.Instance
	// instance is promoted from the embedded *Instance.
	instance() *Instance
	// Boot creates the VM of spec and connects to its agent. In order:
	// Instance.Create (the record, before anything exists), Host.Disks,
	// Instance.Launch (the VMM), Instance.Record (its pid), then, within
	// Instance.ReadyContext, Instance.AwaitAgent. It returns once the agent is ready, or with an
	// error and whatever it made still in place: the Host then stops the
	// machine, which removes it. ctx ends when Start's caller gives up or
	// Stop is called during the boot.
	Boot(ctx context.Context, spec driver.Spec) error
	// Ask asks the running VMM to exit (QMP quit, Ctrl-Alt-Del) within
	// grace, the graceful first step of Stop; the Host SIGKILLs the VMM
	// when it has not exited after grace. Ask may return before it exits.
	Ask(ctx context.Context, grace time.Duration)
	// Release removes what the VM holds besides its VMM process and its
	// instance directory (cgroups, an API client's connections), once the
	// VMM is gone or could not be killed. It is called on every Stop,
	// also of a machine whose Boot failed at any step, and must finish
	// even when ctx is cancelled.
	Release(ctx context.Context) error
}

// Config configures NewHost.
type Config struct {
	// Name is the driver's name and its VMM's in errors and logs ("qemu",
	// "firecracker").
	Name string
	// StateDir holds one directory per instance; absolute. NewHost
	// creates it.
	StateDir string
	// CacheDir is package guest's cache, which DetectRuntimes reads.
	CacheDir string
	// Images makes the VMs' disks.
	Images Images
	// Log is the driver's logger.
	Log *slog.Logger
	// StopGrace bounds the graceful part of Stop: how long the VMM has
	// after Machine.Ask before SIGKILL.
	StopGrace time.Duration
	// ExitWait is how long an error of a start waits for a VMM that may
	// be exiting, so that the error carries its last words.
	ExitWait time.Duration
	// Spares is how many spare VMs to keep booted ahead of need (see
	// SpareMachine); 0 or less: none. The driver's machines must be
	// SpareMachines.
	Spares int
}

// Host is the part of a microVM driver that is the same for every VMM:
// its instances and their slots, the fork thread, the images, and the
// Start, Stop, Recover and Close sequences of package driver's contract.
// M is the driver's machine type. Safe for concurrent use.
type Host[M Machine] struct {
	cfg      Config
	fork     *hostproc.Forker
	hostCPUs int

	instances hostproc.Table[M]
	spares    *pool.Pool[spareKey, M]

	mu    sync.Mutex
	slots map[int]bool // slots in use
	// dirs are the driver's own directories in StateDir (OwnDir); none
	// once closed.
	dirs   map[string]bool
	closed bool
}

// NewHost creates cfg.StateDir and starts the fork thread.
func NewHost[M Machine](cfg Config) (*Host[M], error) {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("%s driver: creating state directory: %w", cfg.Name, err)
	}
	h := &Host[M]{
		cfg:      cfg,
		fork:     hostproc.NewForker(),
		hostCPUs: runtime.NumCPU(),
		slots:    map[int]bool{},
		dirs:     map[string]bool{},
	}
	h.spares = newSpares(h, cfg.Spares)
	return h, nil
}

func (h *Host[M]) config() *Config          { return &h.cfg }
func (h *Host[M]) forker() *hostproc.Forker { return h.fork }

// VCPUs is how many vCPUs a VM of memoryMB gets on this host: the
// function's share (driver.VCPUsFor) plus, if AgentCPU, one for the agent.
func (h *Host[M]) VCPUs(memoryMB int) int {
	n := driver.VCPUsFor(memoryMB, h.hostCPUs)
	if h.AgentCPU() {
		n++
	}
	return n
}

// AgentCPU reports whether VMs get a vCPU for the agent beside the
// function's (the kernel command line then carries invokex.agentcpu=1, and
// the guest's agent runs on its own vCPU; see agent.Options.SplitCPUs):
// on hosts with 2 CPUs or more. The agent and the runtime then never wait
// for each other to be scheduled out, and under TCG no switch between
// their address spaces flushes the emulated TLB (a warm invocation took
// half the time). The function still sees only its share: the runtime's
// affinity mask excludes the agent's vCPU.
func (h *Host[M]) AgentCPU() bool { return h.hostCPUs >= 2 }

// Start validates spec (see Validate), makes an Instance with a free slot
// for it, has newMachine wrap it in the driver's machine, registers the
// machine and boots it. If the boot fails or ctx ends, the machine is
// stopped without grace (a VM that never became ready has nothing to shut
// down gracefully) before Start returns. Errors wrap ErrInvalidParameter,
// ErrAlreadyExists (the ID is running) and ErrUnavailable (no free slot,
// Close called).
func (h *Host[M]) Start(ctx context.Context, spec driver.Spec, newMachine func(*Instance) M) (driver.Instance, error) {
	if err := Validate(spec); err != nil {
		return nil, err
	}
	if m, ok, err := h.fromSpare(ctx, spec, newMachine); ok {
		return m, err
	}
	return h.boot(ctx, spec, newMachine)
}

// StartFresh is Start without taking a spare: for machines that must
// come up their own way, such as a VM restored from a snapshot (a spare
// has none of its state). The pool does not learn spec's shape from it.
func (h *Host[M]) StartFresh(ctx context.Context, spec driver.Spec, newMachine func(*Instance) M) (driver.Instance, error) {
	if err := Validate(spec); err != nil {
		return nil, err
	}
	return h.boot(ctx, spec, newMachine)
}

// boot is Start's boot of a new machine.
func (h *Host[M]) boot(ctx context.Context, spec driver.Spec, newMachine func(*Instance) M) (driver.Instance, error) {
	inst, err := h.newInstance(ctx, spec)
	if err != nil {
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	m := newMachine(inst)
	inst.m = m
	if err := h.instances.Add(spec.ID, m); err != nil {
		h.releaseSlot(inst.slot)
		inst.cancelStart()
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	startCtx := inst.startCtx
	err = startCtx.Err()
	if err == nil {
		err = m.Boot(startCtx, spec)
	}
	inst.cancelStart()
	close(inst.started)
	if err != nil {
		if cerr := inst.stop(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	return m, nil
}

// newInstance makes the Instance of spec with a free slot; its startCtx
// (ctx, ended by cancelStart) bounds the boot.
func (h *Host[M]) newInstance(ctx context.Context, spec driver.Spec) (*Instance, error) {
	startCtx, cancel := context.WithCancel(ctx)
	inst := &Instance{
		id:          spec.ID,
		name:        spec.ID,
		dir:         filepath.Join(h.cfg.StateDir, spec.ID),
		log:         h.cfg.Log.With("instance", spec.ID, "function", spec.Function),
		host:        h,
		done:        make(chan struct{}),
		started:     make(chan struct{}),
		startCtx:    startCtx,
		cancelStart: cancel,
	}
	slot, err := h.takeSlot()
	if err != nil {
		cancel()
		return nil, err
	}
	inst.slot = slot
	return inst, nil
}

// takeSlot reserves a slot for a new VM.
func (h *Host[M]) takeSlot() (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for n := range Slots {
		if !h.slots[n] {
			h.slots[n] = true
			return n, nil
		}
	}
	return 0, fmt.Errorf("all %d vm slots in use: %w", Slots, errdefs.ErrUnavailable)
}

func (h *Host[M]) releaseSlot(n int) {
	h.mu.Lock()
	delete(h.slots, n)
	h.mu.Unlock()
}

func (h *Host[M]) forget(i *Instance, destroyed bool) {
	h.instances.Remove(i.id)
	if destroyed {
		h.releaseSlot(i.slot)
	}
}

// Disks returns the root and code images of spec (built, or found in the
// cache) and creates its scratch disk at scratch, sized by EphemeralMB.
func (h *Host[M]) Disks(ctx context.Context, spec driver.Spec, scratch string) (root, code string, err error) {
	rt := spec.Runtime
	root, err = h.cfg.Images.Root(ctx, &rt)
	if err != nil {
		return "", "", fmt.Errorf("root image of %s: %w", spec.Runtime.ID, err)
	}
	code, err = h.CodeImage(ctx, spec)
	if err != nil {
		return "", "", err
	}
	if err := h.cfg.Images.Scratch(ctx, scratch, spec.EphemeralMB); err != nil {
		return "", "", fmt.Errorf("scratch image: %w", err)
	}
	return root, code, nil
}

// CodeImage returns the code image of spec (built, or found in the cache).
func (h *Host[M]) CodeImage(ctx context.Context, spec driver.Spec) (string, error) {
	key, err := CodeKey(spec)
	if err != nil {
		return "", err
	}
	code, err := h.cfg.Images.Code(ctx, spec.CodeDir, spec.RuntimeDir, key)
	if err != nil {
		return "", fmt.Errorf("code image: %w", err)
	}
	return code, nil
}

// SpareDisks returns the root image of spec's runtime and creates its
// scratch disk at scratch: a spare's disks, which have no code.
func (h *Host[M]) SpareDisks(ctx context.Context, spec driver.Spec, scratch string) (root string, err error) {
	rt := spec.Runtime
	root, err = h.cfg.Images.Root(ctx, &rt)
	if err != nil {
		return "", fmt.Errorf("root image of %s: %w", spec.Runtime.ID, err)
	}
	if err := h.cfg.Images.Scratch(ctx, scratch, spec.EphemeralMB); err != nil {
		return "", fmt.Errorf("scratch image: %w", err)
	}
	return root, nil
}

// Prepare builds (or finds cached) the root image of spec's runtime and
// the code image of its revision, the two disks Start would otherwise
// build on a cold start; see driver.Preparer.
func (h *Host[M]) Prepare(ctx context.Context, spec driver.Spec) error {
	if spec.Runtime.ID == "" || spec.CodeDir == "" {
		return errdefs.Invalid("preparing %s: runtime and code directory are required", spec.Function)
	}
	rt := spec.Runtime
	if _, err := h.cfg.Images.Root(ctx, &rt); err != nil {
		return fmt.Errorf("preparing the root image of %s: %w", rt.ID, err)
	}
	key, err := CodeKey(spec)
	if err != nil {
		return err
	}
	if _, err := h.cfg.Images.Code(ctx, spec.CodeDir, spec.RuntimeDir, key); err != nil {
		return fmt.Errorf("preparing the code image of %s: %w", spec.Function, err)
	}
	return nil
}

// DetectRuntimes reports the runtimes the images provide; see
// guest.DetectRuntimes and driver.RuntimeDetector.
func (h *Host[M]) DetectRuntimes(ctx context.Context) []*runtimes.Runtime {
	return guest.DetectRuntimes(ctx, h.cfg.CacheDir)
}

// Get returns the running machine id.
func (h *Host[M]) Get(id string) (M, bool) { return h.instances.Get(id) }

// Stop destroys machine id with the configured grace; see driver.Driver.
// Unknown IDs are nil.
func (h *Host[M]) Stop(ctx context.Context, id string) error {
	m, ok := h.instances.Get(id)
	if !ok {
		return nil
	}
	return m.instance().stop(ctx, h.cfg.StopGrace)
}

// Recover removes every instance directory in StateDir that is not one of
// this Host's machines: a previous driver's, left by a crash. For each,
// kill(ctx, id, dir) ends what of the VM still runs (see
// ReadLeftoverRecord and KillLeftover) and removes what else it holds;
// then the directory is removed. It re-adopts nothing, so it always
// returns an empty slice, with the errors of the instances it could not
// remove. ctx's cancellation does not stop it.
func (h *Host[M]) Recover(ctx context.Context, kill func(ctx context.Context, id, dir string) error) ([]driver.Instance, error) {
	ctx = context.WithoutCancel(ctx)
	ents, err := os.ReadDir(h.cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("recovering: reading state directory: %w", err)
	}
	var errs []error
	for _, e := range ents {
		id := e.Name()
		if _, known := h.instances.Get(id); !e.IsDir() || known || h.spares.Owns(id) || h.ownsDir(id) {
			continue
		}
		if err := h.removeLeftover(ctx, id, kill); err != nil {
			errs = append(errs, fmt.Errorf("recovering vm %s: %w", id, err))
		}
	}
	return []driver.Instance{}, errors.Join(errs...)
}

func (h *Host[M]) removeLeftover(ctx context.Context, id string, kill func(ctx context.Context, id, dir string) error) error {
	dir := filepath.Join(h.cfg.StateDir, id)
	if err := kill(ctx, id, dir); err != nil {
		return err
	}
	h.cfg.Log.Info("removing leftover vm", "instance", id)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing state directory: %w", err)
	}
	return nil
}

// OwnDir creates (or empties) the directory name in StateDir for the
// driver's own files that are no instance's, such as the templates of
// package qemu, and returns its path: Recover leaves it alone, Close
// removes it, and after a crash the next driver's Recover removes it as
// a leftover (it has no record, so nothing to kill). name must not be an
// instance's ID.
func (h *Host[M]) OwnDir(name string) (string, error) {
	if name == "" || filepath.Base(name) != name || name[0] == '.' {
		return "", errdefs.Invalid("directory name %q", name)
	}
	dir := filepath.Join(h.cfg.StateDir, name)
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return "", fmt.Errorf("%s driver closed: %w", h.cfg.Name, errdefs.ErrUnavailable)
	}
	h.dirs[name] = true
	if err := os.RemoveAll(dir); err != nil {
		return "", fmt.Errorf("emptying %s: %w", dir, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating %s: %w", dir, err)
	}
	return dir, nil
}

func (h *Host[M]) ownsDir(name string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.dirs[name]
}

// Close stops every machine; Start fails with ErrUnavailable afterwards.
// The first Close then ends the fork thread and closes the Images (if
// they have a Close method): every instance is gone and no Start can
// follow. It removes the driver's own directories (OwnDir). Idempotent.
func (h *Host[M]) Close(ctx context.Context) error {
	serr := h.spares.Close(ctx)
	first, err := h.instances.Close(func(m M) error { return m.instance().stop(ctx, h.cfg.StopGrace) })
	err = errors.Join(serr, err)
	h.mu.Lock()
	for name := range h.dirs {
		if rerr := os.RemoveAll(filepath.Join(h.cfg.StateDir, name)); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	h.dirs, h.closed = map[string]bool{}, true
	h.mu.Unlock()
	if first {
		h.fork.Close()
		if c, ok := h.cfg.Images.(interface{ Close() }); ok {
			c.Close()
		}
	}
	return err
}
