package process

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
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/cpuset"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/network"
)

// sandbox is a started init and what it holds on the host: its state
// directory, its cgroups, its CPUs and its end of the socketpair. It comes
// to life in two steps:
//
//  1. spawn: state directory, cgroups, the init forked into new namespaces
//     and moved into its cgroups. The init then waits for its config. This
//     is the part that does not depend on the function, and the slow part:
//     moving a process into a cgroup waits for an RCU grace period on
//     cgroup v1 (5-25 ms here), which is why the warm pool (newWarmPool) does it ahead of need.
//  2. assign: the sandbox gets an instance's ID, memory and CPUs, and its
//     config; the init builds the root file system and the agent answers.
//
// destroy undoes both, from any point.
type sandbox struct {
	d *Driver
	// name names the state directory and the cgroups: a warm sandbox's
	// own name until assign renames them after the instance.
	name     string
	dir      string
	network  bool
	memoryMB int // the cgroup's current limit (without agentHeadroomMB)
	// tmpMB is the size of the /tmp image the init was started with
	// (staged while it waits), 0 if none.
	tmpMB   int
	cgroups []string
	cpus    []int // from d.cpus, given back at destroy
	pinned  bool  // cpus applied (at fork, or by assign)
	log     *slog.Logger

	// link is the sandbox's network (Options.Network), nil without.
	link *network.Link

	rec    *record
	cmd    *exec.Cmd
	conn   net.Conn
	stderr *hostproc.LineLog
	// done is closed when the init has exited (the only cmd.Wait).
	done chan struct{}
}

