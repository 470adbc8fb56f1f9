package firecracker

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
// sun_path (deep state directories, a jail's chroot) is reached through
// its directory's descriptor: /proc/self/fd/N/<name> resolves like the
// directory itself. Firecracker binds its sockets relative to its working
// directory or chroot, so it never meets the limit.
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
