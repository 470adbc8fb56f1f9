// Package fsblob implements blob.Store on a local directory.
//
// Layout under the root directory:
//
//	sha256/ab/abcdef...   one file per blob, named by the hex SHA-256 of its
//	                      content and sharded by its first byte
//	tmp/put-*             Puts in progress
//
// Keys are base64 SHA-256 digests (Lambda's CodeSha256); the hex file name is
// derived from the decoded 32 bytes, never from the caller's string, so no
// key can name a path outside the directory.
//
// A Put writes a temporary file, fsyncs it and renames it into place, so a
// blob file is either absent or complete. A directory belongs to one Store at
// a time: New removes the temporary files that a crashed Put left behind.
package fsblob

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/invokex/invokex/internal/controlplane/blob"
	"github.com/invokex/invokex/internal/errdefs"
)

const (
	blobDir = "sha256"
	tmpDir  = "tmp"
	// chunk is how much Put copies between checks of its context.
	chunk = 256 << 10
)

// Store is a blob.Store rooted at a directory. It is safe for concurrent use.
type Store struct {
	root string
}

var _ blob.Store = (*Store)(nil)

// New opens the store rooted at dir, creating it if needed, and removes the
// temporary files of Puts that a crash interrupted.
func New(dir string) (*Store, error) {
	if dir == "" {
		return nil, errdefs.Invalid("blob store directory must be set")
	}
	root, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving blob store directory %s: %w", dir, err)
	}
	s := &Store{root: root}
	for _, d := range []string{blobDir, tmpDir} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("creating blob store directory: %w", err)
		}
	}
	if err := s.removeTemps(); err != nil {
		return nil, err
	}
	return s, nil
}

// removeTemps deletes everything in tmp/: no Put is running yet.
func (s *Store) removeTemps() error {
	dir := filepath.Join(s.root, tmpDir)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("listing blob store temporary files: %w", err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("removing stale temporary blob: %w", err)
		}
	}
	return nil
}

// Put streams r into a temporary file while hashing it, then renames the file
// to its digest. If the blob exists already the temporary file is dropped and
// the existing blob kept. Cancelling ctx stops the copy between chunks; any
// failure removes the temporary file.
func (s *Store) Put(ctx context.Context, r io.Reader) (digest string, size int64, retErr error) {
	if err := ctx.Err(); err != nil {
		return "", 0, fmt.Errorf("storing blob: %w", err)
	}
	f, err := os.CreateTemp(filepath.Join(s.root, tmpDir), "put-*")
	if err != nil {
		return "", 0, fmt.Errorf("storing blob: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if f != nil {
			_ = f.Close() // already failing; the close error adds nothing
		}
		if retErr != nil {
			_ = os.Remove(tmp)
		}
	}()

	h := sha256.New()
	size, err = copyCtx(ctx, io.MultiWriter(f, h), r)
	if err != nil {
		return "", 0, fmt.Errorf("storing blob: %w", err)
	}
	if err := f.Chmod(0o644); err != nil {
		return "", 0, fmt.Errorf("storing blob: %w", err)
	}
	if err := f.Sync(); err != nil {
		return "", 0, fmt.Errorf("storing blob: syncing: %w", err)
	}
	err = f.Close()
	f = nil
	if err != nil {
		return "", 0, fmt.Errorf("storing blob: %w", err)
	}

	sum := h.Sum(nil)
	digest = base64.StdEncoding.EncodeToString(sum)
	final := s.path(sum)
	if _, err := os.Stat(final); err == nil {
		// Same content, same name: keep the blob that is there.
		if err := os.Remove(tmp); err != nil {
			return "", 0, fmt.Errorf("storing blob %s: removing duplicate: %w", digest, err)
		}
		return digest, size, nil
	}
	shard := filepath.Dir(final)
	if err := os.MkdirAll(shard, 0o755); err != nil {
		return "", 0, fmt.Errorf("storing blob %s: %w", digest, err)
	}
	// A concurrent Put of the same content may rename first; renaming over
	// its identical file is harmless, and readers keep the inode they opened.
	if err := os.Rename(tmp, final); err != nil {
		return "", 0, fmt.Errorf("storing blob %s: %w", digest, err)
	}
	// The rename is durable only once the directory entry is on disk.
	if err := syncDir(shard); err != nil {
		return "", 0, fmt.Errorf("storing blob %s: %w", digest, err)
	}
	return digest, size, nil
}

// copyCtx copies src to dst in chunks, stopping when ctx is done.
func copyCtx(ctx context.Context, dst io.Writer, src io.Reader) (int64, error) {
	buf := make([]byte, chunk)
	var n int64
	for {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		m, err := src.Read(buf)
		if m > 0 {
			w, werr := dst.Write(buf[:m])
			n += int64(w)
			if werr != nil {
				return n, werr
			}
		}
		if errors.Is(err, io.EOF) {
			// A reader may return data and EOF together; honour a
			// cancellation that came while it read.
			return n, ctx.Err()
		}
		if err != nil {
			return n, fmt.Errorf("reading content: %w", err)
		}
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Open returns the blob's file. ErrNotFound if absent, ErrInvalidParameter
// if digest is not a base64 SHA-256.
func (s *Store) Open(ctx context.Context, digest string) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("opening blob: %w", err)
	}
	sum, err := parseDigest(digest)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(s.path(sum))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("blob %s: %w", digest, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("opening blob %s: %w", digest, err)
	}
	return f, nil
}

// Delete removes the blob; deleting a missing blob succeeds. Readers that
// opened it keep reading it. ErrInvalidParameter if digest is malformed.
func (s *Store) Delete(ctx context.Context, digest string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	sum, err := parseDigest(digest)
	if err != nil {
		return err
	}
	if err := os.Remove(s.path(sum)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting blob %s: %w", digest, err)
	}
	return nil
}

// parseDigest decodes a canonical base64 (standard encoding, padded)
// SHA-256 digest.
func parseDigest(digest string) ([]byte, error) {
	sum, err := base64.StdEncoding.Strict().DecodeString(digest)
	if err != nil || len(sum) != sha256.Size || base64.StdEncoding.EncodeToString(sum) != digest {
		shown := digest
		if len(shown) > 64 {
			shown = shown[:64] + "..."
		}
		return nil, errdefs.Invalid("code digest %q is not a base64 SHA-256", shown)
	}
	return sum, nil
}

// path is where the blob with this SHA-256 lives.
func (s *Store) path(sum []byte) string {
	name := hex.EncodeToString(sum)
	return filepath.Join(s.root, blobDir, name[:2], name)
}
