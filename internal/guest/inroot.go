package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A root tree (debootstrapped or imported from an image) is hostile input:
// its symlinks may be absolute (/sbin -> /usr/sbin) or point outside it.
// Every path inside a tree is therefore resolved with openat2's
// RESOLVE_IN_ROOT, which treats the tree as "/" while following symlinks,
// and every object is created relative to a directory fd so that nothing
// the root's author planted can redirect a write onto the host.

// treeRoot is an open root tree.
type treeRoot struct {
	fd   int
	path string
}

func openTree(dir string) (*treeRoot, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening root tree %s: %w", dir, err)
	}
	return &treeRoot{fd: fd, path: dir}, nil
}

func (r *treeRoot) Close() error { return unix.Close(r.fd) }

// clean turns any archive or absolute path into a relative path inside
// the root ("" for the root itself).
func clean(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// open resolves rel inside the root.
func (r *treeRoot) open(rel string, flags int, mode uint32) (int, error) {
	rel = clean(rel)
	if rel == "" {
		rel = "."
	}
	fd, err := unix.Openat2(r.fd, rel, &unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC),
		Mode:    uint64(mode),
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return -1, &os.PathError{Op: "openat2", Path: "/" + rel, Err: err}
	}
	return fd, nil
}

// mkdirAll creates rel and its missing parents (mode 0755) inside the root
// and returns an O_PATH fd of it. A dangling symlink on the way is
// followed (inside the root) and its target created, as a layer that
// writes through it expects.
func (r *treeRoot) mkdirAll(rel string) (int, error) { return r.mkdirAllDepth(rel, 0) }

// maxLinkDepth bounds the symlinks mkdirAll follows, as the kernel does.
const maxLinkDepth = 40

func (r *treeRoot) mkdirAllDepth(rel string, depth int) (int, error) {
	if depth > maxLinkDepth {
		return -1, &os.PathError{Op: "mkdir", Path: "/" + clean(rel), Err: unix.ELOOP}
	}
	rel = clean(rel)
	fd, err := r.open(rel, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	parent, base := path.Split(rel)
	pfd, err := r.mkdirAllDepth(parent, depth)
	if err != nil {
		return -1, err
	}
	defer unix.Close(pfd)
	err = unix.Mkdirat(pfd, base, 0o755)
	if errors.Is(err, unix.EEXIST) {
		// base exists yet does not resolve: a dangling symlink.
		target, lerr := readlinkat(pfd, base)
		if lerr != nil {
			return -1, &os.PathError{Op: "mkdirat", Path: "/" + rel, Err: err}
		}
		if !path.IsAbs(target) {
			dir, derr := r.pathOf(pfd)
			if derr != nil {
				return -1, derr
			}
			target = path.Join(dir, target)
		}
		tfd, err := r.mkdirAllDepth(target, depth+1)
		if err != nil {
			return -1, err
		}
		unix.Close(tfd)
		return r.open(rel, unix.O_PATH|unix.O_DIRECTORY, 0)
	}
	if err != nil {
		return -1, &os.PathError{Op: "mkdirat", Path: "/" + rel, Err: err}
	}
	// Mkdirat honours the umask.
	if err := unix.Fchmodat(pfd, base, 0o755, 0); err != nil {
		return -1, &os.PathError{Op: "fchmodat", Path: "/" + rel, Err: err}
	}
	return r.open(rel, unix.O_PATH|unix.O_DIRECTORY, 0)
}

// readlinkat reads the symlink name in dirfd.
func readlinkat(dirfd int, name string) (string, error) {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(dirfd, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// pathOf returns the path inside the root of a directory fd resolved in it.
func (r *treeRoot) pathOf(fd int) (string, error) {
	host, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return "", err
	}
	rootHost, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(r.fd))
	if err != nil {
		return "", err
	}
	if host == rootHost {
		return "/", nil
	}
	rel, ok := strings.CutPrefix(host, rootHost+"/")
	if !ok {
		return "", fmt.Errorf("directory %s is outside the root %s", host, rootHost)
	}
	return "/" + rel, nil
}

// parent returns an O_PATH fd of rel's parent directory (created if
// missing) and rel's last element.
func (r *treeRoot) parent(rel string) (int, string, error) {
	rel = clean(rel)
	if rel == "" {
		return -1, "", fmt.Errorf("the root has no parent: %w", unix.EINVAL)
	}
	dir, base := path.Split(rel)
	fd, err := r.mkdirAll(dir)
	return fd, base, err
}

// writeFile replaces rel with a regular file holding what src yields.
// An existing symlink at rel is replaced, never followed.
func (r *treeRoot) writeFile(rel string, src io.Reader, mode uint32) error {
	pfd, base, err := r.parent(rel)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	tmp := ".invokex-tmp-" + base
	_ = unix.Unlinkat(pfd, tmp, 0)
	fd, err := unix.Openat(pfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return &os.PathError{Op: "create", Path: "/" + clean(rel), Err: err}
	}
	f := os.NewFile(uintptr(fd), tmp)
	_, err = io.Copy(f, src)
	if err == nil {
		err = f.Chmod(os.FileMode(mode & 0o777))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(pfd, tmp, pfd, base)
	}
	if err != nil {
		_ = unix.Unlinkat(pfd, tmp, 0)
		return fmt.Errorf("writing /%s: %w", clean(rel), err)
	}
	return nil
}

// readFile returns rel's content ("", nil when it does not exist).
func (r *treeRoot) readFile(rel string) ([]byte, error) {
	fd, err := r.open(rel, unix.O_RDONLY, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, 16<<20))
}

// symlink replaces rel with a symlink to target.
func (r *treeRoot) symlink(target, rel string) error {
	pfd, base, err := r.parent(rel)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if err := removeAt(pfd, base); err != nil {
		return err
	}
	if err := unix.Symlinkat(target, pfd, base); err != nil {
		return &os.PathError{Op: "symlink", Path: "/" + clean(rel), Err: err}
	}
	return nil
}

// isExecutable reports whether rel resolves (inside the root) to a regular
// file with an execute bit.
func (r *treeRoot) isExecutable(rel string) bool {
	fd, err := r.open(rel, unix.O_PATH, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFREG && st.Mode&0o111 != 0
}

// removeAt removes name in dirfd, recursively for directories, without
// following symlinks. A missing name is not an error.
func removeAt(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return &os.PathError{Op: "unlink", Path: name, Err: err}
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: name, Err: err}
	}
	if err := clearDir(fd); err != nil {
		unix.Close(fd)
		return err
	}
	unix.Close(fd)
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return &os.PathError{Op: "rmdir", Path: name, Err: err}
	}
	return nil
}

// clearDirExcept removes everything in the directory open as fd (an O_RDONLY fd),
// except the names keep reports true for.
func clearDirExcept(fd int, keep func(name string) bool) error {
	// The caller owns fd: read through a duplicate that Close may close.
	dfd, err := unix.Dup(fd)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(dfd), "dir")
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("reading directory: %w", err)
	}
	for _, n := range names {
		if keep != nil && keep(n) {
			continue
		}
		if err := removeAt(fd, n); err != nil {
			return err
		}
	}
	return nil
}

func clearDir(fd int) error { return clearDirExcept(fd, nil) }

// closeFD closes an fd from the helpers above; the close of an O_PATH fd
// cannot fail in a way that matters.
func closeFD(fd int) { _ = unix.Close(fd) }
