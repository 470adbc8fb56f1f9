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

func TestNormalizeCopiesOnlyWhatItMust(t *testing.T) {
	e := &testEnv{code: "c"}
	full := e.fn("f", "r1")
	full.ApplyDefaults()
	req := request(full, "x")
	if got := normalize(req, false); got != req {
		t.Fatal("a complete configuration was copied for a caller that waits for the end")
	}
	got := normalize(req, true)
	if got.Function == req.Function || got.Runtime == req.Runtime {
		t.Fatal("work that may outlive the call shares the caller's configuration or runtime")
	}
	if got.Function.RevisionID != full.RevisionID || got.Runtime.ID != req.Runtime.ID {
		t.Fatalf("private copy differs: %+v", got.Function)
	}

	bare := e.fn("f", "r1")
	bare.Timeout, bare.MemorySize, bare.Version = 0, 0, ""
	req = request(bare, "x")
	got = normalize(req, false)
	if got.Function == bare || got.Function.Timeout != 3 || got.Function.MemorySize != 128 || got.Function.Version != "$LATEST" {
		t.Fatalf("defaults not applied on a copy: %+v", got.Function)
	}
	if bare.Timeout != 0 || bare.MemorySize != 0 || bare.Version != "" {
		t.Fatalf("the caller's configuration was modified: %+v", bare)
	}
}
