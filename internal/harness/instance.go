package harness

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/protocol"
)

// Bounds of the harness's own waits. The agent enforces the function's
// timeouts; these only catch an agent that stopped answering.
const (
	// safetyMargin is added to a function's timeout (and to INIT's) before
	// the harness gives up on the agent and destroys the instance.
	safetyMargin = 5 * time.Second
	// initTimeout is Lambda's INIT phase limit.
	initTimeout = 10 * time.Second
	// emulatedInitFactor stretches initTimeout for a driver whose guests
	// run under software emulation (driver.Emulator), where guest code is
	// 5-10x slower: a node runtime's INIT alone takes 9-14 s there.
	emulatedInitFactor = 6
	// startTimeout bounds Driver.Start (booting a sandbox or VM).
	startTimeout = 60 * time.Second
	// stopTimeout bounds Driver.Stop; the driver kills forcibly after it.
	stopTimeout = 10 * time.Second
	// shutdownGrace is how long an idle agent gets to answer Shutdown.
	shutdownGrace = 2 * time.Second
)

// instance is one execution environment as the harness tracks it.
//
// Fields under "guarded by pool.mu" may only be read or written with the
// owning pool's mutex held. The others are written while the instance is
// starting by the goroutine that starts it and are read-only afterwards
// (the state change to idle or busy under pool.mu publishes them).
type instance struct {
	id       string
	function string
	revision string
	memoryMB int
	pool     *pool

	// guarded by pool.mu
	state    State
	lastUsed time.Time
	// retire asks that the instance be stopped as soon as its current work
	// (start or invocation) ends instead of going back to the pool.
	retire bool

	// hostReserved reports that the instance holds a host slot (see
	// Harness.reserveHost); set before Driver.Start.
	hostReserved bool
	codeKey      string
	logStream    string
	drv          driver.Instance
	conn         *protocol.Conn
	inlineWrites bool             // see inlineBodyMax
	frames       chan frameResult // frames read from the agent, one at a time
	broken       chan struct{}    // closed when reading from the agent failed
	closed       chan struct{}    // closed when teardown begins; ends the reader
	gone         chan struct{}    // closed when nothing of the instance remains

	// Phase timings of the cold start, for logs and metrics.
	driverStart  time.Duration
	initTook     time.Duration
	initDuration time.Duration // as the agent measured it (InitDone)
}

type frameResult struct {
	f   *protocol.Frame
	err error
}

func newInstance(p *pool, revision string, memoryMB int) *instance {
	return &instance{
		id:       newInstanceID(),
		function: p.name,
		revision: revision,
		memoryMB: memoryMB,
		pool:     p,
		state:    StateStarting,
		closed:   make(chan struct{}),
		gone:     make(chan struct{}),
	}
}

// attach connects the instance to its started sandbox and starts reading
// frames from the agent.
func (i *instance) attach(di driver.Instance) {
	i.drv = di
	i.conn = protocol.NewConn(di.Conn())
	i.inlineWrites = bufferedStream(di.Conn())
	i.frames = make(chan frameResult)
	i.broken = make(chan struct{})
	go i.readLoop()
}

// readLoop hands every frame the agent sends to whoever is waiting on
// frames. The agent only speaks when spoken to, so there is at most one
// frame in flight. It ends on the first read error (after closing broken)
// or when teardown closes the instance.
func (i *instance) readLoop() {
	for {
		f, err := i.conn.ReadFrame()
		if err != nil {
			close(i.broken)
		}
		select {
		case i.frames <- frameResult{f: f, err: err}:
		case <-i.closed:
			return
		}
		if err != nil {
			return
		}
	}
}

// errAgentGone reports that the agent's stream ended or the sandbox exited.
var errAgentGone = errors.New("agent connection lost")

// errNoAnswer reports that the agent did not answer within the safety net.
var errNoAnswer = errors.New("agent did not answer")

// errProtocol reports that the agent broke the conversation.
var errProtocol = errors.New("agent protocol violation")

// inlineBodyMax is the largest body of a frame exchange writes from its own
// goroutine on a kernel socket. The agent reads every frame as it arrives
// and the harness has at most one request outstanding per instance (it
// destroys an instance whose agent did not answer), so the stream holds at
// most a frame or two unread. Such a frame (this body and a header under
// protocol.MaxHeader, in practice a few hundred bytes) fits twice in a
// socket's buffer (208 KiB by default for the unix sockets both drivers
// use), so writing it cannot block, even when the agent hangs.
const inlineBodyMax = 8 << 10

