package harness

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"

	"github.com/invokex/invokex/internal/codezip"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

// CodeSource hands out deployment packages by their CodeSha256 (base64
// SHA-256). The control plane's blob.Store satisfies it. Errors wrap
// errdefs kinds (ErrNotFound for an unknown digest).
type CodeSource interface {
	Open(ctx context.Context, digest string) (io.ReadCloser, error)
}

// codeCache unpacks each code revision once into dir/<hex sha256> and
// removes it when nothing uses it any more.
//
// A reference is held by every instance running the code and by every
// revision the pool still serves (so a function scaled to zero does not
// unpack its code again on the next cold start). The directory is removed
// when the last reference goes.
type codeCache struct {
	dir string
	src CodeSource
	log *slog.Logger

	mu      sync.Mutex
	entries map[string]*codeEntry // by hex digest
}

type codeEntry struct {
	path  string
	ready chan struct{} // closed once the leader's extraction ended
	err   error         // set before ready is closed
	refs  int
}

func newCodeCache(dir string, src CodeSource, log *slog.Logger) *codeCache {
	return &codeCache{dir: dir, src: src, log: log, entries: map[string]*codeEntry{}}
}

// digestKey converts a base64 CodeSha256 into the hex name of its directory.
// Anything that is not a SHA-256 is refused, so a digest can never name a
// path outside the cache.
func digestKey(digest string) (string, error) {
	sum, err := base64.StdEncoding.DecodeString(digest)
	if err != nil || len(sum) != sha256.Size {
		return "", errdefs.Invalid("code digest %q is not a base64 SHA-256", digest)
	}
	return hex.EncodeToString(sum), nil
}

// acquire returns the directory holding the code of digest, unpacking it if
// no one has yet, and takes one reference on it; release gives it back.
// Concurrent acquires of one digest unpack it once: the first caller does
// the work and the others wait for it (singleflight). A failed extraction is
// forgotten so a later acquire tries again.
func (c *codeCache) acquire(ctx context.Context, digest string) (dir, key string, err error) {
	key, err = digestKey(digest)
	if err != nil {
		return "", "", err
	}
	c.mu.Lock()
	e := c.entries[key]
	if e != nil {
		e.refs++
		c.mu.Unlock()
		select {
		case <-e.ready:
		case <-ctx.Done():
			c.dropRef(key, e)
			return "", "", ctx.Err()
		}
		if e.err != nil {
			// The leader removed the failed entry; nothing to release.
			return "", "", e.err
		}
		return e.path, key, nil
	}
	e = &codeEntry{path: filepath.Join(c.dir, key), ready: make(chan struct{}), refs: 1}
	c.entries[key] = e
	c.mu.Unlock()

	err = c.fetch(ctx, digest, e.path)

	c.mu.Lock()
	e.err = err
	if err != nil && c.entries[key] == e {
		delete(c.entries, key)
	}
	close(e.ready)
	c.mu.Unlock()
	if err != nil {
		return "", "", err
	}
	return e.path, key, nil
}

// retain takes one more reference on code already held by the caller.
func (c *codeCache) retain(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[key]; e != nil {
		e.refs++
	}
}

// release drops one reference and removes the directory with the last one.
// The directory is first renamed away under the lock, so a concurrent
// acquire of the same digest unpacks into a fresh directory instead of
// racing with the removal.
func (c *codeCache) release(key string) {
	c.mu.Lock()
	e := c.entries[key]
	c.mu.Unlock()
	if e != nil {
		c.dropRef(key, e)
	}
}

// dropRef drops one reference on e, which a failed extraction may already
// have taken out of the map.
func (c *codeCache) dropRef(key string, e *codeEntry) {
	c.mu.Lock()
	if c.entries[key] != e {
		c.mu.Unlock()
		return
	}
	e.refs--
	select {
	case <-e.ready:
	default:
		// Still extracting: the leader holds a reference, so refs > 0.
		c.mu.Unlock()
		return
	}
	if e.refs > 0 || e.err != nil {
		c.mu.Unlock()
		return
	}
	delete(c.entries, key)
	trash := e.path + ".trash-" + randomHex(4)
	renameErr := os.Rename(e.path, trash)
	c.mu.Unlock()
	if renameErr != nil {
		if !os.IsNotExist(renameErr) {
			c.log.Warn("removing unused code", "dir", e.path, "error", renameErr)
		}
		return
	}
	if err := os.RemoveAll(trash); err != nil {
		c.log.Warn("removing unused code", "dir", trash, "error", err)
	}
}

