// Package guest builds what a microVM boots: the guest kernel, the runtime
// root images, the per-revision code images and the per-instance scratch
// disks. Drivers (QEMU microvm, Firecracker) call it; nothing here starts a
// VM.
//
// # Cache layout
//
// Everything lives under one cache directory (DefaultCacheDir):
//
//	kernel/<hash>/vmlinux       the guest kernel, by hash of recipe and source
//	kernel/<hash>/config        the .config it was built with
//	roots/<runtime>/<digest>/   root trees (debootstrapped or imported)
//	roots/<runtime>/current     name of the tree RootImage uses for <runtime>
//	images/<runtime>-<digest>.ext4   root images (tree + agent)
//	code/<key>.ext4             code images, by the caller's key
//	locks/                      flock files that serialise builds
//
// Every artefact is written under a temporary name and renamed into place,
// so a reader never sees a partial file, and each build holds a lock file so
// that concurrent callers (two harnesses, a test and a CLI) build once and
// the others wait. Artefacts are immutable once renamed: a changed input
// gives a new digest and a new file.
//
// # Disks a VM gets
//
// The driver attaches, in this order: root (vda, read-only), code (vdb,
// read-only: task/ and runtime/) and scratch (vdc, read-write, /tmp).
// Package vminit, PID 1 of the guest, mounts them.
package guest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultCacheDir is $INVOKEX_CACHE_DIR, or /var/cache/invokex.
func DefaultCacheDir() string {
	if d := os.Getenv("INVOKEX_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/invokex"
}

// lockPoll is how often a waiting builder retries a held lock.
const lockPoll = 200 * time.Millisecond

// lock takes an exclusive flock on cacheDir/locks/<name>.lock, waiting
// (honouring ctx) while another process or goroutine holds it. The lock
// dies with the process, so a crashed builder never wedges the next one.
func lock(ctx context.Context, cacheDir, name string) (unlock func(), err error) {
	dir := filepath.Join(cacheDir, "locks")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating lock directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, name+".lock"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening lock %s: %w", name, err)
	}
	for {
		// flock locks belong to the open file description, so two
		// goroutines of one process exclude each other too.
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", name, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for lock %s: %w", name, ctx.Err())
		case <-time.After(lockPoll):
		}
	}
}

// exists reports whether path is a regular file.
func exists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}

// run runs a command, killing its whole process group when ctx is done, and
// returns an error that carries the tail of its output. Output also goes to
// log when non-nil.
func run(ctx context.Context, log io.Writer, dir string, env []string, name string, args ...string) error {
	var out tailBuffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	if env != nil {
		cmd.Env = env
	}
	w := io.Writer(&out)
	if log != nil {
		w = io.MultiWriter(&out, log)
	}
	cmd.Stdout, cmd.Stderr = w, w
	// make and debootstrap fork deep trees: kill the group, not just the leader.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return unix.Kill(-cmd.Process.Pid, unix.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("running %s: %w", name, ctx.Err())
		}
		tail := strings.TrimSpace(out.String())
		if tail != "" {
			return fmt.Errorf("running %s: %w: %s", name, err, tail)
		}
		return fmt.Errorf("running %s: %w", name, err)
	}
	return nil
}

// tailBuffer keeps the last few KiB written to it.
type tailBuffer struct{ b []byte }

const tailMax = 4 << 10

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > 2*tailMax {
		t.b = append(t.b[:0], t.b[len(t.b)-tailMax:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	if len(t.b) > tailMax {
		return "..." + string(t.b[len(t.b)-tailMax:])
	}
	return string(t.b)
}

// fileSHA256 returns the hex SHA-256 of a file's content.
func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hashing %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// fileIdentity is what tells a file's content changed without reading
// it: a rewrite or replacement changes the inode, size or ctime.
type fileIdentity struct {
	path               string
	dev, ino           uint64
	size, mtime, ctime int64
}

// sums caches fileSHA256 of files by identity (see cachedSHA256).
var sums sync.Map // fileIdentity -> string

// cachedSHA256 is fileSHA256 remembered while the file stays the same:
// RootImage hashes the agent binary on every cold start of a VM, which
// is milliseconds of CPU for an answer that changes only with the binary.
func cachedSHA256(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", err
	}
	id := fileIdentity{path: path, dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim.Nano(), ctime: st.Ctim.Nano()}
	if sum, ok := sums.Load(id); ok {
		return sum.(string), nil
	}
	sum, err := fileSHA256(path)
	if err != nil {
		return "", err
	}
	sums.Store(id, sum)
	return sum, nil
}

// digest hashes parts (each length-prefixed, so boundaries count) into a
// short hex name for cache entries.
func digest(parts ...[]byte) string {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:", len(p))
		h.Write(p)
	}
	return hex.EncodeToString(h.Sum(nil))[:20]
}

// copyFile copies src to dst (created with mode) through a temporary name.
func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("copying %s: %w", src, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), dst)
}

// writeFileAtomic writes data to path through a temporary name.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, bytes.NewReader(data)); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
