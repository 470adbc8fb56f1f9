package qemu

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// listenUnix binds a listening unix socket at path (through its
// directory's descriptor when path is too long for sun_path, see
// hostproc.SocketAddr) and returns it as a file to hand to QEMU. QEMU
// serves the socket; the driver binds it so that it exists before QEMU
// starts (a connection waits in the backlog) and so that QEMU needs no
// access to the instance directory. Closing the file leaves the socket's
// name in place.
func listenUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("creating socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	err = hostproc.SocketAddr(path, func(addr string) error {
		return unix.Bind(fd, &unix.SockaddrUnix{Name: addr})
	})
	if err != nil {
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
