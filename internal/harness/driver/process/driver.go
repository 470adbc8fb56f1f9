// Package process is the process sandbox driver: each instance is a tree of
// processes in its own mount, pid, IPC, UTS and (unless Spec.Network)
// network namespaces, with a private read-only root file system, under
// memory and pids cgroups. It is the lightest driver and the weakest
// isolation (a shared kernel); the VM drivers are for untrusted code.
//
// The sandbox's init is this same binary run as InitCommand, which calls
// InitMain; the driver talks to the agent inside over a socketpair.
//
// As root the driver uses cgroups v1 or v2. Not as root it degrades: a user
// namespace maps the caller to root inside, and there are no cgroups, so no
// memory or process limits. Describe lists every degradation, and New logs
// them once.
package process

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/pool"
	"github.com/invokex/invokex/internal/harness/network"
)

var _ driver.Driver = (*Driver)(nil)
var _ driver.Closer = (*Driver)(nil)
var _ driver.Describer = (*Driver)(nil)

// Timeouts of the driver's own steps. They bound cleanup even when the
// caller's context has no deadline.
const (
	defaultStopGrace = 2 * time.Second
	readyTimeout     = 30 * time.Second
	killTimeout      = 10 * time.Second
)

// Options configures New.
type Options struct {
	// StateDir holds one directory per instance (its record and the mount
	// point of its root); required. Recover cleans up what it finds there.
	StateDir string
	// InitCommand runs the sandbox's init; it must end up in InitMain.
	// Default: this executable with InitArg.
	InitCommand []string
	// Logger receives the driver's and the sandboxes' diagnostics; default
	// slog.Default().
	Logger *slog.Logger
	// CgroupRoot is where the cgroup file systems are mounted; default
	// /sys/fs/cgroup.
	CgroupRoot string
	// CgroupParent is the cgroup, relative to each hierarchy, that holds the
	// instance cgroups. Default "invokex/<hash of StateDir>": drivers with
	// different state directories (several harnesses, tests) never touch
	// each other's cgroups, and Recover removes only its own.
	CgroupParent string
	// StopGrace bounds the graceful part of Stop; default 2 s.
	StopGrace time.Duration
	// WarmSandboxes is how many sandboxes the driver keeps started ahead
	// of need, once the first Start has run (see newWarmPool); 0 means
	// DefaultWarmSandboxes, negative none.
	WarmSandboxes int
	// Network, if set, gives a sandbox whose Spec.Network is true a
	// network namespace of its own with a link to the outside (package
	// network: the internet, not the host). Without it such a sandbox
	// shares the host's network namespace, loopback services included
	// (Describe says so). The caller owns it and closes it after the driver.
	Network *network.Manager
}

// DefaultWarmSandboxes is Options.WarmSandboxes's default: enough for
// cold starts one after another, and a little for bursts; each costs an
// idle init (about 3 MiB).
const DefaultWarmSandboxes = 2

// Driver is the process sandbox driver. See package driver for the contract.
type Driver struct {
	opts         Options
	log          *slog.Logger
	cg           *cgroupManager
	cpus         *cpuPlacer
	warm         *pool.Pool[warmShape, *sandbox]
	tmp          *tmpDisks // nil: /tmp is a tmpfs
	fork         *hostproc.Forker
	rootless     bool
	degradations []string
	// sharedNet is set once a sandbox shared the host's network (no
	// Options.Network): warned once, then in Describe.
	sharedNet atomic.Bool

	instances hostproc.Table[*instance]
}

