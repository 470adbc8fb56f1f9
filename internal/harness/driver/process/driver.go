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
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
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
}

// Driver is the process sandbox driver. See package driver for the contract.
type Driver struct {
	opts         Options
	log          *slog.Logger
	cg           *cgroupManager
	cpus         *cpuPlacer
	fork         *hostproc.Forker
	rootless     bool
	degradations []string

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
	if !d.rootless && !hasCapability(capSysResource) {
		d.degradations = append(d.degradations,
			"no CAP_SYS_RESOURCE: the agent cannot be protected from the OOM killer (oom_score_adj)")
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
	return append([]string(nil), d.degradations...)
}

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
		dir:         filepath.Join(d.opts.StateDir, spec.ID),
		done:        make(chan struct{}),
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
		if !e.IsDir() || d.known(id) {
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
	return ok
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
	first, err := d.instances.Close(func(i *instance) error { return i.stop(ctx) })
	// Every instance is gone and no Start can follow: nothing forks or
	// creates cgroups any more.
	if first {
		d.fork.Close()
		d.cg.removeParents()
	}
	return err
}

// instance is one sandbox. Its fields are set by start and read-only once
// started is closed.
type instance struct {
	d   *Driver
	id  string
	dir string
	log *slog.Logger

	cgroups []string
	cpus    []int // from d.cpus, given back at destroy
	cmd     *exec.Cmd
	conn    net.Conn
	stderr  *hostproc.LineLog
	// done is closed when the init has exited (the only cmd.Wait).
	done chan struct{}
	// started is closed when Start has returned; cancelStart aborts it.
	started     chan struct{}
	cancelStart context.CancelFunc

	stopOnce sync.Once
	stopErr  error
}

var _ driver.Instance = (*instance)(nil)

func (i *instance) ID() string               { return i.id }
func (i *instance) Conn() io.ReadWriteCloser { return i.conn }
func (i *instance) Done() <-chan struct{}    { return i.done }

// PID is the sandbox init's pid in the host's namespace.
func (i *instance) PID() int { return i.cmd.Process.Pid }

func (i *instance) start(ctx context.Context, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := i.d
	rec := &record{ID: spec.ID, Function: spec.Function, RevisionID: spec.RevisionID,
		Cgroups: d.cg.paths(spec.ID), Created: time.Now().UTC()}
	// Record first, then create: Recover must know of every cgroup.
	if err := os.Mkdir(i.dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	root := filepath.Join(i.dir, rootDirName)
	if err := os.Mkdir(root, 0o755); err != nil {
		return fmt.Errorf("creating root directory: %w", err)
	}
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	i.cgroups = rec.Cgroups
	if err := d.cg.create(spec.ID, spec.MemoryMB); err != nil {
		return err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("creating socketpair: %w", err)
	}
	hostEnd := os.NewFile(uintptr(fds[0]), "sandbox-"+spec.ID)
	sandboxEnd := os.NewFile(uintptr(fds[1]), "harness")
	i.conn, err = net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		sandboxEnd.Close()
		return fmt.Errorf("wrapping socketpair: %w", err)
	}
	i.cpus = d.cpus.acquire(spec.MemoryMB)
	err = i.startInit(spec, root, sandboxEnd)
	sandboxEnd.Close() // the child has its copy
	if err != nil {
		return err
	}
	p, err := hostproc.Lookup(i.cmd.Process.Pid)
	if err != nil {
		return i.withStderr(fmt.Errorf("reading init start time: %w", err))
	}
	rec.PID, rec.StartTime = p.PID, p.StartTime
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	// The init waits for syncGo before it allocates anything of note, so
	// joining here puts the whole sandbox under the limits.
	if err := joinCgroups(i.cgroups, rec.PID); err != nil {
		return i.withStderr(err)
	}
	if _, err := i.conn.Write([]byte{syncGo}); err != nil {
		return i.withStderr(fmt.Errorf("releasing init: %w", err))
	}
	return i.waitReady(ctx)
}

// withStderr adds what the init wrote to an error caused by its early
// death, waiting a moment for the last lines to arrive.
func (i *instance) withStderr(err error) error {
	select {
	case <-i.done:
	case <-time.After(time.Second):
	}
	if tail := i.stderr.LastLines(); tail != "" {
		return fmt.Errorf("%w (sandbox said: %s)", err, tail)
	}
	return err
}

func (i *instance) startInit(spec driver.Spec, root string, sandboxEnd *os.File) error {
	d := i.d
	cfg := sandboxConfig{
		ID: spec.ID, Hostname: hostname(spec.ID), Root: root,
		CodeDir: spec.CodeDir, RuntimeDir: spec.RuntimeDir,
		MemoryMB: spec.MemoryMB, EphemeralMB: spec.EphemeralMB,
		OwnNetwork: !spec.Network,
	}
	cfgJSON, err := jsonString(cfg)
	if err != nil {
		return err
	}
	cmd := exec.Command(d.opts.InitCommand[0], d.opts.InitCommand[1:]...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", configEnv + "=" + cfgJSON}
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{sandboxEnd} // fd 3 = harnessFD
	i.stderr = newStderrLog(i.log.With("source", "sandbox"))
	cmd.Stdout = i.stderr
	cmd.Stderr = i.stderr
	// Bounds cmd.Wait if something in the sandbox kept the stderr pipe
	// open after the init died (cannot happen with a pid namespace, but
	// the waiter must never hang).
	cmd.WaitDelay = time.Second
	flags := uintptr(unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS)
	if !spec.Network {
		flags |= unix.CLONE_NEWNET
	}
	// Setsid: a sandbox is its own session, so a terminal's Ctrl-C (sent to
	// the server's foreground process group) reaches only the server, which
	// then stops sandboxes in order, instead of killing them under it.
	attr := &syscall.SysProcAttr{Cloneflags: flags, Pdeathsig: syscall.SIGKILL, Setsid: true}
	if d.rootless {
		attr.Cloneflags |= unix.CLONE_NEWUSER
		attr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Geteuid(), Size: 1}}
		attr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getegid(), Size: 1}}
		attr.GidMappingsEnableSetgroups = false
	}
	cmd.SysProcAttr = attr
	if err := d.fork.StartOn(cmd, i.cpus); err != nil {
		return fmt.Errorf("starting sandbox init: %w", err)
	}
	i.cmd = cmd
	hostproc.Supervise(cmd, i.done, func(err error) {
		i.stderr.Flush()
		if err != nil {
			i.log.Info("sandbox exited", "err", err)
		}
	})
	return nil
}

