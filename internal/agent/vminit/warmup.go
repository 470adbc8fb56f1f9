package vminit

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/agent"
	"github.com/invokex/invokex/internal/protocol"
)

// The warm-up (protocol.Renewal.WarmUp). Under QEMU's TCG every guest
// instruction runs as host code translated the first time it runs, and a
// VM restored from a snapshot starts with none: a spare restored from a
// template would translate the guest kernel's exec, page-fault, TCP and
// epoll paths and the agent's Runtime API server during the cold start
// that takes it, for every function alike. So the spare's init runs the
// whole agent once, in its own process, with this binary as the runtime:
// INIT, a few invocations over the Runtime API on loopback, shutdown. The
// translated code is kept (it is keyed by guest physical address: the
// kernel's pages and this binary's page cache are the same when the real
// agent runs), and the cold start translates only the function's own code.
// A cold start on a spare measured here went from 0.8 to 0.5 s (see
// docs/benchmarks-qemu.md). Nothing of the warm-up outlives it: agent.Run
// kills and reaps its runtime and closes its listener before it returns.

// warmUpArg is the warm-up runtime's argv[1].
const warmUpArg = "invokex-warmup-runtime"

// warmUpInvokes is how many invocations the warm-up runs: the first one
// takes paths the later ones do not (the runtime's first /next).
const warmUpInvokes = 3

// warmUpTimeout bounds the warm-up; it takes well under a second under
// emulation.
const warmUpTimeout = 20 * time.Second

// IsWarmUpRuntime reports whether this process is the warm-up's runtime,
// which a spare's init starts from its own binary.
func IsWarmUpRuntime() bool {
	return os.Getpid() != 1 && len(os.Args) == 2 && os.Args[1] == warmUpArg &&
		os.Getenv("AWS_LAMBDA_FUNCTION_NAME") == warmUpFunction
}

// warmUpFunction is the warm-up's function name.
const warmUpFunction = "invokex-warmup"

// warmUp runs agent.Run against a protocol conversation of its own: Init
// with this binary as the runtime, warmUpInvokes invocations, Shutdown.
// It returns once the agent has ended.
func warmUp(ctx context.Context, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, warmUpTimeout)
	defer cancel()
	guestEnd, hostEnd := net.Pipe()
	done := make(chan error, 1)
	go func() {
		// Port 0: the Runtime API address the real agent listens on stays
		// free whatever the warm-up leaves in TIME_WAIT. No SplitCPUs: it
		// pins the calling process to its first CPU, and the real agent,
		// which splits the CPUs this process may use, would then find one
		// and leave the runtime on the agent's vCPU.
		done <- agent.Run(ctx, guestEnd, agent.Options{RuntimeAPIAddr: "127.0.0.1:0", Logger: log})
	}()
	stop := context.AfterFunc(ctx, func() { hostEnd.Close() })
	err := converse(protocol.NewConn(hostEnd))
	stop()
	hostEnd.Close()
	if rerr := <-done; err == nil {
		err = rerr
	}
	return err
}

