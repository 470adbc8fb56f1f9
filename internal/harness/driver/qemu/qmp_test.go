package qemu

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// qmpServer serves the fake QMP on a unix socket and returns its path and
// a channel that receives a value per accepted quit.
func qmpServer(t *testing.T, acceptQuit bool) (string, chan struct{}) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	quits := make(chan struct{}, 10)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go serveFakeQMP(c, func() bool {
				quits <- struct{}{}
				return acceptQuit
			})
		}
	}()
	return path, quits
}

func TestQMPCommands(t *testing.T) {
	path, quits := qmpServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := dialQMP(ctx, path)
	if err != nil {
		t.Fatalf("dialQMP: %v", err)
	}
	defer q.Close()
	st, err := q.QueryStatus(ctx)
	if err != nil || st.Status != "running" || !st.Running {
		t.Fatalf("QueryStatus = %+v, %v; want running", st, err)
	}
	if err := q.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if st, err := q.QueryStatus(ctx); err != nil || st.Status != "paused" || st.Running {
		t.Fatalf("QueryStatus after stop = %+v, %v; want paused", st, err)
	}
	if err := q.Cont(ctx); err != nil {
		t.Fatalf("Cont: %v", err)
	}
	err = q.Execute(ctx, "no-such-command", map[string]any{"x": 1}, nil)
	var qe *qmpError
	if !errors.As(err, &qe) || qe.Class != "CommandNotFound" {
		t.Fatalf("unknown command: %v, want a CommandNotFound qmpError", err)
	}
	// The connection stays usable after an error answer.
	if _, err := q.QueryStatus(ctx); err != nil {
		t.Fatalf("QueryStatus after an error: %v", err)
	}
	// The fake closes the socket without answering quit, as QEMU may.
	if err := q.Quit(ctx); err != nil {
		t.Fatalf("Quit: %v", err)
	}
	select {
	case <-quits:
	default:
		t.Fatalf("the server saw no quit")
	}
}

func TestQMPCancelledCall(t *testing.T) {
	// A server that accepts and never says anything: the greeting never
	// comes, and ctx must end the wait.
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			defer c.Close()
			time.Sleep(time.Minute)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := dialQMP(ctx, path); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dialQMP to a silent server: %v, want DeadlineExceeded", err)
	}
}

func TestQMPNoServer(t *testing.T) {
	ctx := context.Background()
	if _, err := dialQMP(ctx, filepath.Join(t.TempDir(), "none.sock")); err == nil {
		t.Fatalf("dialQMP without a server succeeded")
	}
}

// TestListenUnixLongPath: the sockets QEMU inherits are bound, and
// reached, however deep the instance directory is.
func TestListenUnixLongPath(t *testing.T) {
	dir := t.TempDir()
	for len(dir) < hostproc.MaxSunPath+10 {
		dir = filepath.Join(dir, "a-rather-long-directory-name")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "x.sock")
	f, err := listenUnix(path)
	if err != nil {
		t.Fatalf("listenUnix(%d-byte path): %v", len(path), err)
	}
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Write([]byte("k"))
			c.Close()
		}
	}()
	c, err := hostproc.DialUnix(context.Background(), path)
	if err != nil {
		t.Fatalf("DialUnix(%d-byte path): %v", len(path), err)
	}
	defer c.Close()
	b := make([]byte, 1)
	if _, err := c.Read(b); err != nil || b[0] != 'k' {
		t.Fatalf("read %q, %v", b, err)
	}
}
