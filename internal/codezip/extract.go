package codezip

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Extract unpacks a package into dir; it appears complete or not at all.
//
// The package is validated again (as Inspect does) while it is written into
// a temporary directory beside dir, which is then renamed to dir. Because
// packages are addressed by digest, a dir that exists already (perhaps
// written concurrently by another caller) is taken as the same content and
// Extract returns nil without writing. Files get mode 0755 or 0644 (never
// setuid), directories 0755; symlinks are recreated, and all of them stay
// inside dir. ctx is honoured between entries and while decompressing; on
// any failure the temporary directory is removed. dir's parent is created
// if missing.
func Extract(ctx context.Context, data []byte, dir string, lim Limits) (retErr error) {
	lim = lim.withDefaults()
	if _, err := os.Lstat(dir); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("checking %s: %w", dir, err)
	}
	p, err := scan(data, lim)
	if err != nil {
		return err
	}
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", parent, err)
	}
	tmp, err := os.MkdirTemp(parent, "."+filepath.Base(dir)+".tmp-")
	if err != nil {
		return fmt.Errorf("creating temporary directory: %w", err)
	}
	defer func() {
		if retErr != nil {
			// Removal must happen even when ctx is what failed us.
			_ = os.RemoveAll(tmp)
		}
	}()
	if err := writeTree(ctx, p, tmp, lim); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return fmt.Errorf("setting mode of %s: %w", tmp, err)
	}
	// One syncfs makes the content durable before the rename publishes it,
	// so a crash cannot leave a complete-looking dir with empty files.
	if err := syncDir(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Lstat(dir); serr == nil {
			// Lost a race with another Extract of the same content.
			_ = os.RemoveAll(tmp)
			return nil
		}
		return fmt.Errorf("publishing %s: %w", dir, err)
	}
	return nil
}

func writeTree(ctx context.Context, p *pkg, root string, lim Limits) error {
	for _, d := range p.dirs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := os.Mkdir(filepath.Join(root, filepath.FromSlash(d)), 0o755); err != nil {
			return fmt.Errorf("creating directory %s: %w", d, err)
		}
	}
	b := &budget{left: lim.MaxUnzippedBytes, max: lim.MaxUnzippedBytes}
	for _, e := range p.regular {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := writeFile(ctx, e, p.manifest.Files[e.name].Mode, root, b); err != nil {
			return err
		}
	}
	// Symlinks last: nothing is ever written through one.
	for _, e := range p.symlinks {
		if err := ctx.Err(); err != nil {
			return err
		}
		target := p.manifest.Files[e.name].Target
		if err := os.Symlink(target, filepath.Join(root, filepath.FromSlash(e.name))); err != nil {
			return fmt.Errorf("creating symlink %s: %w", e.name, err)
		}
	}
	return nil
}

func writeFile(ctx context.Context, e entry, mode fs.FileMode, root string, b *budget) (retErr error) {
	dst := filepath.Join(root, filepath.FromSlash(e.name))
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("creating %s: %w", e.name, err)
	}
	defer func() {
		if err := f.Close(); err != nil && retErr == nil {
			retErr = fmt.Errorf("closing %s: %w", e.name, err)
		}
	}()
	if err := readEntry(ctx, e, f, b); err != nil {
		return err
	}
	// Chmod after writing: the umask must not change the package's modes.
	if err := f.Chmod(mode.Perm()); err != nil {
		return fmt.Errorf("setting mode of %s: %w", e.name, err)
	}
	return nil
}

func syncDir(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dir, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncing %s: %w", dir, err)
	}
	return nil
}
