package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// failsafe bounds every wait in the tests so a bug hangs nothing; it is
// never asserted on.
const failsafe = 60 * time.Second

// testAgent is an agent.Run driven over a socketpair by the test, which
// plays the harness.
type testAgent struct {
	t      *testing.T
	raw    net.Conn
	conn   *protocol.Conn
	done   chan error
	cancel context.CancelFunc
	seq    int
}

// socketpair returns both ends of a connected AF_UNIX stream socket pair.
func socketpair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	return conns[0], conns[1]
}

// startAgent runs the agent in this process on a fresh socketpair.
func startAgent(t *testing.T) *testAgent { return startAgentWith(t, Options{}) }

// startAgentWith runs the agent with opts (RuntimeAPIAddr and Logger are
// the test's).
func startAgentWith(t *testing.T, opts Options) *testAgent {
	t.Helper()
	harnessEnd, agentEnd := socketpair(t)
	ctx, cancel := context.WithCancel(context.Background())
	ta := &testAgent{t: t, raw: harnessEnd, conn: protocol.NewConn(harnessEnd), done: make(chan error, 1), cancel: cancel}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	go func() {
		opts.RuntimeAPIAddr, opts.Logger = "127.0.0.1:0", log
		ta.done <- Run(ctx, agentEnd, opts)
	}()
	t.Cleanup(func() {
		cancel()
		harnessEnd.Close()
		select {
		case <-ta.done:
		case <-time.After(failsafe):
			t.Error("Run did not return after cancel")
		}
	})
	return ta
}

// testWriter sends the agent's diagnostics to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// wait returns Run's result.
func (ta *testAgent) wait() error {
	ta.t.Helper()
	select {
	case err := <-ta.done:
		ta.done <- err // keep it for Cleanup
		return err
	case <-time.After(failsafe):
		ta.t.Fatal("Run did not return")
		return nil
	}
}

func (ta *testAgent) send(typ protocol.Type, hdr any, body ...[]byte) {
	ta.t.Helper()
	if err := ta.conn.WriteFrame(typ, hdr, body...); err != nil {
		ta.t.Fatalf("writing %s: %v", typ, err)
	}
}

func (ta *testAgent) read() *protocol.Frame {
	ta.t.Helper()
	ta.raw.SetReadDeadline(time.Now().Add(failsafe))
	f, err := ta.conn.ReadFrame()
	if err != nil {
		ta.t.Fatalf("reading frame: %v", err)
	}
	return f
}

// init sends Init and returns InitDone and its body (the INIT log on error).
func (ta *testAgent) init(cfg protocol.Init) (protocol.InitDone, string) {
	ta.t.Helper()
	ta.send(protocol.TypeInit, cfg)
	f := ta.read()
	if f.Type != protocol.TypeInitDone {
		ta.t.Fatalf("got %s, want InitDone", f.Type)
	}
	var d protocol.InitDone
	if err := f.Decode(&d); err != nil {
		ta.t.Fatal(err)
	}
	return d, string(f.Body)
}

// result is a decoded Result frame.
type result struct {
	protocol.Result
	payload []byte
	log     string
}

func (ta *testAgent) readResult() result {
	ta.t.Helper()
	f := ta.read()
	if f.Type != protocol.TypeResult {
		ta.t.Fatalf("got %s, want Result", f.Type)
	}
	var r result
	if err := f.Decode(&r.Result); err != nil {
		ta.t.Fatal(err)
	}
	p, l := r.Split(f.Body)
	r.payload, r.log = p, string(l)
	return r
}

// nextID returns a fresh request id.
func (ta *testAgent) nextID() string {
	ta.seq++
	return "req-" + strings.ReplaceAll(ta.t.Name(), "/", "-") + "-" + strconv.Itoa(ta.seq)
}

// sendInvoke sends an Invoke with a deadline timeout from now.
func (ta *testAgent) sendInvoke(id string, a any, timeout time.Duration) {
	ta.t.Helper()
	ev, err := json.Marshal(a)
	if err != nil {
		ta.t.Fatal(err)
	}
	ta.send(protocol.TypeInvoke, protocol.Invoke{
		RequestID:      id,
		DeadlineUnixMs: time.Now().Add(timeout).UnixMilli(),
	}, ev)
}

// invoke runs one invocation and returns its Result.
func (ta *testAgent) invoke(a any) result {
	ta.t.Helper()
	id := ta.nextID()
	ta.sendInvoke(id, a, 20*time.Second)
	r := ta.readResult()
	if r.RequestID != id {
		ta.t.Fatalf("result for %q, want %q", r.RequestID, id)
	}
	return r
}

// mustSucceed fails the test unless r is a successful invocation.
func mustSucceed(t *testing.T, r result) {
	t.Helper()
	if r.FunctionError != "" {
		t.Fatalf("invocation %s failed: %s %s: %s\nlog:\n%s", r.RequestID, r.FunctionError, r.ErrorType, r.payload, r.log)
	}
}

// fakeInit is an Init running the fake runtime in mode initMode.
func fakeInit(t *testing.T, initMode string) protocol.Init {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return protocol.Init{
		FunctionName:    "fake",
		FunctionVersion: "$LATEST",
		FunctionARN:     "arn:aws:lambda:us-east-1:123456789012:function:fake",
		MemoryMB:        128,
		TimeoutSec:      20,
		Command:         []string{exe},
		Env: []string{
			envRole + "=runtime",
			envInitMode + "=" + initMode,
			"PATH=" + os.Getenv("PATH"),
			"AWS_LAMBDA_RUNTIME_API=203.0.113.1:1", // must be overridden
			"USER_VAR=hello",
		},
		Dir: t.TempDir(),
	}
}

// decodeJSON unmarshals b into a fresh T.
func decodeJSON[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decoding %q: %v", b, err)
	}
	return v
}

// processGone reports whether pid no longer exists (reaped).
func processGone(pid int) bool {
	return errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

// between returns the part of log after the first from and before the
// following to (or "" if either is missing).
func between(log, from, to string) string {
	i := strings.Index(log, from)
	if i < 0 {
		return ""
	}
	rest := log[i+len(from):]
	j := strings.Index(rest, to)
	if j < 0 {
		return ""
	}
	return rest[:j]
}