// spawn runs step 1 for a sandbox called name, with a /tmp image of
// tmpMB (if the driver makes them) that its init mounts while it waits.
// cpus (from d.cpus, or nil) become the sandbox's at fork; on error spawn
// has removed everything and released them.
func (d *Driver) spawn(ctx context.Context, name string, network bool, memoryMB, tmpMB int, cpus []int) (*sandbox, error) {
	sb := &sandbox{
		d: d, name: name, dir: filepath.Join(d.opts.StateDir, name),
		network: network, memoryMB: memoryMB, tmpMB: tmpMB, cpus: cpus, pinned: len(cpus) > 0,
		done: make(chan struct{}),
		log:  d.log.With("sandbox", name),
	}
	if err := sb.spawn(ctx); err != nil {
		if cerr := sb.destroy(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, fmt.Errorf("starting sandbox %s: %w", name, err)
	}
	return sb, nil
}

func (sb *sandbox) spawn(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := sb.d
	sb.rec = &record{ID: sb.name, Cgroups: d.cg.paths(sb.name), Created: time.Now().UTC()}
	// Record first, then create: Recover must know of every cgroup.
	if err := os.Mkdir(sb.dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	if err := os.Mkdir(filepath.Join(sb.dir, rootDirName), 0o755); err != nil {
		return fmt.Errorf("creating root directory: %w", err)
	}
	if err := hostproc.WriteRecord(sb.dir, sb.rec); err != nil {
		return err
	}
	sb.cgroups = sb.rec.Cgroups
	if err := d.cg.create(sb.name, sb.memoryMB); err != nil {
		return err
	}
	tmpImage, err := d.tmp.make(ctx, sb.dir, sb.tmpMB)
	if err != nil {
		return err
	}
	if tmpImage == "" {
		sb.tmpMB = 0 // a tmpfs, made from the config
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("creating socketpair: %w", err)
	}
	hostEnd := os.NewFile(uintptr(fds[0]), "sandbox-"+sb.name)
	sandboxEnd := os.NewFile(uintptr(fds[1]), "harness")
	sb.conn, err = net.FileConn(hostEnd)
	hostEnd.Close()
	if err != nil {
		sandboxEnd.Close()
		return fmt.Errorf("wrapping socketpair: %w", err)
	}
	err = sb.startInit(sandboxEnd, tmpImage)
	sandboxEnd.Close() // the child has its copy
	if err != nil {
		return err
	}
	p, err := hostproc.Lookup(sb.cmd.Process.Pid)
	if err != nil {
		return sb.withStderr(fmt.Errorf("reading init start time: %w", err))
	}
	sb.rec.PID, sb.rec.StartTime = p.PID, p.StartTime
	if err := hostproc.WriteRecord(sb.dir, sb.rec); err != nil {
		return err
	}
	if sb.ownsNetwork() && sb.network {
		// The link goes with the namespace, so Recover needs no record
		// of it: killing the sandbox removes it.
		if err := sb.connect(ctx); err != nil {
			return sb.withStderr(err)
		}
	}
	// The init waits for its config before it allocates anything of
	// note (its /tmp mount's few KiB aside), so joining here puts the
	// whole sandbox under the limits.
	if err := joinCgroups(sb.cgroups, sb.rec.PID); err != nil {
		return sb.withStderr(err)
	}
	return nil
}

func (sb *sandbox) startInit(sandboxEnd *os.File, tmpImage string) error {
	d := sb.d
	cmd := exec.Command(d.opts.InitCommand[0], d.opts.InitCommand[1:]...)
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	if tmpImage != "" {
		cmd.Env = append(cmd.Env, tmpImageEnv+"="+tmpImage)
	}
	cmd.Dir = "/"
	cmd.ExtraFiles = []*os.File{sandboxEnd} // fd 3 = harnessFD
	sb.stderr = newStderrLog(sb.log.With("source", "sandbox"))
	cmd.Stdout = sb.stderr
	cmd.Stderr = sb.stderr
	// Bounds cmd.Wait if something in the sandbox kept the stderr pipe
	// open after the init died (cannot happen with a pid namespace, but
	// the waiter must never hang).
	cmd.WaitDelay = time.Second
	flags := uintptr(unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS)
	if sb.ownsNetwork() {
		flags |= unix.CLONE_NEWNET
	} else if d.sharedNet.CompareAndSwap(false, true) {
		d.log.Warn("process sandbox isolation degraded", "reason", sharedNetNote)
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
	if err := d.fork.StartOn(cmd, sb.cpus); err != nil {
		return fmt.Errorf("starting sandbox init: %w", err)
	}
	sb.cmd = cmd
	hostproc.Supervise(cmd, sb.done, func(err error) {
		sb.stderr.Flush()
		if err != nil {
			sb.log.Info("sandbox exited", "err", err)
		}
	})
	return nil
}

// assign runs step 2: the sandbox becomes instance spec.ID. On error the
// caller destroys the sandbox.
func (sb *sandbox) assign(ctx context.Context, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := sb.d
	if sb.name != spec.ID {
		if err := sb.rename(spec.ID); err != nil {
			return err
		}
	}
	if sb.link != nil {
		// Made when the sandbox was forked: the host's rules must still
		// be there (a firewall reload removes them) before it serves.
		if err := d.opts.Network.Check(); err != nil {
			return err
		}
	}
	if sb.memoryMB != spec.MemoryMB {
		if err := d.cg.setMemory(sb.cgroups, sb.memoryMB, spec.MemoryMB); err != nil {
			return err
		}
		sb.memoryMB = spec.MemoryMB
	}
	if !sb.pinned {
		sb.cpus = d.cpus.acquire(spec.MemoryMB)
		sb.pinned = true
		if len(sb.cpus) > 0 {
			// Placement only helps speed: a failure is logged.
			if err := cpuset.PinProcess(sb.rec.PID, sb.cpus); err != nil {
				sb.log.Warn("placing sandbox on its CPUs", "cpus", sb.cpus, "err", err)
			}
		}
	}
	sb.rec.Function, sb.rec.RevisionID = spec.Function, spec.RevisionID
	if err := hostproc.WriteRecord(sb.dir, sb.rec); err != nil {
		return err
	}
	// The image the init was started with is in the (renamed) directory;
	// for another size (never from the pool, whose shapes include it) the
	// init gets an image of its own.
	tmpImage, staged := filepath.Join(sb.dir, tmpDiskName(sb.tmpMB)), sb.tmpMB == spec.EphemeralMB && sb.tmpMB > 0
	if !staged {
		var err error
		if tmpImage, err = d.tmp.make(ctx, sb.dir, spec.EphemeralMB); err != nil {
			return err
		}
	}
	cfg, err := encodeConfig(&sandboxConfig{
		ID: spec.ID, Hostname: hostname(spec.ID), Root: filepath.Join(sb.dir, rootDirName),
		CodeDir: spec.CodeDir, RuntimeDir: spec.RuntimeDir,
		MemoryMB: spec.MemoryMB, EphemeralMB: spec.EphemeralMB,
		OwnNetwork: sb.ownsNetwork(), Nameservers: sb.nameservers(),
		TmpImage: tmpImage, TmpStaged: staged,
	})
	if err != nil {
		return err
	}
	if _, err := sb.conn.Write(cfg); err != nil {
		return sb.withStderr(fmt.Errorf("sending the sandbox its config: %w", err))
	}
	return sb.waitReady(ctx)
}

// connect attaches the sandbox's network namespace to the outside
// (Options.Network). The namespace is opened through the init's pid and
// then checked to be the init's: had the init died and its pid been
// reused, the link would go to a stranger.
func (sb *sandbox) connect(ctx context.Context) error {
	ns, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", sb.rec.PID))
	if err != nil {
		return fmt.Errorf("opening the sandbox's network namespace: %w", err)
	}
	defer ns.Close()
	if p, err := hostproc.Lookup(sb.rec.PID); err != nil || p.StartTime != sb.rec.StartTime {
		return fmt.Errorf("opening the sandbox's network namespace: its init is gone")
	}
	if sb.link, err = sb.d.opts.Network.Attach(ctx, int(ns.Fd())); err != nil {
		return fmt.Errorf("connecting the sandbox's network: %w", err)
	}
	return nil
}

// ownsNetwork: the sandbox has a network namespace of its own, with
// loopback only or, with Network, its link.
func (sb *sandbox) ownsNetwork() bool { return !sb.network || sb.d.opts.Network != nil }

// nameservers are the resolvers the sandbox's resolv.conf lists: those of
// its link (the host's, loopback ones left out); nil to copy the host's.
func (sb *sandbox) nameservers() []string {
	if sb.link == nil {
		return nil
	}
	out := []string{}
	for _, a := range sb.link.DNS {
		out = append(out, a.String())
	}
	return out
}

// rename names a warm sandbox's state directory and cgroups after the
// instance it becomes, so that everything of an instance is found by its
// ID (in logs, by an operator, by the conformance suite). The init has
// not built its root yet and holds nothing under the directory. Cgroup v2
// forbids renaming a cgroup: there the cgroups keep the sandbox's name
// (the record has their paths, so Recover finds them either way).
func (sb *sandbox) rename(id string) error {
	d := sb.d
	dir := filepath.Join(d.opts.StateDir, id)
	if err := os.Rename(sb.dir, dir); err != nil {
		return fmt.Errorf("renaming sandbox %s to %s: %w", sb.name, id, err)
	}
	sb.dir = dir
	if d.cg.version == 1 {
		renamed := make([]string, 0, len(sb.cgroups))
		for _, p := range sb.cgroups {
			np := filepath.Join(filepath.Dir(p), id)
			if err := os.Rename(p, np); err != nil {
				sb.log.Debug("keeping the sandbox's cgroup name", "cgroup", p, "err", err)
				np = p
			}
			renamed = append(renamed, np)
		}
		sb.cgroups = renamed
	}
	sb.rec.ID, sb.rec.Cgroups = id, sb.cgroups
	sb.name = id
	sb.log = d.log.With("sandbox", id)
	return hostproc.WriteRecord(sb.dir, sb.rec)
}

// waitReady waits for syncReady from the agent. The init exiting first
// ends the read with EOF, since the sandbox's end of the stream closes.
func (sb *sandbox) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = sb.conn.SetReadDeadline(time.Now()) })
	defer stop()
	var b [1]byte
	_, err := io.ReadFull(sb.conn, b[:])
	if !stop() {
		// The deadline was forced: the read (if it failed) failed for that.
		return fmt.Errorf("waiting for the sandbox agent: %w", context.Cause(ctx))
	}
	if err != nil {
		return sb.withStderr(fmt.Errorf("sandbox failed before its agent was ready: %w", err))
	}
	if b[0] != syncReady {
		return fmt.Errorf("sandbox agent sent %q instead of ready", b[0])
	}
	return nil
}

