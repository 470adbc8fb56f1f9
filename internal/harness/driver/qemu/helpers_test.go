package qemu

import (
	"net"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func mkdirAll(dir string) error { return os.MkdirAll(dir, 0o755) }

// listenUnixRelative listens on dir/name through the directory's
// descriptor, for paths longer than sun_path.
func listenUnixRelative(dir, name string) (net.Listener, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return net.Listen("unix", "/proc/self/fd/"+strconv.Itoa(fd)+"/"+name)
}

func kvmOpenable() bool {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

func fmtSscan(s string, pid *int) (int, error) {
	n, err := strconv.Atoi(s)
	*pid = n
	return 1, err
}