// bufferedStream reports whether c is a kernel socket, whose buffer lets
// exchange write small frames inline (a net.Pipe, say, has none).
func bufferedStream(c io.ReadWriteCloser) bool {
	switch c.(type) {
	case *net.UnixConn, *net.TCPConn:
		return true
	}
	return false
}

// exchange sends one request frame and waits for the answer of type want.
// A frame that may not fit the stream's buffer is written from another
// goroutine because a hung agent may not read it; a teardown (closing the stream) unblocks that write. It
// returns errAgentGone, errNoAnswer (after wait), errProtocol, or abort's
// error when abort is done first. The instance must be torn down after any
// error.
func (i *instance) exchange(abort context.Context, t protocol.Type, hdr any, body []byte, want protocol.Type, wait time.Duration) (*protocol.Frame, error) {
	var writeErr chan error
	if i.inlineWrites && len(body) <= inlineBodyMax {
		if err := i.conn.WriteFrame(t, hdr, body); err != nil {
			return nil, fmt.Errorf("sending %s: %w: %w", t, errAgentGone, err)
		}
	} else {
		writeErr = make(chan error, 1)
		go func() { writeErr <- i.conn.WriteFrame(t, hdr, body) }()
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		select {
		case err := <-writeErr:
			if err != nil {
				return nil, fmt.Errorf("sending %s: %w: %w", t, errAgentGone, err)
			}
			writeErr = nil
		case fr := <-i.frames:
			if fr.err != nil {
				if errors.Is(fr.err, io.EOF) || errors.Is(fr.err, io.ErrUnexpectedEOF) {
					return nil, fmt.Errorf("waiting for %s: %w", want, errAgentGone)
				}
				return nil, fmt.Errorf("waiting for %s: %w: %w", want, errAgentGone, fr.err)
			}
			if fr.f.Type != want {
				return nil, fmt.Errorf("got %s while waiting for %s: %w", fr.f.Type, want, errProtocol)
			}
			return fr.f, nil
		case <-i.drv.Done():
			return nil, fmt.Errorf("waiting for %s: sandbox exited: %w", want, errAgentGone)
		case <-timer.C:
			return nil, fmt.Errorf("waiting %s for %s: %w", wait, want, errNoAnswer)
		case <-abort.Done():
			return nil, context.Cause(abort)
		}
	}
}

// shutdown asks an idle agent to stop its runtime and exit, so the runtime
// gets SIGTERM from its own supervisor before the driver kills the sandbox.
// Best effort and bounded: Driver.Stop follows in any case.
func (i *instance) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	_, _ = i.exchange(ctx, protocol.TypeShutdown, protocol.Shutdown{}, nil, protocol.TypeShutdownDone, shutdownGrace)
}

// initMessage builds the Init frame for a cold start (initType
// on-demand) or a snapshot's INIT (snap-start).
func (h *Harness) initMessage(req *InvokeRequest, logStream, initType string) protocol.Init {
	fn := req.Function
	return protocol.Init{
		FunctionName:    fn.Name,
		FunctionVersion: fn.Version,
		FunctionARN:     req.ARN,
		MemoryMB:        fn.MemorySize,
		TimeoutSec:      fn.Timeout,
		Command:         append([]string(nil), req.Runtime.Bootstrap...),
		Env:             buildEnv(envInput{Function: fn, Runtime: req.Runtime, Region: h.cfg.Region, LogStream: logStream, InitType: initType}),
		Dir:             taskRoot,
		UID:             h.cfg.SandboxUID,
		GID:             h.cfg.SandboxGID,
		InitTimeoutMs:   h.initTimeout.Milliseconds(),
		LogLimit:        invocation.MaxLogBytes,
		InitType:        initType,
		HostUnixNano:    h.now().UnixNano(),
	}
}