// withStderr adds what the init wrote to an error caused by its early
// death, waiting a moment for the last lines to arrive.
func (sb *sandbox) withStderr(err error) error {
	select {
	case <-sb.done:
	case <-time.After(time.Second):
	}
	if tail := sb.stderr.LastLines(); tail != "" {
		return fmt.Errorf("%w (sandbox said: %s)", err, tail)
	}
	return err
}

// destroy closes the stream, asks the sandbox to exit (SIGTERM to the init,
// which the agent gets), kills it after the grace period (killing a pid
// namespace's init kills the namespace), then removes the cgroups and the
// state directory, and gives back the CPUs. It runs to completion even
// when ctx is cancelled; ctx only shortens the grace period. Call it once.
func (sb *sandbox) destroy(ctx context.Context, grace time.Duration) error {
	var errs []error
	if sb.conn != nil {
		sb.conn.Close()
	}
	if sb.cmd != nil {
		// The closed stream already makes the agent exit; SIGTERM (Stop's
		// default request) covers an agent that is not reading it.
		if err := hostproc.Stop(ctx, sb.cmd.Process, sb.done, grace, nil); err != nil {
			errs = append(errs, fmt.Errorf("sandbox init: %w", err))
		}
	}
	if err := destroyCgroups(context.WithoutCancel(ctx), sb.cgroups, killTimeout); err != nil {
		errs = append(errs, err)
	}
	if err := sb.link.Close(); err != nil {
		errs = append(errs, err)
	}
	if err := removeStateDir(sb.dir); err != nil {
		errs = append(errs, err)
	}
	sb.d.cpus.release(sb.cpus)
	sb.cpus = nil
	return errors.Join(errs...)
}

// newStderrLog is the log of a sandbox's stdout and stderr: its init and
// agent write diagnostics there, as slog JSON records.
func newStderrLog(log *slog.Logger) *hostproc.LineLog {
	return hostproc.NewLineLog(log, hostproc.LineLogOptions{Msg: "sandbox output"})
}
