package qemu

import (
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"testing"

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

// testLogger sends the driver's log to the test's log until the test ends
// (a VM's last lines may arrive after it).
func testLogger(t *testing.T) *slog.Logger {
	w := &tWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.done = true
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// NewTestLogger is testLogger for the external test package.
var NewTestLogger = testLogger

type tWriter struct {
	t    *testing.T
	mu   sync.Mutex
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p))
	}
	return len(p), nil
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
