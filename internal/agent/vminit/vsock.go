package vminit

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"

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
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
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

// acceptVsock listens on port, accepts the host's one connection and stops
// listening: nothing else in the guest may connect to the agent later.
func acceptVsock(ctx context.Context, port uint32) (*os.File, error) {
	l, err := listenVsock(port)
	if err != nil {
		return nil, err
	}
	defer l.Close()
	return l.Accept(ctx)
}