// fetch reads the package from the source, checks it against its digest and
// unpacks it into dir.
func (c *codeCache) fetch(ctx context.Context, digest, dir string) error {
	lim := codezip.DefaultLimits()
	rc, err := c.src.Open(ctx, digest)
	if err != nil {
		return fmt.Errorf("opening code %s: %w", digest, err)
	}
	data, err := io.ReadAll(io.LimitReader(rc, lim.MaxZipBytes+1))
	closeErr := rc.Close()
	if err != nil {
		return fmt.Errorf("reading code %s: %w", digest, err)
	}
	if closeErr != nil {
		return fmt.Errorf("reading code %s: %w", digest, closeErr)
	}
	if int64(len(data)) > lim.MaxZipBytes {
		return fmt.Errorf("code %s is over %d bytes: %w", digest, lim.MaxZipBytes, errdefs.ErrTooLarge)
	}
	// The store is trusted, but a corrupt blob must not run under another
	// revision's name.
	sum := sha256.Sum256(data)
	if got := base64.StdEncoding.EncodeToString(sum[:]); got != digest {
		return fmt.Errorf("code %s: content has digest %s", digest, got)
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return fmt.Errorf("creating code cache: %w", err)
	}
	// A directory left by a crashed extraction or a failed removal would
	// make Extract refuse; the entry map says no one uses it.
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("clearing code dir %s: %w", dir, err)
	}
	if err := codezip.Extract(ctx, data, dir, lim); err != nil {
		return fmt.Errorf("unpacking code %s: %w", digest, err)
	}
	return nil
}

// runtimeCache writes each runtime family's support files once into
// dir/<family>-<content hash>. Directories are content-addressed and
// written atomically (temp dir, then rename), so one left by an earlier
// harness is reused as it is.
type runtimeCache struct {
	dir   string
	files func(runtimes.Family) fs.FS

	mu      sync.Mutex
	entries map[runtimes.Family]*runtimeEntry
}

type runtimeEntry struct {
	ready chan struct{}
	path  string
	err   error
}

func newRuntimeCache(dir string, files func(runtimes.Family) fs.FS) *runtimeCache {
	return &runtimeCache{dir: dir, files: files, entries: map[runtimes.Family]*runtimeEntry{}}
}

// dirFor returns the host directory of family's support files, "" when the
// family needs none. Concurrent callers materialise it once.
func (c *runtimeCache) dirFor(ctx context.Context, family runtimes.Family) (string, error) {
	c.mu.Lock()
	e := c.entries[family]
	if e != nil {
		c.mu.Unlock()
		select {
		case <-e.ready:
			return e.path, e.err
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	e = &runtimeEntry{ready: make(chan struct{})}
	c.entries[family] = e
	c.mu.Unlock()

	e.path, e.err = c.materialize(family)

	c.mu.Lock()
	if e.err != nil {
		delete(c.entries, family)
	}
	close(e.ready)
	c.mu.Unlock()
	return e.path, e.err
}

func (c *runtimeCache) materialize(family runtimes.Family) (string, error) {
	fsys := c.files(family)
	if fsys == nil {
		return "", nil
	}
	sum, err := hashFS(fsys)
	if err != nil {
		return "", fmt.Errorf("hashing %s runtime files: %w", family, err)
	}
	dest := filepath.Join(c.dir, string(family)+"-"+sum[:16])
	if _, err := os.Stat(dest); err == nil {
		return dest, nil
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return "", fmt.Errorf("creating runtime cache: %w", err)
	}
	tmp, err := os.MkdirTemp(c.dir, ".tmp-")
	if err != nil {
		return "", fmt.Errorf("creating runtime cache: %w", err)
	}
	if err := writeFS(fsys, tmp); err != nil {
		_ = os.RemoveAll(tmp)
		return "", fmt.Errorf("writing %s runtime files: %w", family, err)
	}
	if err := os.Rename(tmp, dest); err != nil {
		_ = os.RemoveAll(tmp)
		if _, statErr := os.Stat(dest); statErr == nil {
			return dest, nil
		}
		return "", fmt.Errorf("installing %s runtime files: %w", family, err)
	}
	return dest, nil
}

// hashFS returns the hex SHA-256 of every path, kind, executable bit and
// content in fsys, in walk (lexical) order.
func hashFS(fsys fs.FS) (string, error) {
	h := sha256.New()
	err := fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		var hdr [9]byte
		hdr[0] = 'f'
		if d.IsDir() {
			hdr[0] = 'd'
		} else if info.Mode()&0o111 != 0 {
			hdr[0] = 'x'
		}
		binary.BigEndian.PutUint64(hdr[1:], uint64(len(p)))
		h.Write(hdr[:])
		h.Write([]byte(p))
		if d.IsDir() {
			return nil
		}
		data, err := fs.ReadFile(fsys, p)
		if err != nil {
			return err
		}
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(data)))
		h.Write(n[:])
		h.Write(data)
		return nil
	})
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeFS copies fsys into dir. Files are world-readable (the sandbox user
// is not root) and keep their executable bit.
func writeFS(fsys fs.FS, dir string) error {
	if err := os.Chmod(dir, 0o755); err != nil {
		return err
	}
	return fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == "." {
			return nil
		}
		if !fs.ValidPath(p) || strings.Contains(p, "\\") || path.Clean(p) != p {
			return fmt.Errorf("invalid path %q", p)
		}
		target := filepath.Join(dir, filepath.FromSlash(p))
		if d.IsDir() {
			return os.Mkdir(target, 0o755)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s: only regular files are supported", p)
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if info.Mode()&0o111 != 0 {
			mode = 0o755
		}
		data, err := fs.ReadFile(fsys, p)
		if err != nil {
			return err
		}
		f, err := os.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return err
		}
		if _, err := io.Copy(f, bytes.NewReader(data)); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
		// Defeat the umask: the sandbox user must read (and run) them.
		return os.Chmod(target, mode)
	})
}