// coldStart brings a starting instance up: code, runtime files, sandbox,
// INIT. On success the instance is still starting and the caller moves it
// on. A function's INIT failure is a result (Unhandled), not an error; in
// that case and on any error the instance has been handed to teardown.
func (h *Harness) coldStart(i *instance, req *InvokeRequest, start time.Time) (*InvokeResult, error) {
	ctx := h.bgCtx
	fn := req.Function

	codeDir, key, err := h.code.acquire(ctx, fn.CodeSha256)
	if err != nil {
		h.abandon(i, "code unavailable")
		// %v on purpose: a blob the store cannot find or a code digest the
		// cache refuses is the platform's failure, never the caller's, so it
		// must not keep an errdefs kind that the frontend would report as
		// the client's fault (404, 400, 413). The frontend logs it once and
		// answers ServiceException.
		return nil, fmt.Errorf("preparing code of %s: %v", fn.Name, err)
	}
	i.codeKey = key
	i.pool.pinCode(i.revision, key, h.code)

	runtimeDir, err := h.runtimes.dirFor(ctx, req.Runtime.Family)
	if err != nil {
		h.abandon(i, "runtime files unavailable")
		return nil, fmt.Errorf("preparing runtime %s: %w", req.Runtime.ID, err)
	}

	spec := driver.Spec{
		ID:          i.id,
		Function:    fn.Name,
		RevisionID:  fn.RevisionID,
		Runtime:     *req.Runtime,
		CodeDir:     codeDir,
		CodeSha256:  fn.CodeSha256,
		RuntimeDir:  runtimeDir,
		MemoryMB:    fn.MemorySize,
		EphemeralMB: fn.EphemeralStorage,
		Network:     h.cfg.Network,
	}
	if di := h.tryRestore(ctx, i, req, spec); di != nil {
		i.attach(di)
		i.logStream = logStreamName(h.now(), fn.Version)
		h.stats.coldStarts.Add(1)
		h.stats.driverStartNs.Add(int64(i.driverStart))
		h.metrics.coldStart(i.driverStart, 0)
		go h.watch(i)
		h.log.Debug("instance restored", "function", i.function, "revision", i.revision, "instance", i.id,
			"driver_start", i.driverStart)
		return nil, nil
	}
	t0 := time.Now()
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	di, err := h.cfg.Driver.Start(startCtx, spec)
	cancel()
	i.driverStart = time.Since(t0)
	if err != nil {
		h.abandon(i, "start failed")
		if ctx.Err() != nil {
			return nil, fmt.Errorf("starting instance of %s: harness is shutting down: %w", fn.Name, errdefs.ErrUnavailable)
		}
		return nil, fmt.Errorf("starting instance %s of %s: %w", i.id, fn.Name, err)
	}
	i.attach(di)

	i.logStream = logStreamName(h.now(), fn.Version)
	t1 := time.Now()
	f, err := i.exchange(ctx, protocol.TypeInit, h.initMessage(req, i.logStream, initTypeOnDemand), nil, protocol.TypeInitDone, h.initTimeout+safetyMargin)
	i.initTook = time.Since(t1)
	if err != nil {
		h.destroy(i, "init failed", false)
		if errors.Is(err, errAgentGone) {
			// The sandbox died during INIT (e.g. out of memory): Lambda
			// reports that as the function's error.
			h.stats.initErrors.Add(1)
			return h.exitResult(req, i, start, true), nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("initialising instance of %s: harness is shutting down: %w", fn.Name, errdefs.ErrUnavailable)
		}
		return nil, fmt.Errorf("initialising instance %s of %s: %w", i.id, fn.Name, err)
	}
	var done protocol.InitDone
	if err := f.Decode(&done); err != nil {
		h.destroy(i, "init failed", false)
		return nil, fmt.Errorf("initialising instance %s of %s: %w: %w", i.id, fn.Name, errProtocol, err)
	}
	i.initDuration = done.InitDuration
	h.stats.coldStarts.Add(1)
	h.stats.driverStartNs.Add(int64(i.driverStart))
	h.stats.initNs.Add(int64(i.initTook))
	h.metrics.coldStart(i.driverStart, i.initTook)
	if done.Error != nil {
		h.stats.initErrors.Add(1)
		h.destroy(i, "init error", true)
		return h.initErrorResult(req, i, done, f.Body, start), nil
	}
	go h.watch(i)
	h.log.Debug("instance started", "function", i.function, "revision", i.revision, "instance", i.id,
		"driver_start", i.driverStart, "init", i.initTook)
	return nil, nil
}

