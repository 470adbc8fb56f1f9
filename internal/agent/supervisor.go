package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/cpuset"
)

// Limits applied to every runtime, as in Lambda.
const (
	runtimeNoFile = 1024
	// killWait bounds how long the agent waits for a SIGKILLed runtime to be
	// reaped (a process stuck in uninterruptible sleep can take a while).
	killWait = 10 * time.Second
)

// procSpec describes the runtime process to start.
type procSpec struct {
	argv []string
	env  []string
	dir  string
	// uid and gid are applied when either is nonzero and the agent is root.
	uid, gid int
	// output receives the process's stdout and stderr.
	output *os.File
}

// process is a started runtime. done is closed once the process has exited
// and been reaped; ws and ru are valid after that.
type process struct {
	pid  int
	done chan struct{}
	ws   unix.WaitStatus
	ru   unix.Rusage
	// reapMu is held while the process is reaped, so that a signal sent
	// under it never reaches a pid that was reaped and then reused.
	reapMu *sync.Mutex
}

// exited reports whether the process has been reaped.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// supervisor starts runtime processes and is the only code in the agent
// that waits for children, so no exit status is ever stolen.
//
// As PID 1 of a pid namespace (pid1) the agent inherits every orphan in the
// sandbox and must reap them, so one reaper goroutine owns all wait4 calls:
// on each SIGCHLD it reaps every exited child and hands the status of a
// tracked runtime to its process. mu is held across fork+register and
// across each reaping pass, so a runtime cannot be reaped before it is
// tracked.
//
// Otherwise (tests, or an agent that is not PID 1) the agent must not reap
// children it did not start, so each runtime gets a goroutine waiting for
// exactly its pid.
type supervisor struct {
	pid1 bool
	log  *slog.Logger
	// runtimeCPUs, if set, is the affinity runtimes start with (see
	// Options.SplitCPUs); set before the first start.
	runtimeCPUs []int

	mu    sync.Mutex
	procs map[int]*process // pid1 only: runtimes awaiting their exit status

	sigs chan os.Signal
	stop chan struct{}
	wg   sync.WaitGroup
}

// newSupervisor returns a supervisor; with pid1 it starts the reaper.
// close must be called.
func newSupervisor(pid1 bool, log *slog.Logger) *supervisor {
	s := &supervisor{pid1: pid1, log: log, stop: make(chan struct{})}
	if pid1 {
		// A PID 1 agent owns its sandbox, so it takes the runtime's limits
		// itself and every child inherits them from the fork on: prlimit on
		// the runtime after exec needs CAP_SYS_RESOURCE once the runtime
		// runs under another uid, which some hosts withhold even from root.
		if err := lowerOwnLimits(); err != nil {
			log.Warn("lowering the sandbox's resource limits", "err", err)
		}
		s.procs = make(map[int]*process)
		s.sigs = make(chan os.Signal, 1)
		signal.Notify(s.sigs, syscall.SIGCHLD)
		s.wg.Add(1)
		go s.reap()
	}
	return s
}

// start forks and execs the runtime in its own process group, with
// Pdeathsig SIGKILL, stdin from /dev/null and stdout+stderr into
// spec.output, then applies the runtime's resource limits.
//
// The limits are set with prlimit(2) right after exec rather than in the
// agent before fork, which would also constrain the agent; a process the
// runtime forks within microseconds of starting keeps the agent's limits.
func (s *supervisor) start(spec procSpec) (*process, error) {
	if len(spec.argv) == 0 || spec.argv[0] == "" {
		return nil, errors.New("no runtime command")
	}
	path, err := lookPath(spec.argv[0], spec.env)
	if err != nil {
		return nil, err
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", os.DevNull, err)
	}
	defer devnull.Close()
	sys := &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if (spec.uid != 0 || spec.gid != 0) && os.Geteuid() == 0 {
		sys.Credential = &syscall.Credential{Uid: uint32(spec.uid), Gid: uint32(spec.gid), Groups: []uint32{}}
	}
	attr := &syscall.ProcAttr{
		Dir:   spec.dir,
		Env:   spec.env,
		Files: []uintptr{devnull.Fd(), spec.output.Fd(), spec.output.Fd()},
		Sys:   sys,
	}

	// Pdeathsig fires when the forking *thread* exits, not the process.
	// Locking keeps this goroutine on one thread while forking; Go only ends
	// threads whose goroutine exits while locked, so the thread outlives
	// the child.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if s.pid1 {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	var pid int
	err = cpuset.OnThread(s.runtimeCPUs, func() (err error) {
		pid, err = syscall.ForkExec(path, spec.argv, attr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("fork/exec %s: %w", path, err)
	}
	p := &process{pid: pid, done: make(chan struct{})}
	if s.pid1 {
		p.reapMu = &s.mu
		s.procs[pid] = p
	} else {
		p.reapMu = new(sync.Mutex)
		s.wg.Add(1)
		go s.wait(p)
	}
	if err := limitRuntime(pid); err != nil {
		s.log.Warn("limiting runtime", "pid", pid, "err", err)
	}
	return p, nil
}

// wait waits for p alone (not PID 1). It learns of the exit without
// reaping first, so the runtime's pid still names its process group while
// the group is killed: no stray child of the runtime survives it and no
// unrelated process that reused the pid can be hit.
func (s *supervisor) wait(p *process) {
	defer s.wg.Done()
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, p.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	p.reapMu.Lock()
	defer p.reapMu.Unlock()
	_ = unix.Kill(-p.pid, unix.SIGKILL)
	for {
		_, err := unix.Wait4(p.pid, &p.ws, 0, &p.ru)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	close(p.done)
}

// reap is the PID 1 reaper loop.
func (s *supervisor) reap() {
	defer s.wg.Done()
	for {
		s.reapAll()
		select {
		case <-s.stop:
			return
		case <-s.sigs:
		}
	}
}

// reapAll reaps every exited child, orphans included, and dispatches the
// status of tracked runtimes.
func (s *supervisor) reapAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		var ws unix.WaitStatus
		var ru unix.Rusage
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, &ru)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if p := s.procs[pid]; p != nil {
			delete(s.procs, pid)
			p.ws, p.ru = ws, ru
			close(p.done)
		}
	}
}

