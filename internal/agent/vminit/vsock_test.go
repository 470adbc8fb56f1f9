package vminit

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseCmdlineVsock(t *testing.T) {
	c, err := ParseCmdline("console=ttyS0 invokex.vsock=1024 invokex.code=/dev/vdb")
	if err != nil {
		t.Fatal(err)
	}
	if c.VsockPort != 1024 || c.PortName != DefaultPortName {
		t.Errorf("parsed %+v, want VsockPort 1024 beside the default port name", c)
	}
	c, err = ParseCmdline("console=ttyS0")
	if err != nil || c.VsockPort != 0 {
		t.Errorf("without invokex.vsock: %+v, %v; want VsockPort 0 (virtio-serial)", c, err)
	}
	for _, bad := range []string{"0", "-1", "4294967295", "4294967296", "x", ""} {
		if _, err := ParseCmdline("invokex.vsock=" + bad); err == nil || !strings.Contains(err.Error(), "invokex.vsock") {
			t.Errorf("invokex.vsock=%q: %v, want an error naming the parameter", bad, err)
		}
	}
}

// requireVsock skips when the host kernel has no AF_VSOCK at all. A
// kernel with a vsock transport (a VM's guest transport, vhost, loopback)
// lets a socket be bound and listened on even when nothing can connect.
func requireVsock(t *testing.T) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Skipf("skipping: no AF_VSOCK on this kernel: %v", err)
	}
	unix.Close(fd)
}

// TestVsockListen: the listener holds its port (a second bind of it
// fails), Accept waits until its context ends and then says why, and
// closing the listener frees the port. Nothing can connect on a host
// without a vsock loopback transport, so the connection itself is only
// exercised by a real Firecracker guest (driver/firecracker's suite).
func TestVsockListen(t *testing.T) {
	requireVsock(t)
	const port = 52000 + 17
	l, err := listenVsock(port)
	if err != nil {
		t.Fatalf("listenVsock: %v", err)
	}
	if _, err := listenVsock(port); !errors.Is(err, unix.EADDRINUSE) {
		t.Errorf("second listen on port %d: %v, want EADDRINUSE", port, err)
	}
	ctx, cancel := context.WithTimeoutCause(context.Background(), 50*time.Millisecond, errors.New("host never came"))
	defer cancel()
	conn, err := l.Accept(ctx)
	if conn != nil || err == nil || !strings.Contains(err.Error(), "host never came") {
		t.Errorf("Accept with nobody connecting = %v, %v; want the context's cause", conn, err)
	}
	l.Close()
	l2, err := listenVsock(port)
	if err != nil {
		t.Fatalf("port not free after Close: %v", err)
	}
	l2.Close()
}

// TestAcceptVsockCancelled: acceptVsock releases its port when it gives up.
func TestAcceptVsockCancelled(t *testing.T) {
	requireVsock(t)
	const port = 52000 + 18
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := acceptVsock(ctx, port)
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("acceptVsock = %v, want context.Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("acceptVsock did not return after cancel")
	}
	l, err := listenVsock(port)
	if err != nil {
		t.Fatalf("port still held after acceptVsock returned: %v", err)
	}
	l.Close()
}

func TestParseVsockPortBounds(t *testing.T) {
	for v, want := range map[string]uint32{"1": 1, "52": 52, "4294967294": 4294967294} {
		if got, err := parseVsockPort(v); err != nil || got != want {
			t.Errorf("parseVsockPort(%q) = %d, %v; want %d", v, got, err, want)
		}
	}
}

// resetOnce is a connection whose first Read fails as a vsock connection
// does after Firecracker resets the transport of a restored VM.
type resetOnce struct {
	io.ReadWriteCloser
	done bool
}

func (r *resetOnce) Read(p []byte) (int, error) {
	if !r.done {
		r.done = true
		return 0, unix.ECONNRESET
	}
	return r.ReadWriteCloser.Read(p)
}

// pairAcceptor hands out the guest ends of socketpairs, one per Accept.
type pairAcceptor struct {
	next   chan *os.File
	closed chan struct{}
}

func (a *pairAcceptor) Accept(ctx context.Context) (*os.File, error) {
	select {
	case f := <-a.next:
		return f, nil
	case <-a.closed:
		return nil, os.ErrClosed
	}
}

func (a *pairAcceptor) Close() error { close(a.closed); return nil }

func socketPair(t *testing.T) (guest, host *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fds[0]), "guest"), os.NewFile(uintptr(fds[1]), "host")
}

// TestVsockStreamCarriesOnAfterAReset: a reset connection (a restored
// Firecracker VM) is replaced by the host's next one and the agent's
// stream goes on; bytes of the old connection are not mixed in.
func TestVsockStreamCarriesOnAfterAReset(t *testing.T) {
	g1, h1 := socketPair(t)
	defer h1.Close()
	a := &pairAcceptor{next: make(chan *os.File, 1), closed: make(chan struct{})}
	s := &vsockStream{l: a, cur: &resetOnce{ReadWriteCloser: g1}}
	g2, h2 := socketPair(t)
	defer h2.Close()
	a.next <- g2
	if _, err := h2.Write([]byte("frame")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "frame" {
		t.Fatalf("read after a reset: %q %v", buf, err)
	}
	if _, err := s.Write([]byte("answer")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if _, err := io.ReadFull(h2, got); err != nil || string(got) != "answer" {
		t.Fatalf("the host's new connection got %q %v", got, err)
	}
	// EOF (the host closed the stream) is the end, not a reset.
	h2.Close()
	if _, err := s.Read(buf); err != io.EOF {
		t.Fatalf("read after the host closed: %v, want EOF", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestFromHost(t *testing.T) {
	if !fromHost(&unix.SockaddrVM{CID: unix.VMADDR_CID_HOST, Port: 1}) {
		t.Error("the host (CID 2) refused")
	}
	if fromHost(&unix.SockaddrVM{CID: 3, Port: 1}) || fromHost(&unix.SockaddrUnix{Name: "x"}) {
		t.Error("a peer other than the host accepted")
	}
}
