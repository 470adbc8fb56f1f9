package hostproc

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// MaxSunPath is the longest path a unix socket address holds (sun_path is
// 108 bytes including the terminating NUL).
const MaxSunPath = 107

// SocketAddr calls fn with an address for the unix socket at path that
// fits sun_path: path itself, or, for a longer path (deep state
// directories, a jail's chroot), /proc/self/fd/N/<name> through a
// descriptor of path's directory, which resolves like the directory
// itself and is valid while fn runs. fn may bind or connect with it. Its
// error is fn's, or one saying that even the short form is too long.
func SocketAddr(path string, fn func(addr string) error) error {
	if len(path) <= MaxSunPath {
		return fn(path)
	}
	dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening socket directory: %w", err)
	}
	defer dir.Close()
	short := "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + filepath.Base(path)
	if len(short) > MaxSunPath {
		return fmt.Errorf("socket name %q too long", filepath.Base(path))
	}
	return fn(short)
}

// DialUnix connects to the unix socket at path, however long the path
// (see SocketAddr). The VMMs bind their sockets relative to their working
// directory or chroot, so they never meet the limit; the driver, reaching
// them from outside, does.
func DialUnix(ctx context.Context, path string) (net.Conn, error) {
	var c net.Conn
	err := SocketAddr(path, func(addr string) error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, "unix", addr)
		return err
	})
	return c, err
}
