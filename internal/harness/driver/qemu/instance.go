package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// instance is one VM. Its fields are set by start and read-only once
// started is closed.
type instance struct {
	d   *Driver
	id  string
	dir string
	log *slog.Logger
	// uid is the user QEMU runs as (0: the driver's own).
	uid int

	cmd     *exec.Cmd
	conn    net.Conn
	console *hostproc.LineLog // the guest's serial console (QEMU's stdout)
	stderr  *hostproc.LineLog // QEMU's own diagnostics
	// done is closed when QEMU has exited (the only cmd.Wait).
	done chan struct{}
	// started is closed when Start has returned; cancelStart aborts it.
	started     chan struct{}
	cancelStart context.CancelFunc

	stopOnce syncOnceErr
}

var _ driver.Instance = (*instance)(nil)

func (i *instance) ID() string               { return i.id }
func (i *instance) Conn() io.ReadWriteCloser { return i.conn }
func (i *instance) Done() <-chan struct{}    { return i.done }

// PID is QEMU's pid.
func (i *instance) PID() int { return i.cmd.Process.Pid }

func (i *instance) start(ctx context.Context, spec driver.Spec) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	d := i.d
	rec := &record{
		ID: spec.ID, Function: spec.Function, RevisionID: spec.RevisionID,
		QEMU: d.opts.QEMUPath, UID: i.uid, AgentSocket: agentSock, QMPSocket: qmpSock,
		Created: time.Now().UTC(),
	}
	// Record first, then create: Recover must know of every VM.
	if err := os.Mkdir(i.dir, 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	disks, err := i.disks(ctx, spec)
	if err != nil {
		return err
	}
	cfg := vmConfig{
		ID: spec.ID, Accel: d.accel,
		MemoryMB: spec.MemoryMB, VCPUs: vcpusFor(spec.MemoryMB, d.hostCPUs),
		TSCkHz: d.tscKHz, KernelHz: d.kernelHz,
		Network: spec.Network,
	}
	launched := time.Now()
	if err := i.launch(cfg, disks); err != nil {
		return err
	}
	p, err := hostproc.Lookup(i.cmd.Process.Pid)
	if err != nil {
		return i.withOutput(fmt.Errorf("reading qemu start time: %w", err))
	}
	rec.PID, rec.StartTime = p.PID, p.StartTime
	if err := hostproc.WriteRecord(i.dir, rec); err != nil {
		return err
	}
	if err := i.waitReady(ctx); err != nil {
		return err
	}
	i.log.Debug("vm ready", "boot", time.Since(launched), "disks", launched.Sub(rec.Created), "config", cfg.String())
	return nil
}

// vmDisks are an instance's images.
type vmDisks struct {
	root, code, scratch string
}

// disks makes the root, code and scratch images.
func (i *instance) disks(ctx context.Context, spec driver.Spec) (vmDisks, error) {
	d := i.d
	rt := spec.Runtime
	root, err := d.images.Root(ctx, &rt)
	if err != nil {
		return vmDisks{}, fmt.Errorf("root image of %s: %w", spec.Runtime.ID, err)
	}
	key, err := codeKey(spec)
	if err != nil {
		return vmDisks{}, err
	}
	code, err := d.images.Code(ctx, spec.CodeDir, spec.RuntimeDir, key)
	if err != nil {
		return vmDisks{}, fmt.Errorf("code image: %w", err)
	}
	scratch := filepath.Join(i.dir, scratchImage)
	if err := d.images.Scratch(ctx, scratch, spec.EphemeralMB); err != nil {
		return vmDisks{}, fmt.Errorf("scratch image: %w", err)
	}
	if i.uid != 0 {
		// QEMU re-opens the scratch disk through its descriptor, which
		// checks the file's own permissions.
		if err := os.Chown(scratch, i.uid, i.uid); err != nil {
			return vmDisks{}, fmt.Errorf("handing the scratch image to the vm user: %w", err)
		}
	}
	return vmDisks{root: root, code: code, scratch: scratch}, nil
}

