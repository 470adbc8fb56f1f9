package bench

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// child is a process the benchmark started (an InvokeX server or an RIE) in
// its own process group, with its output in a log file. stop ends the whole
// group, so nothing it started outlives the benchmark.
type child struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	logFile *os.File
	done    chan struct{}
	waitErr error
	once    sync.Once
}

// startChild starts argv with env in dir, output (stdout and stderr) to
// logPath, in a new process group.
func startChild(name string, argv, env []string, dir, logPath string) (*child, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("creating log of %s: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Dir = dir
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, logPath: logPath, logFile: f, done: make(chan struct{})}
	go func() {
		c.waitErr = cmd.Wait()
		f.Close()
		close(c.done)
	}()
	return c, nil
}

// pid is the child's process id.
func (c *child) pid() int { return c.cmd.Process.Pid }

// alive reports whether the child has not exited.
func (c *child) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

// stop sends SIGTERM to the child, waits up to grace for it to exit, then
// kills its whole process group (grace <= 0: kills at once). It is
// idempotent and safe to call after the child died by itself.
func (c *child) stop(grace time.Duration) error {
	var err error
	c.once.Do(func() {
		pgid := c.cmd.Process.Pid
		if c.alive() && grace > 0 {
			_ = c.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-c.done:
			case <-time.After(grace):
				err = fmt.Errorf("%s did not stop within %s after SIGTERM; killed", c.name, grace)
			}
		}
		// Whatever is left in the group (RIE's function process, which RIE
		// does not kill when it dies) goes with it.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-c.done
	})
	return err
}

// logTail returns the last n bytes of the child's log.
func (c *child) logTail(n int) string {
	b, err := os.ReadFile(c.logPath)
	if err != nil {
		return ""
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return strings.TrimSpace(string(b))
}

// freePort returns a loopback TCP address nobody listens on right now.
func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// waitListening waits until addr accepts TCP connections, c exits, or
// timeout passes.
func waitListening(ctx context.Context, c *child, addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		conn, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		if !c.alive() {
			return fmt.Errorf("%s exited before listening on %s: %s", c.name, addr, lastLine(c.logTail(2000)))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not listening on %s after %s", c.name, addr, timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
}

// environWithout returns os.Environ() without the named variables.
func environWithout(names ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		drop := false
		for _, n := range names {
			if k == n {
				drop = true
			}
		}
		if !drop {
			out = append(out, kv)
		}
	}
	return out
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// mountsUnder returns the mount points at or below dir, from mountinfo.
func mountsUnder(mountinfo []byte, dir string) []string {
	dir = filepath.Clean(dir)
	var out []string
	for _, line := range bytes.Split(mountinfo, []byte("\n")) {
		f := strings.Fields(string(line))
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// safeRemoveAll removes dir unless something is still mounted below it:
// a sandbox root left mounted by a crashed server may be a bind mount of a
// host directory, and RemoveAll would walk into it.
func safeRemoveAll(dir string) error {
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("reading mountinfo before removing %s: %w", dir, err)
	}
	return removeUnlessMounted(dir, mi)
}

// removeUnlessMounted removes dir unless mountinfo lists a mount at or
// below it.
func removeUnlessMounted(dir string, mountinfo []byte) error {
	if m := mountsUnder(mountinfo, dir); len(m) > 0 {
		return fmt.Errorf("not removing %s: %d mounts below it (first %s)", dir, len(m), m[0])
	}
	return os.RemoveAll(dir)
}