// newStderrLog is the log of a sandbox's stdout and stderr: its init and
// agent write diagnostics there, as slog JSON records.
func newStderrLog(log *slog.Logger) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{Msg: "sandbox output"})
}

// waitReady waits for syncReady from the agent. The init exiting first
// ends the read with EOF, since the sandbox's end of the stream closes.
func (i *instance) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = i.conn.SetReadDeadline(time.Now()) })
	defer stop()
	var b [1]byte
	_, err := io.ReadFull(i.conn, b[:])
	if !stop() {
		// The deadline was forced: the read (if it failed) failed for that.
		return fmt.Errorf("waiting for the sandbox agent: %w", context.Cause(ctx))
	}
	if err != nil {
		return i.withStderr(fmt.Errorf("sandbox failed before its agent was ready: %w", err))
	}
	if b[0] != syncReady {
		return fmt.Errorf("sandbox agent sent %q instead of ready", b[0])
	}
	return nil
}

// stop runs the teardown exactly once; concurrent callers wait for it.
func (i *instance) stop(ctx context.Context) error {
	return i.stopWithGrace(ctx, i.d.opts.StopGrace)
}

func (i *instance) stopWithGrace(ctx context.Context, grace time.Duration) error {
	i.cancelStart()
	<-i.started
	i.stopOnce.Do(func() {
		i.stopErr = i.destroy(ctx, grace)
		i.d.instances.Remove(i.id)
	})
	return i.stopErr
}

// destroy closes the stream, asks the sandbox to exit (SIGTERM to the init,
// which the agent gets), kills it after the grace period (killing a pid
// namespace's init kills the namespace), then removes the cgroups and the
// state directory. It runs to completion even when ctx is cancelled; ctx
// only shortens the grace period.
func (i *instance) destroy(ctx context.Context, grace time.Duration) error {
	var errs []error
	if i.conn != nil {
		i.conn.Close()
	}
	if i.cmd != nil {
		// The closed stream already makes the agent exit; SIGTERM (Stop's
		// default request) covers an agent that is not reading it.
		if err := hostproc.Stop(ctx, i.cmd.Process, i.done, grace, nil); err != nil {
			errs = append(errs, fmt.Errorf("sandbox init: %w", err))
		}
	}
	if err := destroyCgroups(context.WithoutCancel(ctx), i.cgroups, killTimeout); err != nil {
		errs = append(errs, err)
	}
	if err := removeStateDir(i.dir); err != nil {
		errs = append(errs, err)
	}
	i.d.cpus.release(i.cpus)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stopping sandbox %s: %w", i.id, err)
	}
	return nil
}

// hostname is the sandbox's hostname (at most 64 bytes).
func hostname(id string) string {
	return "sandbox-" + id
}