// converse is the harness's side of the warm-up.
func converse(pc *protocol.Conn) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	if err := pc.WriteFrame(protocol.TypeInit, protocol.Init{
		FunctionName: warmUpFunction, FunctionVersion: "$LATEST", MemoryMB: 128, TimeoutSec: 10,
		Command: []string{exe, warmUpArg}, Env: []string{"AWS_LAMBDA_FUNCTION_NAME=" + warmUpFunction},
		Dir: "/",
	}); err != nil {
		return fmt.Errorf("warm-up init: %w", err)
	}
	var done protocol.InitDone
	if err := await(pc, protocol.TypeInitDone, &done); err != nil {
		return fmt.Errorf("warm-up init: %w", err)
	}
	if done.Error != nil {
		return fmt.Errorf("warm-up init: %s", done.Error.ErrorMessage)
	}
	for n := range warmUpInvokes {
		inv := protocol.Invoke{
			RequestID:      "warmup-" + strconv.Itoa(n),
			DeadlineUnixMs: time.Now().Add(10 * time.Second).UnixMilli(),
			FunctionARN:    "arn:aws:lambda:invokex:000000000000:function:" + warmUpFunction,
		}
		if err := pc.WriteFrame(protocol.TypeInvoke, inv, []byte(`{"warm":"up"}`)); err != nil {
			return fmt.Errorf("warm-up invoke: %w", err)
		}
		var res protocol.Result
		if err := await(pc, protocol.TypeResult, &res); err != nil {
			return fmt.Errorf("warm-up invoke: %w", err)
		}
		if res.FunctionError != "" {
			return fmt.Errorf("warm-up invoke: %s %s", res.FunctionError, res.ErrorType)
		}
	}
	if err := pc.WriteFrame(protocol.TypeShutdown, protocol.Shutdown{}); err != nil {
		return fmt.Errorf("warm-up shutdown: %w", err)
	}
	return await(pc, protocol.TypeShutdownDone, &protocol.ShutdownDone{})
}

// await reads the next frame, which must be of type t, into v.
func await(pc *protocol.Conn, t protocol.Type, v any) error {
	f, err := pc.ReadFrame()
	if err != nil {
		return err
	}
	if f.Type != t {
		return fmt.Errorf("agent sent %v, not %v", f.Type, t)
	}
	return f.Decode(v)
}

// WarmUpRuntimeMain is the warm-up's runtime: a Runtime API client that
// answers every event with itself until the agent kills it. It speaks
// HTTP/1.1 on one kept-alive connection by hand rather than with
// net/http's client: what it runs is translated for the warm-up only (a
// function's runtime has its own copy of any client), so it runs as
// little of its own as it can; the kernel's TCP paths and the agent's
// server are what the warm-up is for.
func WarmUpRuntimeMain() int {
	if err := echoEvents(os.Getenv("AWS_LAMBDA_RUNTIME_API")); err != nil {
		fmt.Fprintln(os.Stderr, "warm-up runtime:", err)
		return 1
	}
	return 0
}

// echoEvents takes events from the Runtime API at addr and posts each
// back as its response, until the connection fails.
func echoEvents(addr string) error {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	r := textproto.NewReader(bufio.NewReader(conn))
	const path = "/2018-06-01/runtime/invocation/"
	for {
		if _, err := fmt.Fprintf(conn, "GET %snext HTTP/1.1\r\nHost: %s\r\n\r\n", path, addr); err != nil {
			return err
		}
		h, event, err := readResponse(r, "200")
		if err != nil {
			return fmt.Errorf("next: %w", err)
		}
		id := h.Get("Lambda-Runtime-Aws-Request-Id")
		if id == "" {
			return errors.New("next: no request id")
		}
		if _, err := fmt.Fprintf(conn, "POST %s%s/response HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
			path, id, addr, len(event), event); err != nil {
			return err
		}
		if _, _, err := readResponse(r, "202"); err != nil {
			return fmt.Errorf("response: %w", err)
		}
	}
}

// readResponse reads one HTTP/1.1 response with a Content-Length body and
// checks its status code.
func readResponse(r *textproto.Reader, code string) (textproto.MIMEHeader, []byte, error) {
	status, err := r.ReadLine()
	if err != nil {
		return nil, nil, err
	}
	if _, rest, _ := strings.Cut(status, " "); !strings.HasPrefix(rest, code) {
		return nil, nil, errors.New(status)
	}
	h, err := r.ReadMIMEHeader()
	if err != nil {
		return nil, nil, err
	}
	n, err := strconv.Atoi(h.Get("Content-Length"))
	if err != nil || n < 0 {
		return nil, nil, fmt.Errorf("content length %q", h.Get("Content-Length"))
	}
	body := make([]byte, n)
	_, err = io.ReadFull(r.R, body)
	return h, body, err
}