// codeKey names the code image in the cache: the deployment package's
// digest with the runtime directory it is paired with. A spec without a
// digest (tests, tools) gets a digest of the directory tree, so a cached
// image is never the wrong code.
func codeKey(spec driver.Spec) (string, error) {
	h := sha256.New()
	if spec.CodeSha256 != "" {
		fmt.Fprintf(h, "sha256:%s\n", spec.CodeSha256)
	} else if err := hashTree(h, spec.CodeDir); err != nil {
		return "", fmt.Errorf("hashing code directory: %w", err)
	}
	fmt.Fprintf(h, "runtime:")
	if spec.RuntimeDir != "" {
		if err := hashTree(h, spec.RuntimeDir); err != nil {
			return "", fmt.Errorf("hashing runtime directory: %w", err)
		}
	}
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil)), nil
}

// hashTree writes every entry of the tree at dir (path, mode, link target
// or content) to w.
func hashTree(w io.Writer, dir string) error {
	return filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := e.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%q %o\n", rel, fi.Mode())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "-> %q\n", t)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%d\n", fi.Size())
			_, err = io.Copy(w, f)
			f.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// launch binds the instance's sockets, opens its kernel and disks and
// starts QEMU with them as inherited descriptors, as the instance's own
// unprivileged user when the driver is root.
func (i *instance) launch(cfg vmConfig, disks vmDisks) error {
	d := i.d
	var files []*os.File
	defer func() {
		// QEMU has its copies; the driver's would keep a dead VM's
		// sockets accepting into a backlog nobody serves.
		for _, f := range files {
			f.Close()
		}
	}()
	for _, s := range []string{agentSock, qmpSock} {
		f, err := listenUnix(filepath.Join(i.dir, s))
		if err != nil {
			return err
		}
		files = append(files, f)
	}
	for _, p := range []string{d.opts.KernelPath, disks.root, disks.code} {
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("opening vm image: %w", err)
		}
		files = append(files, f)
	}
	f, err := os.OpenFile(disks.scratch, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening scratch image: %w", err)
	}
	files = append(files, f)

	cfg.ClockUnixMs = time.Now().UnixMilli()
	cmd := exec.Command(d.opts.QEMUPath, cfg.args()...)
	cmd.ExtraFiles = files // fdAgent, fdQMP, fdKernel, fdRoot, fdCode, fdScratch
	// QEMU needs nothing of the harness's directory or environment.
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	i.console = newConsoleLog(i.log.With("source", "console"))
	i.stderr = newQEMULog(i.log.With("source", "qemu"))
	cmd.Stdout = i.console
	cmd.Stderr = i.stderr
	// Bounds cmd.Wait if something kept the pipes open after QEMU died.
	cmd.WaitDelay = time.Second
	// Setsid: a terminal's Ctrl-C reaches only the server, which then
	// stops VMs in order. Pdeathsig: a harness that dies takes its VMs.
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	if i.uid != 0 {
		attr.Credential = &syscall.Credential{Uid: uint32(i.uid), Gid: uint32(i.uid), Groups: d.vmGroups}
	}
	cmd.SysProcAttr = attr
	i.log.Debug("starting vm", "config", cfg.String(), "uid", i.uid, "args", cmd.Args)
	if err := d.fork.Start(cmd); err != nil {
		return fmt.Errorf("starting qemu: %w", err)
	}
	i.cmd = cmd
	hostproc.Supervise(cmd, i.done, func(err error) {
		i.console.Flush()
		i.stderr.Flush()
		if err != nil {
			i.log.Info("vm exited", "err", err)
		}
	})
	return nil
}

// withOutput adds what QEMU and the guest console said last to an error
// caused by the VM's early death, waiting a moment for the last lines.
func (i *instance) withOutput(err error) error {
	select {
	case <-i.done:
	case <-time.After(time.Second):
	}
	var said []string
	if t := i.stderr.LastLines(); t != "" {
		said = append(said, "qemu said: "+t)
	}
	if t := i.console.LastLines(); t != "" {
		said = append(said, "console: "+t)
	}
	if len(said) == 0 {
		return err
	}
	return fmt.Errorf("%w (%s)", err, joinSaid(said))
}

func joinSaid(s []string) string {
	var b bytes.Buffer
	for n, x := range s {
		if n > 0 {
			b.WriteString("; ")
		}
		b.WriteString(x)
	}
	return b.String()
}

