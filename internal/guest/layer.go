package guest

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/errdefs"
)

// OCI whiteouts: a layer deletes a lower layer's "x" with ".wh.x", and
// hides all of a directory's lower content with ".wh..wh..opq" in it.
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// decompress returns a reader of the uncompressed tar stream in r: gzip
// and plain tar are recognised by their magic bytes, whatever the media
// type claims.
func decompress(r io.Reader) (io.Reader, func() error, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	magic, _ := br.Peek(4)
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("reading gzip layer: %w", err)
		}
		return zr, zr.Close, nil
	case len(magic) == 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd:
		return nil, nil, fmt.Errorf("zstd-compressed layers are not supported; re-save the image with gzip layers: %w", errdefs.ErrInvalidParameter)
	}
	return br, func() error { return nil }, nil
}

// applyLayer extracts one (possibly compressed) layer tar into the tree,
// honouring whiteouts. Ownership is kept when running as root.
func applyLayer(ctx context.Context, r *treeRoot, layer io.Reader) error {
	tr0, closeZ, err := decompress(layer)
	if err != nil {
		return err
	}
	defer closeZ()
	tr := tar.NewReader(tr0)
	// Paths this layer created: an opaque whiteout hides only what lower
	// layers put in the directory.
	created := map[string]bool{}
	root := os.Geteuid() == 0
	for n := 0; ; n++ {
		if n%256 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading layer: %w", err)
		}
		rel := clean(h.Name)
		if rel == "" {
			continue // the root itself: keep ours
		}
		dir, base := path.Split(rel)
		dir = strings.TrimSuffix(dir, "/")
		if base == whiteoutOpaque {
			if err := opaque(r, dir, created); err != nil {
				return err
			}
			continue
		}
		if name, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
			if err := whiteout(r, path.Join(dir, name)); err != nil {
				return err
			}
			continue
		}
		if err := extractEntry(r, tr, h, rel, root); err != nil {
			return fmt.Errorf("extracting /%s: %w", rel, err)
		}
		created[rel] = true
	}
}

// whiteout removes rel from the tree.
func whiteout(r *treeRoot, rel string) error {
	pfd, base, err := r.parent(rel)
	if err != nil {
		return err
	}
	defer closeFD(pfd)
	return removeAt(pfd, base)
}

// opaque empties dir of everything this layer did not create.
func opaque(r *treeRoot, dir string, created map[string]bool) error {
	fd, err := r.mkdirAll(dir)
	if err != nil {
		return err
	}
	closeFD(fd)
	dfd, err := r.open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return err
	}
	defer closeFD(dfd)
	return clearDirExcept(dfd, func(name string) bool { return created[path.Join(dir, name)] })
}

// extractEntry creates one tar entry at rel.
func extractEntry(r *treeRoot, tr *tar.Reader, h *tar.Header, rel string, root bool) error {
	pfd, base, err := r.parent(rel)
	if err != nil {
		return err
	}
	defer closeFD(pfd)
	mode := uint32(h.Mode) & 0o7777
	if h.Typeflag != tar.TypeDir {
		// Whatever a lower layer had at rel is replaced (a directory only
		// by a directory, which merges).
		if err := removeAt(pfd, base); err != nil {
			return err
		}
	} else {
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err := removeAt(pfd, base); err != nil {
				return err
			}
		}
	}
	switch h.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(pfd, base, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return err
		}
	case tar.TypeReg, tar.TypeRegA:
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), base)
		_, err = io.Copy(f, tr)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(h.Linkname, pfd, base); err != nil {
			return err
		}
	case tar.TypeLink:
		target := clean(h.Linkname)
		tdir, tbase := path.Split(target)
		tfd, err := r.open(tdir, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return err
		}
		err = unix.Linkat(tfd, tbase, pfd, base, 0)
		closeFD(tfd)
		return err // a hard link shares the target's owner, mode and times
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if !root {
			return nil // only root may make device nodes; a root image needs none
		}
		kind := map[byte]uint32{tar.TypeChar: unix.S_IFCHR, tar.TypeBlock: unix.S_IFBLK, tar.TypeFifo: unix.S_IFIFO}[h.Typeflag]
		dev := unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor))
		if err := unix.Mknodat(pfd, base, kind|0o600, int(dev)); err != nil {
			return err
		}
	default:
		return nil // PAX/GNU metadata entries are consumed by tar.Reader; others are skipped
	}
	if root {
		if err := unix.Fchownat(pfd, base, h.Uid, h.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	if h.Typeflag != tar.TypeSymlink {
		// After chown, which clears set-id bits.
		if err := unix.Fchmodat(pfd, base, mode, 0); err != nil {
			return err
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(h.AccessTime.UnixNano()), unix.NsecToTimespec(h.ModTime.UnixNano())}
	if h.AccessTime.IsZero() {
		ts[0] = ts[1]
	}
	_ = unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW) // times are cosmetic
	return nil
}