// New prepares the state directory and the cgroup parents. It logs every
// degradation once.
func New(opts Options) (*Driver, error) {
	if opts.StateDir == "" {
		return nil, errdefs.Invalid("process driver: state directory is required")
	}
	dir, err := filepath.Abs(opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("process driver: resolving state directory: %w", err)
	}
	opts.StateDir = dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("process driver: creating state directory: %w", err)
	}
	if len(opts.InitCommand) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("process driver: finding own executable: %w", err)
		}
		opts.InitCommand = []string{exe, InitArg}
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.CgroupRoot == "" {
		opts.CgroupRoot = "/sys/fs/cgroup"
	}
	opts.CgroupRoot = filepath.Clean(opts.CgroupRoot)
	if opts.CgroupParent == "" {
		sum := sha256.Sum256([]byte(dir))
		opts.CgroupParent = "invokex/" + hex.EncodeToString(sum[:4])
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = defaultStopGrace
	}
	d := &Driver{
		opts:     opts,
		log:      opts.Logger.With("driver", "process"),
		rootless: os.Geteuid() != 0,
		fork:     hostproc.NewForker(),
		cpus:     newCPUPlacer(),
	}
	if d.rootless {
		d.degradations = append(d.degradations,
			"not root: sandboxes run in a user namespace mapping the caller to root; the runtime cannot run as a separate user")
	}
	if opts.WarmSandboxes == 0 {
		opts.WarmSandboxes = DefaultWarmSandboxes
	}
	d.warm = newWarmPool(d, opts.WarmSandboxes)
	var why string
	if d.tmp, why = newTmpDisks(opts.StateDir, d.rootless); d.tmp == nil {
		d.degradations = append(d.degradations,
			"/tmp is a tmpfs, whose every byte is memory charged to the sandbox ("+why+")")
	}
	d.cg = newCgroupManager(opts.CgroupRoot, opts.CgroupParent, !d.rootless)
	d.degradations = append(d.degradations, d.cg.degradations...)
	for _, s := range d.degradations {
		d.log.Warn("process sandbox isolation degraded", "reason", s)
	}
	return d, nil
}

// Name returns "process".
func (d *Driver) Name() string { return "process" }

// Describe lists how the sandboxes on this host are weaker than intended.
func (d *Driver) Describe() []string {
	s := append([]string(nil), d.degradations...)
	if d.sharedNet.Load() {
		s = append(s, sharedNetNote)
	}
	return s
}

// sharedNetNote says what a sandbox's network is without Options.Network.
const sharedNetNote = "sandboxes with a network share the host's: they reach its loopback services, this server's API included"

// Start creates the instance's state directory and cgroups, starts its init
// in new namespaces and waits until the agent inside is ready.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (driver.Instance, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	startCtx, cancel := context.WithCancel(ctx)
	inst := &instance{
		d:           d,
		id:          spec.ID,
		started:     make(chan struct{}),
		cancelStart: cancel,
		log:         d.log.With("instance", spec.ID, "function", spec.Function),
	}
	if err := d.instances.Add(spec.ID, inst); err != nil {
		cancel()
		return nil, fmt.Errorf("starting sandbox %s: %w", spec.ID, err)
	}

	err := inst.start(startCtx, spec)
	cancel()
	close(inst.started)
	if err != nil {
		// A sandbox that never became ready has nothing to shut down
		// gracefully (and ignores SIGTERM until its agent runs).
		if cerr := inst.stopWithGrace(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, fmt.Errorf("starting sandbox %s: %w", spec.ID, err)
	}
	return inst, nil
}

// Stop destroys the instance; see driver.Driver. Unknown IDs are nil.
func (d *Driver) Stop(ctx context.Context, id string) error {
	inst, ok := d.instances.Get(id)
	if !ok {
		return nil
	}
	return inst.stop(ctx)
}

// Recover removes everything instances of a previous driver on the same
// StateDir left behind: it kills their processes (pid and start time are
// recorded, so a recycled pid is never hit), removes their cgroups and
// state directories, and removes cgroups under CgroupParent that have no
// state directory (a crash between creating one and recording it cannot
// happen, but a crash during removal can). It re-adopts nothing: the
// harness's end of a socketpair died with the harness and a socketpair
// cannot be re-connected. It always returns an empty slice.
func (d *Driver) Recover(ctx context.Context) ([]driver.Instance, error) {
	ctx = context.WithoutCancel(ctx)
	ents, err := os.ReadDir(d.opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("recovering: reading state directory: %w", err)
	}
	var errs []error
	seen := map[string]bool{}
	for _, e := range ents {
		id := e.Name()
		seen[id] = true
		if !e.IsDir() || d.known(id) || id == tmpTemplatesDir {
			continue
		}
		if err := d.removeLeftover(ctx, id); err != nil {
			errs = append(errs, fmt.Errorf("recovering sandbox %s: %w", id, err))
		}
	}
	for id, paths := range d.cg.children() {
		if seen[id] || d.known(id) {
			continue
		}
		d.log.Info("removing stray sandbox cgroup", "instance", id)
		if err := destroyCgroups(ctx, paths, killTimeout); err != nil {
			errs = append(errs, fmt.Errorf("recovering cgroup %s: %w", id, err))
		}
	}
	return []driver.Instance{}, errors.Join(errs...)
}

