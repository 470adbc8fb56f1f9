package firecracker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Backoff between attempts to reach the guest's agent: the guest listens
// only once its kernel has booted and vminit has mounted its disks.
const (
	connectRetryMin = 5 * time.Millisecond
	connectRetryMax = 100 * time.Millisecond
)

// errNotListening is an attempt that Firecracker ended without "OK":
// nothing in the guest listens on the port (yet).
var errNotListening = errors.New("guest not listening")

// connectGuest opens a stream to the guest's vsock port through
// Firecracker's hybrid vsock (docs/vsock.md, host-initiated connections):
// connect to the unix socket at udsPath, write "CONNECT <port>\n", and
// read "OK <host port>\n". Firecracker closes the connection instead when
// nothing in the guest listens on the port, so connectGuest retries until
// ctx ends. It reads the answer byte by byte: whatever the guest sends
// right after the "OK" line belongs to the caller.
func connectGuest(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	wait := connectRetryMin
	var last error
	for {
		conn, err := connectOnce(ctx, udsPath, port)
		if err == nil {
			return conn, nil
		}
		if ctx.Err() != nil {
			if last == nil {
				last = err
			}
			return nil, fmt.Errorf("connecting to vsock port %d (last attempt: %v): %w", port, last, context.Cause(ctx))
		}
		var pe *handshakeError
		if errors.As(err, &pe) {
			return nil, err // Firecracker answered, but not with OK: retrying will not help
		}
		last = err
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		wait = min(2*wait, connectRetryMax)
	}
}

// handshakeError is an answer to CONNECT that is neither "OK <port>" nor
// a closed connection.
type handshakeError struct{ got string }

func (e *handshakeError) Error() string {
	return fmt.Sprintf("hybrid vsock answered %q instead of OK", e.got)
}

func connectOnce(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	conn, err := hostproc.DialUnix(ctx, udsPath)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	if _, err := io.WriteString(conn, "CONNECT "+strconv.FormatUint(uint64(port), 10)+"\n"); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%w: %v", errNotListening, err)
	}
	line, err := readLine(conn, 64)
	if err != nil {
		conn.Close()
		if len(line) > 0 {
			return nil, &handshakeError{got: line}
		}
		return nil, fmt.Errorf("%w: %v", errNotListening, err)
	}
	rest, ok := strings.CutPrefix(line, "OK ")
	if _, perr := strconv.ParseUint(strings.TrimSuffix(rest, "\n"), 10, 32); !ok || perr != nil {
		conn.Close()
		return nil, &handshakeError{got: line}
	}
	if !stop() {
		// ctx ended just as the answer came: the caller sees ctx.Err.
		conn.Close()
		return nil, context.Cause(ctx)
	}
	return conn, nil
}

// readLine reads one '\n'-terminated line (the newline included), one
// byte at a time, at most max bytes. A short line is returned with the
// error that ended it.
func readLine(r io.Reader, max int) (string, error) {
	buf := make([]byte, 0, 32)
	var b [1]byte
	for len(buf) < max {
		if _, err := r.Read(b[:]); err != nil {
			return string(buf), err
		}
		buf = append(buf, b[0])
		if b[0] == '\n' {
			return string(buf), nil
		}
	}
	return string(buf), fmt.Errorf("line longer than %d bytes", max)
}
