package guest

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/invokex/invokex/internal/errdefs"
)

// Images are ext4 file systems made with `mkfs.ext4 -d`: no loop device,
// no mount, no root needed to build them.
const (
	blockSize = 4096
	inodeSize = 256
	// minImageBytes leaves room for ext4's fixed metadata on tiny trees.
	minImageBytes = 4 << 20
	// mkfsAttempts bounds the retries with a larger image when the
	// estimate was too small (deep extent trees, many tiny directories).
	mkfsAttempts = 3
)

// imageOptions shape one mkfs.ext4 run.
type imageOptions struct {
	// label is the volume label (at most 16 bytes).
	label string
	// readOnly images have no journal and no reserved blocks: nothing ever
	// writes to them, and the kernel mounts them ro.
	readOnly bool
}

// mkfsArgs is the mkfs.ext4 command line for an image of size bytes holding
// inodes inodes, populated from dir ("" for an empty file system).
func mkfsArgs(file, dir string, size int64, inodes int64, o imageOptions) []string {
	args := []string{"-q", "-F", "-t", "ext4", "-b", strconv.Itoa(blockSize), "-I", strconv.Itoa(inodeSize), "-m", "0"}
	if o.label != "" {
		args = append(args, "-L", o.label)
	}
	ext := "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1"
	if o.readOnly {
		// No journal for images nobody writes; no resize inode either, as
		// they are never grown.
		args = append(args, "-O", "^has_journal,^resize_inode")
	} else {
		// Scratch disks live as long as one VM: a journal buys nothing.
		args = append(args, "-O", "^has_journal")
	}
	args = append(args, "-E", ext)
	if inodes > 0 {
		args = append(args, "-N", strconv.FormatInt(inodes, 10))
	}
	if dir != "" {
		args = append(args, "-d", dir)
	}
	// The size is given in KiB so mkfs never reads it as blocks.
	return append(args, file, strconv.FormatInt(size/1024, 10)+"k")
}

// treeUsage is what a directory tree needs on ext4.
type treeUsage struct {
	bytes  int64 // data blocks, rounded per file
	inodes int64
}

