package harness

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// unixPair returns both ends of a connected unix stream socket pair, the
// kind of stream the drivers hand out.
func unixPair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var conns [2]net.Conn
	for k, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[k] = c
	}
	return conns[0], conns[1]
}

// An agent that stops reading never blocks exchange: small frames are
// written inline into the socket's buffer, large ones from a goroutine, and
// both end in errNoAnswer when the wait is over.
func TestExchangeWithAnAgentThatStopsReading(t *testing.T) {
	h, a := unixPair(t)
	di := &fakeInstance{id: "i", harness: h, agent: a, done: make(chan struct{})}
	defer di.exit()
	i := &instance{id: "i", closed: make(chan struct{}), gone: make(chan struct{})}
	i.attach(di)
	defer close(i.closed)
	if !i.inlineWrites {
		t.Fatal("small frames are not written inline on a unix socket")
	}
	// Far more unread frames than the harness ever leaves (it destroys an
	// instance that did not answer), and one that cannot fit the buffer.
	for _, size := range []int{0, inlineBodyMax, inlineBodyMax, inlineBodyMax, 4 << 20} {
		_, err := i.exchange(context.Background(), protocol.TypeInvoke, &protocol.Invoke{RequestID: "r"},
			make([]byte, size), protocol.TypeResult, 20*time.Millisecond)
		if !errors.Is(err, errNoAnswer) {
			t.Fatalf("exchange of a %d-byte body with an agent that does not read = %v, want errNoAnswer", size, err)
		}
	}
}

// On a stream without a buffer, every frame is written from a goroutine.
func TestExchangeOnAnUnbufferedStream(t *testing.T) {
	h, a := net.Pipe()
	di := &fakeInstance{id: "i", harness: h, agent: a, done: make(chan struct{})}
	defer di.exit()
	i := &instance{id: "i", closed: make(chan struct{}), gone: make(chan struct{})}
	i.attach(di)
	defer close(i.closed)
	if i.inlineWrites {
		t.Fatal("inline writes on a net.Pipe")
	}
	_, err := i.exchange(context.Background(), protocol.TypeInvoke, &protocol.Invoke{RequestID: "r"}, nil,
		protocol.TypeResult, 20*time.Millisecond)
	if !errors.Is(err, errNoAnswer) {
		t.Fatalf("exchange with an agent that does not read = %v, want errNoAnswer", err)
	}
}