// watch destroys an idle instance whose sandbox exits or whose agent
// stream breaks; a busy or starting one is handled by the goroutine that
// holds it.
func (h *Harness) watch(i *instance) {
	select {
	case <-i.drv.Done():
	case <-i.broken:
	case <-i.closed:
		return
	}
	p := i.pool
	p.mu.Lock()
	if i.state != StateIdle {
		p.mu.Unlock()
		return
	}
	err := p.move(i, StateStopping)
	p.mu.Unlock()
	if err == nil {
		h.stats.exits.Add(1)
		go h.teardown(i, "exited", false)
	}
}

// invokeOn runs one invocation on a busy instance. keep reports whether the
// instance may serve another invocation; reason says why not.
func (h *Harness) invokeOn(i *instance, req *InvokeRequest, cold bool, start time.Time) (res *InvokeResult, keep bool, reason string, err error) {
	fn := req.Function
	timeout := time.Duration(fn.Timeout) * time.Second
	now := h.now()
	hdr := protocol.Invoke{
		RequestID:      req.RequestID,
		DeadlineUnixMs: now.Add(timeout).UnixMilli(),
		HostUnixNano:   now.UnixNano(),
		FunctionARN:    req.ARN,
		TraceID:        req.TraceID,
		ClientContext:  decodeClientContext(req.ClientContext),
	}
	payload := req.Payload
	if payload == nil {
		payload = []byte{}
	}
	t0 := time.Now()
	f, err := i.exchange(h.bgCtx, protocol.TypeInvoke, &hdr, payload, protocol.TypeResult, timeout+safetyMargin)
	h.metrics.invoke(time.Since(t0))
	switch {
	case err == nil:
	case errors.Is(err, errNoAnswer):
		h.stats.timeouts.Add(1)
		return h.timeoutResult(req, i, start, cold), false, "timed out", nil
	case errors.Is(err, errAgentGone):
		h.stats.exits.Add(1)
		return h.exitResult(req, i, start, cold), false, "exited", nil
	case h.bgCtx.Err() != nil:
		return nil, false, "harness closing", fmt.Errorf("invoking %s: harness is shutting down: %w", fn.Name, errdefs.ErrUnavailable)
	default:
		return nil, false, "protocol error", fmt.Errorf("invoking %s on instance %s: %w", fn.Name, i.id, err)
	}
	var r protocol.Result
	if err := f.Decode(&r); err != nil {
		return nil, false, "protocol error", fmt.Errorf("invoking %s on instance %s: %w: %w", fn.Name, i.id, errProtocol, err)
	}
	if r.RequestID != req.RequestID {
		return nil, false, "protocol error", fmt.Errorf("invoking %s on instance %s: result for request %q: %w", fn.Name, i.id, r.RequestID, errProtocol)
	}
	payloadOut, logOut := r.Split(f.Body)
	initDur := r.InitDuration
	if initDur == 0 && cold {
		initDur = i.initDuration
	}
	res = &InvokeResult{
		RequestID:     req.RequestID,
		Payload:       payloadOut,
		FunctionError: r.FunctionError,
		ErrorType:     r.ErrorType,
		Log:           logOut,
		LogBytes:      r.LogBytes,
		Start:         start,
		End:           h.now(),
		Duration:      r.Duration,
		InitDuration:  initDur,
		Cold:          cold,
		MaxMemoryMB:   r.MaxMemoryMB,
		Instance:      i.id,
	}
	if r.Reset {
		h.stats.resets.Add(1)
		return res, false, "runtime reset", nil
	}
	return res, true, "", nil
}

// errorPayload encodes a Lambda error document.
func errorPayload(info protocol.ErrorInfo) []byte {
	b, err := json.Marshal(info)
	if err != nil {
		// ErrorInfo has only strings; Marshal cannot fail.
		panic(err)
	}
	return b
}

// decodeClientContext turns X-Amz-Client-Context (base64 of JSON, as the
// client sends it) into the JSON the Runtime API hands to the runtime in
// Lambda-Runtime-Client-Context: aws-lambda-go and the other runtime
// clients unmarshal that header as JSON. A value that is not base64 is
// passed through unchanged.
func decodeClientContext(s string) string {
	if s == "" {
		return ""
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return s
	}
	return string(b)
}