// kill SIGKILLs the runtime's process group and, as PID 1, every other
// process in the sandbox (kill(-1) spares only the caller), so nothing the
// function started survives a reset. It does not wait; see awaitExit.
func (s *supervisor) kill(p *process) {
	p.reapMu.Lock()
	if !p.exited() {
		// Not yet reaped, so p.pid still identifies the runtime and its group.
		_ = unix.Kill(-p.pid, unix.SIGKILL)
		_ = unix.Kill(p.pid, unix.SIGKILL)
	}
	p.reapMu.Unlock()
	if s.pid1 {
		_ = unix.Kill(-1, unix.SIGKILL)
	}
}

// awaitExit waits (bounded by killWait) for a killed process to be reaped.
func awaitExit(p *process) error {
	t := time.NewTimer(killWait)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
		return fmt.Errorf("runtime pid %d not reaped %s after SIGKILL", p.pid, killWait)
	}
}

// close stops the reaper (PID 1) and waits for every waiter goroutine. All
// started processes must have been killed and reaped before.
func (s *supervisor) close() {
	if s.pid1 {
		signal.Stop(s.sigs)
	}
	close(s.stop)
	s.wg.Wait()
}

// runtimeOOMScoreAdj is the runtime's oom_score_adj, which its processes
// inherit: the most the kernel allows, so that an OOM (in the sandbox's
// memory cgroup, or host-wide) kills the function's processes before the
// agent and before anything of the host. Raising a score needs no
// privilege, where protecting the agent with a negative one needs
// CAP_SYS_RESOURCE, which some hosts withhold. It is set right after the
// exec (it is per process, so the forking thread cannot carry it as it
// carries the CPUs): a child forked in those microseconds keeps the
// agent's score.
const runtimeOOMScoreAdj = 1000

// limitRuntime applies Lambda's limits to a freshly started runtime: 1024
// file descriptors, no core dumps, and runtimeOOMScoreAdj.
func limitRuntime(pid int) error {
	var errs []error
	var cur unix.Rlimit
	if inheritedLimits() {
		// Nothing to do: the runtime inherited them from the agent.
	} else if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &cur); err != nil {
		errs = append(errs, fmt.Errorf("reading RLIMIT_NOFILE: %w", err))
	} else {
		n := min(cur.Max, runtimeNoFile)
		if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: n, Max: n}, nil); err != nil {
			errs = append(errs, fmt.Errorf("setting RLIMIT_NOFILE: %w", err))
		}
	}
	if !inheritedLimits() {
		if err := unix.Prlimit(pid, unix.RLIMIT_CORE, &unix.Rlimit{}, nil); err != nil {
			errs = append(errs, fmt.Errorf("setting RLIMIT_CORE: %w", err))
		}
	}
	if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", []byte(strconv.Itoa(runtimeOOMScoreAdj)), 0); err != nil {
		errs = append(errs, fmt.Errorf("setting oom_score_adj: %w", err))
	}
	return errors.Join(errs...)
}

// lookPath resolves a command without a slash in the runtime's PATH (from
// its environment, else the agent's), as execve(2) does not search.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	pathVar, found := "", false
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar, found = v, true
		}
	}
	if !found {
		pathVar = os.Getenv("PATH")
	}
	for _, dir := range filepath.SplitList(pathVar) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q: executable file not found in $PATH", name)
}

// lowerOwnLimits sets the agent's own RLIMIT_NOFILE and RLIMIT_CORE to the
// runtime's. syscall.Setrlimit (not x/sys) is used because it also stops Go
// from restoring the start-up NOFILE soft limit in children.
func lowerOwnLimits() error {
	var nofile syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &nofile); err != nil {
		return fmt.Errorf("reading RLIMIT_NOFILE: %w", err)
	}
	n := min(nofile.Max, runtimeNoFile)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n}); err != nil {
		return fmt.Errorf("setting RLIMIT_NOFILE: %w", err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_CORE, &syscall.Rlimit{}); err != nil {
		return fmt.Errorf("setting RLIMIT_CORE: %w", err)
	}
	return nil
}

// inheritedLimits reports whether the agent's own limits are already the
// runtime's, so a child inherits them without prlimit.
func inheritedLimits() bool {
	var nofile, core syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &nofile) != nil || syscall.Getrlimit(syscall.RLIMIT_CORE, &core) != nil {
		return false
	}
	return nofile.Max <= runtimeNoFile && nofile.Cur == nofile.Max && core.Max == 0
}