// waitReady connects to the agent socket and reads the guest's ready
// line, byte by byte so no byte of the protocol that follows is consumed.
// The socket is bound before QEMU starts, so the connection waits in its
// backlog until QEMU accepts it; QEMU exiting first resets it, which ends
// the wait with QEMU's output in the error.
func (i *instance) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeoutCause(ctx, i.d.opts.ReadyTimeout,
		fmt.Errorf("vm not ready within %s", i.d.opts.ReadyTimeout))
	defer cancel()
	conn, err := dialUnix(ctx, filepath.Join(i.dir, agentSock))
	if err != nil {
		if ctx.Err() != nil {
			return i.readyErr(ctx)
		}
		return i.withOutput(fmt.Errorf("connecting to the agent socket: %w", err))
	}
	i.conn = conn
	// QEMU's exit or ctx ends the read.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()
	go func() {
		select {
		case <-i.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	got := make([]byte, 0, len(readyLine))
	var b [1]byte
	for len(got) < len(readyLine) {
		if _, err := conn.Read(b[:]); err != nil {
			if ctx.Err() != nil {
				return i.readyErr(ctx)
			}
			return i.withOutput(fmt.Errorf("reading the agent's ready line: %w", err))
		}
		got = append(got, b[0])
		if b[0] != readyLine[len(got)-1] {
			return i.withOutput(fmt.Errorf("guest sent %q instead of its ready line", got))
		}
	}
	// The whole ready line arrived: the agent is up. If QEMU's exit or ctx
	// raced with the last byte, the read deadline may already be set: clear
	// it, since the connection is handed over; a VM that exited meanwhile
	// shows up through Done like any later exit.
	if !stop() {
		if err := conn.SetReadDeadline(time.Time{}); err != nil {
			return i.withOutput(fmt.Errorf("clearing the agent connection's deadline: %w", err))
		}
	}
	return nil
}

func (i *instance) readyErr(ctx context.Context) error {
	select {
	case <-i.done:
		return i.withOutput(errors.New("qemu exited before the guest was ready"))
	default:
	}
	err := fmt.Errorf("waiting for the guest agent: %w", context.Cause(ctx))
	if errors.Is(context.Cause(ctx), context.Canceled) || errors.Is(context.Cause(ctx), context.DeadlineExceeded) {
		return err // the caller gave up; the guest's output adds nothing
	}
	return i.withOutput(err)
}

// stop runs the teardown exactly once; concurrent callers wait for it.
func (i *instance) stop(ctx context.Context) error {
	return i.stopWithGrace(ctx, i.d.opts.StopGrace)
}

func (i *instance) stopWithGrace(ctx context.Context, grace time.Duration) error {
	i.cancelStart()
	<-i.started
	return i.stopOnce.do(func() error {
		err := i.destroy(ctx, grace)
		i.d.instances.Remove(i.id)
		// QEMU is dead (or destroy failed and the uid stays taken).
		if err == nil {
			i.d.releaseUID(i.uid)
		}
		return err
	})
}

// destroy closes the stream, asks QEMU to quit (QMP, else SIGTERM), kills
// it after the grace period, and removes the instance directory. The VM is
// never reused, so "graceful" only lets QEMU exit by itself; the guest's
// disks are read-only or thrown away. It runs to completion even when ctx
// is cancelled; ctx only shortens the grace period.
func (i *instance) destroy(ctx context.Context, grace time.Duration) error {
	var errs []error
	if i.conn != nil {
		i.conn.Close()
	}
	if i.cmd != nil {
		quit := func(grace time.Duration) { i.quit(ctx, grace) }
		if err := hostproc.Stop(ctx, i.cmd.Process, i.done, grace, quit); err != nil {
			errs = append(errs, fmt.Errorf("qemu: %w", err))
		}
	}
	if err := os.RemoveAll(i.dir); err != nil {
		errs = append(errs, fmt.Errorf("removing state directory: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("stopping vm %s: %w", i.id, err)
	}
	return nil
}

// quit asks QEMU to exit: QMP quit, or SIGTERM (which QEMU also treats as
// a request to quit) when QMP does not answer.
func (i *instance) quit(ctx context.Context, grace time.Duration) {
	select {
	case <-i.done:
		return
	default:
	}
	qctx, cancel := context.WithTimeout(ctx, min(grace, qmpQuitTimeout))
	defer cancel()
	q, err := dialQMP(qctx, filepath.Join(i.dir, qmpSock))
	if err == nil {
		err = q.Quit(qctx)
		q.Close()
	}
	if err != nil {
		i.log.Debug("qmp quit failed; sending SIGTERM", "err", err)
		_ = i.cmd.Process.Signal(syscall.SIGTERM)
	}
}
