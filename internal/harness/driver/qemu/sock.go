package qemu

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// maxSunPath is the longest path a unix socket address holds (sun_path is
// 108 bytes including the terminating NUL).
const maxSunPath = 107

// dialUnix connects to the unix socket at path. A path too long for
// sun_path (deep state directories) is reached through its directory's
// descriptor: /proc/self/fd/N/<name> resolves like the directory itself.
// QEMU binds its sockets relative to its working directory, the instance
// directory, so it never meets the limit.
func dialUnix(ctx context.Context, path string) (net.Conn, error) {
	var d net.Dialer
	if len(path) <= maxSunPath {
		return d.DialContext(ctx, "unix", path)
	}
	dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening socket directory: %w", err)
	}
	defer dir.Close()
	short := "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + filepath.Base(path)
	if len(short) > maxSunPath {
		return nil, fmt.Errorf("socket name %q too long", filepath.Base(path))
	}
	return d.DialContext(ctx, "unix", short)
}

// listenUnix binds a listening unix socket at path (reached through its
// directory's descriptor when path is too long) and returns it as a file
// to hand to QEMU. Closing the file leaves the socket's name in place.
func listenUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("creating socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	name := path
	if len(path) > maxSunPath {
		dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("opening socket directory: %w", err)
		}
		defer dir.Close()
		name = "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + filepath.Base(path)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: name}); err != nil {
		f.Close()
		return nil, fmt.Errorf("binding %s: %w", path, err)
	}
	// One client at a time is all QEMU serves.
	if err := unix.Listen(fd, 4); err != nil {
		f.Close()
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	return f, nil
}