// measureTree walks dir without following symlinks.
func measureTree(dir string) (treeUsage, error) {
	var u treeUsage
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		u.inodes++
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case fi.Mode().IsRegular():
			u.bytes += roundUp(fi.Size(), blockSize)
			// Large files need extent tree blocks.
			u.bytes += fi.Size() / (32 << 20) * blockSize
		case fi.IsDir():
			// A directory block holds ~100 entries; count one per dir plus
			// one per 100 entries via the inode count below.
			u.bytes += blockSize
		case fi.Mode()&fs.ModeSymlink != 0:
			// Targets over 60 bytes take a block.
			if fi.Size() > 59 {
				u.bytes += blockSize
			}
		}
		return nil
	})
	if err != nil {
		return u, fmt.Errorf("measuring %s: %w", dir, err)
	}
	u.bytes += u.inodes / 100 * blockSize
	return u, nil
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// makeImage builds an ext4 image of dir at out (atomically: a temporary
// file renamed into place), sized to fit with a small margin. extra bytes
// and inodes are added to the estimate (for files added after measuring).
func makeImage(ctx context.Context, dir, out string, o imageOptions) error {
	u, err := measureTree(dir)
	if err != nil {
		return err
	}
	inodes := u.inodes + 64 + u.inodes/10
	size := u.bytes + u.bytes/8 + inodes*inodeSize + minImageBytes
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp-*")
	if err != nil {
		return fmt.Errorf("creating image: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name()) // no-op after the rename
	for attempt := 1; ; attempt++ {
		size = roundUp(size, 1<<20)
		if err := os.Truncate(tmp.Name(), 0); err != nil {
			return err
		}
		err = run(ctx, nil, "", nil, "mkfs.ext4", mkfsArgs(tmp.Name(), dir, size, inodes, o)...)
		if err == nil {
			break
		}
		if ctx.Err() != nil || attempt == mkfsAttempts {
			return fmt.Errorf("making ext4 image of %s (%d MiB): %w", dir, size>>20, err)
		}
		// Most likely out of space: the estimate was short.
		size *= 2
		inodes *= 2
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return fmt.Errorf("installing image: %w", err)
	}
	return nil
}

// ScratchImage creates at path a sparse, empty, writable ext4 file system of
// sizeMB MiB: the VM's /tmp, so writes past sizeMB fail with ENOSPC inside
// the guest and never fill the host. Only the metadata mkfs writes takes
// host space. An existing file at path is replaced.
func ScratchImage(ctx context.Context, path string, sizeMB int) error {
	if sizeMB < 8 || sizeMB > 10240*4 {
		return fmt.Errorf("scratch disk of %d MiB: %w", sizeMB, errdefs.ErrInvalidParameter)
	}
	size := int64(sizeMB) << 20
	// One inode per 16 KiB, as for a general-purpose /tmp.
	inodes := size / (16 << 10)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("creating scratch disk: %w", err)
	}
	f.Close()
	defer os.Remove(tmp)
	if err := run(ctx, nil, "", nil, "mkfs.ext4", mkfsArgs(tmp, "", size, inodes, imageOptions{label: "scratch"})...); err != nil {
		return fmt.Errorf("making scratch disk: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("installing scratch disk: %w", err)
	}
	return nil
}

// CodeImage returns a read-only ext4 image holding task/ (a copy of
// codeDir) and runtime/ (of runtimeDir, empty when runtimeDir is ""),
// cached under cacheDir/code by key: a caller passes a key that changes
// whenever either directory's content does (the QEMU driver uses the
// code's CodeSha256 and a hash of the runtime directory). The image is
// built once per key; concurrent callers with the same key wait for it.
func CodeImage(ctx context.Context, cacheDir, codeDir, runtimeDir, key string) (string, error) {
	if key == "" {
		return "", fmt.Errorf("code image without a cache key: %w", errdefs.ErrInvalidParameter)
	}
	name := digest([]byte("code-1"), []byte(key))
	dir := filepath.Join(cacheDir, "code")
	out := filepath.Join(dir, name+".ext4")
	if exists(out) {
		return out, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating code cache: %w", err)
	}
	unlock, err := lock(ctx, cacheDir, "code-"+name)
	if err != nil {
		return "", err
	}
	defer unlock()
	if exists(out) {
		return out, nil
	}
	stage, err := os.MkdirTemp(dir, ".stage-")
	if err != nil {
		return "", fmt.Errorf("creating code staging directory: %w", err)
	}
	defer os.RemoveAll(stage)
	if err := os.Chmod(stage, 0o755); err != nil {
		return "", err
	}
	if err := linkTree(codeDir, filepath.Join(stage, "task")); err != nil {
		return "", fmt.Errorf("staging code: %w", err)
	}
	if runtimeDir != "" {
		err = linkTree(runtimeDir, filepath.Join(stage, "runtime"))
	} else {
		err = os.Mkdir(filepath.Join(stage, "runtime"), 0o755)
	}
	if err != nil {
		return "", fmt.Errorf("staging runtime files: %w", err)
	}
	if err := makeImage(ctx, stage, out, imageOptions{label: "code", readOnly: true}); err != nil {
		return "", fmt.Errorf("building code image: %w", err)
	}
	return out, nil
}

// linkTree recreates the tree src at dst: directories with their modes,
// files as hard links where possible (same file system) and copies
// otherwise, symlinks as symlinks. dst must not exist.
func linkTree(src, dst string) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			// Mkdir honours the umask; the mode must be the source's.
			return os.Chmod(target, fi.Mode().Perm()|fi.Mode()&(fs.ModeSticky|fs.ModeSetgid))
		case fi.Mode()&fs.ModeSymlink != 0:
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(l, target)
		case fi.Mode().IsRegular():
			err := os.Link(p, target)
			if errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EPERM) {
				return copyFile(p, target, fi.Mode().Perm())
			}
			return err
		}
		return nil // sockets, devices, fifos have no place in code
	})
}