func (d *Driver) known(id string) bool {
	_, ok := d.instances.Get(id)
	return ok || d.warm.Owns(id)
}

func (d *Driver) removeLeftover(ctx context.Context, id string) error {
	dir := filepath.Join(d.opts.StateDir, id)
	paths := d.cg.paths(id)
	rec, err := hostproc.ReadRecord[record](dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if rec != nil {
		for _, p := range rec.Cgroups {
			// The record is trusted only as far as naming this
			// instance's cgroups under the cgroup root.
			if filepath.Base(p) == id && strings.HasPrefix(p, d.opts.CgroupRoot+"/") {
				paths = append(paths, p)
			}
		}
		// Killing the sandbox's init takes its whole pid namespace.
		if p := (hostproc.Proc{PID: rec.PID, StartTime: rec.StartTime}); p.Running() {
			d.log.Info("killing leftover sandbox", "instance", id, "pid", rec.PID)
			if err := p.Kill(ctx, nil); err != nil {
				return err
			}
		}
	}
	d.log.Info("removing leftover sandbox", "instance", id)
	if err := destroyCgroups(ctx, dedupe(paths), killTimeout); err != nil {
		return err
	}
	return removeStateDir(dir)
}

func dedupe(ss []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, s := range ss {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// Close stops every instance; Start fails with ErrUnavailable afterwards.
// Close is idempotent.
func (d *Driver) Close(ctx context.Context) error {
	werr := d.warm.Close(ctx)
	first, err := d.instances.Close(func(i *instance) error { return i.stop(ctx) })
	err = errors.Join(werr, err, d.tmp.close())
	// Every instance is gone and no Start can follow: nothing forks or
	// creates cgroups any more.
	if first {
		d.fork.Close()
		d.cg.removeParents()
	}
	return err
}

// instance is what Start returns: a sandbox assigned to one harness
// instance ID. sb is set by start and read-only once started is closed.
type instance struct {
	d   *Driver
	id  string
	log *slog.Logger

	sb *sandbox
	// started is closed when Start has returned; cancelStart aborts it.
	started     chan struct{}
	cancelStart context.CancelFunc

	stopOnce sync.Once
	stopErr  error
}

var _ driver.Instance = (*instance)(nil)

func (i *instance) ID() string               { return i.id }
func (i *instance) Conn() io.ReadWriteCloser { return i.sb.conn }
func (i *instance) Done() <-chan struct{}    { return i.sb.done }

// PID is the sandbox init's pid in the host's namespace.
func (i *instance) PID() int { return i.sb.cmd.Process.Pid }

// start takes a warm sandbox if one fits, else starts one, and turns it
// into this instance.
func (i *instance) start(ctx context.Context, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := i.d
	sb := d.takeWarm(spec.Network, spec.EphemeralMB)
	if sb == nil {
		var err error
		// Forked with its CPUs, so no thread of it ever runs elsewhere.
		sb, err = d.spawn(ctx, spec.ID, spec.Network, spec.MemoryMB, spec.EphemeralMB, d.cpus.acquire(spec.MemoryMB))
		if err != nil {
			return err
		}
	} else {
		i.log.Debug("using warm sandbox", "sandbox", sb.name)
	}
	i.sb = sb
	return sb.assign(ctx, spec)
}

// stop runs the teardown exactly once; concurrent callers wait for it.
func (i *instance) stop(ctx context.Context) error {
	return i.stopWithGrace(ctx, i.d.opts.StopGrace)
}

func (i *instance) stopWithGrace(ctx context.Context, grace time.Duration) error {
	i.cancelStart()
	<-i.started
	i.stopOnce.Do(func() {
		if i.sb != nil {
			if err := i.sb.destroy(ctx, grace); err != nil {
				i.stopErr = fmt.Errorf("stopping sandbox %s: %w", i.id, err)
			}
		}
		i.d.instances.Remove(i.id)
	})
	return i.stopErr
}

// hostname is the sandbox's hostname (at most 64 bytes).
func hostname(id string) string {
	return "sandbox-" + id
}
