package vminit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// parseVsockPort reads invokex.vsock: an AF_VSOCK port, 1 to 2^32-2
// (0 is "not set" on the command line; 2^32-1 is VMADDR_PORT_ANY).
func parseVsockPort(v string) (uint32, error) {
	p, err := strconv.ParseUint(v, 10, 32)
	if err != nil || p == 0 || p == unix.VMADDR_PORT_ANY {
		return 0, fmt.Errorf("invokex.vsock=%q: want a port from 1 to %d", v, uint32(unix.VMADDR_PORT_ANY)-1)
	}
	return uint32(p), nil
}

// vsockListener is a listening AF_VSOCK socket. The descriptor is
// non-blocking and owned by an os.File, so a pending Accept waits in Go's
// poller and Close ends it.
type vsockListener struct {
	f *os.File
}

// listenVsock listens on port for connections to any of the guest's CIDs
// (the host reaches it as the guest's CID; Firecracker's hybrid vsock
// forwards a host "CONNECT <port>" there).
func listenVsock(port uint32) (*vsockListener, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("creating vsock socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("binding vsock port %d: %w", port, err)
	}
	// The host connects once; a backlog of one is all it needs.
	if err := unix.Listen(fd, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("listening on vsock port %d: %w", port, err)
	}
	return &vsockListener{f: os.NewFile(uintptr(fd), "vsock-listener")}, nil
}

// Accept waits for one connection, or for ctx to end. The connection is
// non-blocking and pollable like the listener, so closing it unblocks a
// pending Read (how the agent's stream is torn down).
func (l *vsockListener) Accept(ctx context.Context) (*os.File, error) {
	rc, err := l.f.SyscallConn()
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { l.f.Close() })
	defer stop()
	var nfd int
	var aerr error
	err = rc.Read(func(fd uintptr) bool {
		var sa unix.Sockaddr
		nfd, sa, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		if aerr == nil && !fromHost(sa) {
			// Only the host may speak to the agent: a guest process that
			// reached the port over a loopback transport is turned away.
			unix.Close(nfd)
			aerr = unix.EAGAIN
		}
		// EAGAIN: nobody yet; returning false waits for readability.
		return !errors.Is(aerr, unix.EAGAIN)
	})
	if err == nil {
		err = aerr
	}
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for the host on vsock: %w", context.Cause(ctx))
		}
		return nil, fmt.Errorf("accepting the host's vsock connection: %w", err)
	}
	return os.NewFile(uintptr(nfd), "vsock"), nil
}

// Close stops listening; connections already accepted stay open.
func (l *vsockListener) Close() error { return l.f.Close() }

// fromHost reports whether a vsock peer is the host (CID 2).
func fromHost(sa unix.Sockaddr) bool {
	vm, ok := sa.(*unix.SockaddrVM)
	return ok && vm.CID == unix.VMADDR_CID_HOST
}

// acceptVsock listens on port and accepts the host's connection; the
// returned stream keeps listening (see vsockStream).
func acceptVsock(ctx context.Context, port uint32) (*vsockStream, error) {
	l, err := listenVsock(port)
	if err != nil {
		return nil, err
	}
	c, err := l.Accept(ctx)
	if err != nil {
		l.Close()
		return nil, err
	}
	return &vsockStream{l: l, cur: c}, nil
}

// vsockStream is the agent's stream over vsock. A VM restored from a
// Firecracker snapshot has its vsock transport reset: every connection
// open when the snapshot was taken fails with ECONNRESET, while listening
// sockets survive. So the listener stays open for the VM's life, and a
// reset makes the stream wait for the host's next connection (the
// restoring driver's) and carry on there: the agent's session, between
// frames when the snapshot was taken, continues as if nothing happened.
// EOF still ends the stream: the host closed it. Only the host (CID 2) is
// ever accepted.
type vsockStream struct {
	l acceptor

	mu     sync.Mutex // held while replacing cur
	cur    io.ReadWriteCloser
	closed bool
}

// acceptor is what vsockStream needs of a listener (*vsockListener; a
// fake in tests, which have no vsock transport).
type acceptor interface {
	Accept(ctx context.Context) (*os.File, error)
	Close() error
}

func (s *vsockStream) conn() io.ReadWriteCloser {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Read reads from the current connection, moving to the host's next one
// after a reset.
func (s *vsockStream) Read(p []byte) (int, error) {
	for {
		c := s.conn()
		n, err := c.Read(p)
		if n == 0 && isReset(err) && s.reconnect(c) == nil {
			continue
		}
		return n, err
	}
}

// Write writes to the current connection; a write that a reset refused
// entirely is repeated on the host's next connection.
func (s *vsockStream) Write(p []byte) (int, error) {
	for {
		c := s.conn()
		n, err := c.Write(p)
		if n == 0 && isReset(err) && s.reconnect(c) == nil {
			continue
		}
		return n, err
	}
}

// reconnect replaces old, which was reset, with the host's next
// connection; if another caller replaced it already, there is nothing to
// do.
func (s *vsockStream) reconnect(old io.ReadWriteCloser) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return os.ErrClosed
	}
	if s.cur != old {
		return nil
	}
	c, err := s.l.Accept(context.Background())
	if err != nil {
		return err
	}
	old.Close()
	s.cur = c
	return nil
}

// Close ends the stream and the listening.
func (s *vsockStream) Close() error {
	s.l.Close() // ends an Accept in progress, which holds mu
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return s.cur.Close()
}

func isReset(err error) bool { return errors.Is(err, unix.ECONNRESET) }
