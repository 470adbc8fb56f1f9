package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// CopySparse copies the disk image src to dst, a new file, keeping its
// holes: a scratch disk is mostly empty, and a copy of it per snapshot,
// per restore or per sandbox must not fill the host. It walks src's data extents
// (SEEK_DATA, SEEK_HOLE) and copies only those (io.Copy between files
// uses copy_file_range, which reflinks where the file system can). It
// stops between extents when ctx ends; a failed copy removes dst.
func CopySparse(ctx context.Context, src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(dst)
		}
	}()
	if err := CopySparseFile(ctx, in, out, fi.Size()); err != nil {
		return fmt.Errorf("copying %s: %w", src, err)
	}
	return nil
}

// CopySparseFile copies the first size bytes of in to out (both open
// files; out is sized to size) without writing in's holes: they stay
// holes in out.
func CopySparseFile(ctx context.Context, in, out *os.File, size int64) error {
	if err := out.Truncate(size); err != nil {
		return err
	}
	for off := int64(0); off < size; {
		if err := ctx.Err(); err != nil {
			return err
		}
		start, err := in.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return err
		}
		end, err := in.Seek(start, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := in.Seek(start, io.SeekStart); err != nil {
			return err
		}
		if _, err := out.Seek(start, io.SeekStart); err != nil {
			return err
		}
		if _, err := io.Copy(out, io.LimitReader(in, end-start)); err != nil {
			return err
		}
		off = end
	}
	return nil
}
