package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// Defaults for an Init that leaves them zero, as in Lambda.
const (
	defaultMemoryMB      = 128
	defaultTimeoutSec    = 3
	defaultInitTimeoutMs = 10_000
	defaultVersion       = "$LATEST"
)

// errStopped ends the session: Shutdown received, the stream ended, or ctx
// is done. session.shutdown and session.stopErr say which.
var errStopped = errors.New("agent session stopped")

// session is the harness's side of the conversation: it reads frames and
// drives the environment through INIT and invocations, one request at a
// time. While it waits for the runtime it keeps reading frames, so a
// Shutdown or a closed stream is acted on at once and a request that breaks
// the one-at-a-time rule is refused instead of queued.
type session struct {
	e      *env
	conn   *protocol.Conn
	log    *slog.Logger
	frames <-chan frameMsg

	shutdown   bool  // a Shutdown frame ended the session
	stopErr    error // what Run returns after errStopped
	ownsKernel bool  // Options.OwnsKernel
}

// stop records why the session ends and returns errStopped.
func (s *session) stop(err error) error {
	s.stopErr = err
	return errStopped
}

// serve handles frames until the session ends. Between requests it also
// watches an idle runtime, so one that dies is reset at once.
func (s *session) serve(ctx context.Context) error {
	// idle fires when no request has come for idleTrimAfter: the agent
	// then trims its memory (see trimImage), once per idle period.
	idle := time.NewTimer(idleTrimAfter)
	defer idle.Stop()
	for {
		var exited <-chan struct{}
		rt := s.e.idleRuntime()
		if rt != nil {
			exited = rt.proc.done
		}
		select {
		case <-ctx.Done():
			return s.stop(ctx.Err())
		case m, ok := <-s.frames:
			if !ok {
				return s.stop(nil)
			}
			if err := s.handle(ctx, m); err != nil {
				return err
			}
			idle.Reset(idleTrimAfter)
		case <-idle.C:
			trimImage()
			if s.ownsKernel {
				dropCaches()
			}
		case <-exited:
			if s.e.runtimeDied(rt) {
				s.log.Info("runtime exited between invocations", "pid", rt.proc.pid, "status", exitReason(rt.proc.ws))
				if err := s.e.reset(rt); err != nil {
					return err
				}
			}
		}
	}
}

// handle answers one request frame.
func (s *session) handle(ctx context.Context, m frameMsg) error {
	if m.err != nil {
		return s.streamEnded(m.err)
	}
	switch m.f.Type {
	case protocol.TypeInit:
		return s.doInit(ctx, m.f)
	case protocol.TypeInvoke:
		return s.doInvoke(ctx, m.f)
	case protocol.TypeRestore:
		return s.doRestore(m.f)
	case protocol.TypeShutdown:
		s.shutdown = true
		return s.stop(nil)
	}
	return fmt.Errorf("unexpected %s frame from the harness", m.f.Type)
}

// doRestore makes a restored environment a new one (see protocol.Restore)
// and answers RestoreDone. Outside a VM (no kernel of its own) only the
// reported duration applies.
func (s *session) doRestore(f *protocol.Frame) error {
	start := time.Now()
	var req protocol.Restore
	if err := f.Decode(&req); err != nil {
		return err
	}
	if cfg, _ := s.e.config(); cfg == nil {
		return s.write(protocol.TypeRestoreDone, protocol.RestoreDone{Error: &protocol.ErrorInfo{
			ErrorType: errTypeInvalidState, ErrorMessage: "Restore before Init: no snapshot of an initialised environment"}})
	}
	// The snapshot was taken after INIT, before any invocation: what the
	// first invocation reports is the restore, not that INIT.
	s.e.takePendingInit()
	if s.ownsKernel {
		if err := renewEnv(req); err != nil {
			// A restored environment that could not be made unique must
			// not serve: the harness discards it.
			return s.write(protocol.TypeRestoreDone, protocol.RestoreDone{Error: &protocol.ErrorInfo{
				ErrorType: "Sandbox.RestoreFailed", ErrorMessage: err.Error()}})
		}
	}
	if hooks := s.e.releaseRestore(); hooks != nil {
		if f := s.awaitHooks(hooks); f != nil {
			return s.write(protocol.TypeRestoreDone, protocol.RestoreDone{Error: f.info()})
		}
	}
	s.e.setPendingRestore(req.RestoreDuration + time.Since(start))
	return s.write(protocol.TypeRestoreDone, protocol.RestoreDone{})
}

// interrupt handles a frame that arrives while a request is in progress:
// Shutdown and a closed stream end the session; a second Init or Invoke is
// refused with an error answer, the current request goes on.
func (s *session) interrupt(m frameMsg, ok bool) error {
	if !ok {
		return s.stop(nil)
	}
	if m.err != nil {
		return s.streamEnded(m.err)
	}
	switch m.f.Type {
	case protocol.TypeShutdown:
		s.shutdown = true
		return s.stop(nil)
	case protocol.TypeInvoke:
		var req protocol.Invoke
		if err := m.f.Decode(&req); err != nil {
			return err
		}
		return s.refuseInvoke(req, "an invocation or INIT is already in progress")
	case protocol.TypeInit:
		return s.refuseInit("an invocation or INIT is already in progress")
	}
	return fmt.Errorf("unexpected %s frame from the harness", m.f.Type)
}

// streamEnded ends the session after a read error: cleanly for EOF between
// frames (the harness is gone), with an error otherwise.
func (s *session) streamEnded(err error) error {
	if errors.Is(err, io.EOF) {
		return s.stop(nil)
	}
	return s.stop(fmt.Errorf("reading from the harness: %w", err))
}

// write sends one frame to the harness; a failure ends the session.
func (s *session) write(t protocol.Type, hdr any, body ...[]byte) error {
	if err := s.conn.WriteFrame(t, hdr, body...); err != nil {
		return s.stop(err)
	}
	return nil
}

// refuseInvoke answers an Invoke the state does not allow with a function
// error of type Sandbox.InvalidState, leaving the environment unchanged.
func (s *session) refuseInvoke(req protocol.Invoke, reason string) error {
	f := newFailure(errTypeInvalidState, reason)
	res := protocol.Result{
		RequestID:     req.RequestID,
		FunctionError: functionErrUnhandled,
		ErrorType:     f.errorType,
		PayloadLen:    len(f.doc),
	}
	return s.write(protocol.TypeResult, res, f.doc)
}

// refuseInit answers an Init the state does not allow.
func (s *session) refuseInit(reason string) error {
	return s.write(protocol.TypeInitDone, protocol.InitDone{
		Error: &protocol.ErrorInfo{ErrorType: errTypeInvalidState, ErrorMessage: reason},
	})
}

// normalize fills an Init's zero fields with Lambda's defaults and keeps
// LogLimit within what one Result frame can carry.
func normalize(cfg *protocol.Init) {
	if cfg.MemoryMB <= 0 {
		cfg.MemoryMB = defaultMemoryMB
	}
	if cfg.TimeoutSec <= 0 {
		cfg.TimeoutSec = defaultTimeoutSec
	}
	if cfg.InitTimeoutMs <= 0 {
		cfg.InitTimeoutMs = defaultInitTimeoutMs
	}
	if cfg.LogLimit <= 0 {
		cfg.LogLimit = defaultLogLimit
	}
	cfg.LogLimit = min(cfg.LogLimit, maxLogLimit)
	if cfg.FunctionVersion == "" {
		cfg.FunctionVersion = defaultVersion
	}
}

// doInit configures the environment and runs INIT, answering InitDone.
func (s *session) doInit(ctx context.Context, f *protocol.Frame) error {
	var cfg protocol.Init
	if err := f.Decode(&cfg); err != nil {
		return err
	}
	normalize(&cfg)
	if s.ownsKernel && cfg.HostUnixNano > 0 {
		if err := setClock(cfg.HostUnixNano); err != nil {
			s.log.Warn("setting the clock from the host's", "err", err)
		}
	}
	if err := s.e.configure(&cfg); err != nil {
		return s.refuseInit(err.Error())
	}
	r, err := s.runInit(ctx, "", time.Time{})
	if err != nil {
		return err
	}
	if r.fail != nil {
		s.log.Info("init failed", "function", cfg.FunctionName, "error_type", r.fail.errorType)
		initLog := s.e.takePre()
		segs := initLog.Segments()
		if r.fail.logLine != "" {
			if !initLog.endsInNewline() {
				segs = append(segs, []byte("\n"))
			}
			segs = append(segs, []byte(r.fail.logLine))
		}
		return s.write(protocol.TypeInitDone, protocol.InitDone{InitDuration: r.dur, Error: r.fail.info()}, segs...)
	}
	s.e.setPendingInit(r.dur)
	return s.write(protocol.TypeInitDone, protocol.InitDone{InitDuration: r.dur})
}

// initResult is how one INIT ended.
type initResult struct {
	dur    time.Duration
	fail   *failure // nil on success
	peakMB int      // of a failed runtime, for the REPORT line
}

// runInit starts the runtime and waits until its first GET /next (success),
// or an /init/error, its exit, or the INIT timeout (failure, after which
// the runtime is reset). requestID and deadline are set when INIT runs on
// behalf of an invocation: its messages then carry the request id and the
// invocation's deadline also bounds INIT. The error is non-nil only when
// the session must end.
func (s *session) runInit(ctx context.Context, requestID string, deadline time.Time) (initResult, error) {
	rt, cfg, err := s.e.beginInit()
	if err != nil {
		return initResult{}, err
	}
	proc, err := s.e.sup.start(procSpec{
		argv:   cfg.Command,
		env:    s.e.runtimeEnv(&cfg),
		dir:    cfg.Dir,
		uid:    cfg.UID,
		gid:    cfg.GID,
		output: s.e.out.writer(),
	})
	if err != nil {
		msg := withRequestID(requestID, "Error: "+err.Error())
		f := newFailure(errTypeEntrypoint, msg)
		f.logLine = msg + "\n" + errTypeEntrypoint + "\n"
		s.e.endInit(rt, f)
		dur := time.Since(rt.started)
		if err := s.e.reset(rt); err != nil {
			return initResult{}, err
		}
		return initResult{dur: dur, fail: f, peakMB: toMB(0)}, nil
	}
	rt.proc = proc

	initTimeout := time.Duration(cfg.InitTimeoutMs) * time.Millisecond
	bound, byDeadline := initTimeout, false
	if !deadline.IsZero() {
		if d := time.Until(deadline); d < bound {
			bound, byDeadline = d, true
		}
	}
	timer := time.NewTimer(bound)
	defer timer.Stop()
	exited, expired := proc.done, timer.C
	for {
		select {
		case <-rt.initDone:
			// initFail and readyAt were set under env.mu before initDone closed.
			if rt.initFail == nil {
				return initResult{dur: rt.readyAt.Sub(rt.started)}, nil
			}
			dur := time.Since(rt.started)
			if err := s.e.reset(rt); err != nil {
				return initResult{}, err
			}
			return initResult{dur: dur, fail: rt.initFail, peakMB: rt.peakMB()}, nil
		case <-exited:
			exited = nil
			s.e.endInit(rt, exitFailure(requestID, proc.ws))
		case <-expired:
			expired = nil
			f := initTimeoutFailure(time.Now(), requestID, initTimeout)
			if byDeadline {
				f = timeoutFailure(time.Now(), requestID, time.Duration(cfg.TimeoutSec)*time.Second)
			}
			s.e.endInit(rt, f)
		case m, ok := <-s.frames:
			if err := s.interrupt(m, ok); err != nil {
				return initResult{}, err
			}
		case <-ctx.Done():
			return initResult{}, s.stop(ctx.Err())
		}
	}
}

// doInvoke runs one invocation (after INIT if the runtime is not running)
// and answers its Result.
func (s *session) doInvoke(ctx context.Context, f *protocol.Frame) error {
	var req protocol.Invoke
	if err := f.Decode(&req); err != nil {
		return err
	}
	cfg, idle := s.e.config()
	if cfg == nil {
		return s.refuseInvoke(req, "no Init received")
	}
	if s.ownsKernel && req.HostUnixNano > 0 {
		// The deadline is a host time: keep the clock in step with it.
		// (At Init the first frame of a freshly booted guest can take tens
		// of ms to be read; once warm, a frame's transit is well under the
		// slack.)
		if err := setClock(req.HostUnixNano); err != nil {
			s.log.Warn("setting the clock from the host's", "err", err)
		}
	}
	received := time.Now()
	if req.DeadlineUnixMs == 0 {
		req.DeadlineUnixMs = received.Add(time.Duration(cfg.TimeoutSec) * time.Second).UnixMilli()
	}
	if req.FunctionARN == "" {
		req.FunctionARN = cfg.FunctionARN
	}
	deadline := time.UnixMilli(req.DeadlineUnixMs)

	initDur := s.e.takePendingInit()
	restoreDur := s.e.takePendingRestore()
	for attempt := 0; ; attempt++ {
		if idle {
			r, err := s.runInit(ctx, req.RequestID, deadline)
			if err != nil {
				return err
			}
			initDur = r.dur
			if r.fail != nil {
				s.log.Info("init failed", "function", cfg.FunctionName, "request_id", req.RequestID, "error_type", r.fail.errorType)
				return s.writeFailedInit(cfg, req, time.Since(received), r)
			}
		}

		inv, err := s.e.beginInvoke(req, f.Body)
		if err != nil {
			return s.refuseInvoke(req, err.Error())
		}
		o, err := s.await(ctx, inv, deadline, cfg)
		if err != nil {
			return err
		}
		if o.reset {
			if err := s.e.reset(inv.rt); err != nil {
				return err
			}
		}
		if o.undelivered && attempt == 0 {
			// The runtime died between invocations but the harness's Invoke
			// won the race against noticing it: the function never saw the
			// event, so run INIT and hand it over again, once.
			s.log.Info("runtime exited before taking the event; retrying after INIT",
				"function", cfg.FunctionName, "request_id", req.RequestID)
			s.e.carryOver(inv)
			idle = true
			continue
		}
		if o.reset {
			s.log.Info("invocation failed; runtime reset", "function", cfg.FunctionName,
				"request_id", req.RequestID, "error_type", o.fail.errorType)
		}
		return s.writeResult(cfg, inv, o, initDur, restoreDur)
	}
}

// await waits until inv ends: the runtime posts its response or error, it
// exits, or the deadline passes. Whichever happens first decides.
func (s *session) await(ctx context.Context, inv *invocation, deadline time.Time, cfg *protocol.Init) (*outcome, error) {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	id := inv.req.RequestID
	exited, expired := inv.rt.proc.done, timer.C
	for {
		select {
		case <-inv.done:
			return inv.out, nil
		case <-exited:
			exited = nil
			s.e.fail(inv, &outcome{fail: exitFailure(id, inv.rt.proc.ws), exited: true})
		case <-expired:
			expired = nil
			s.e.fail(inv, &outcome{fail: timeoutFailure(time.Now(), id, time.Duration(cfg.TimeoutSec)*time.Second)})
		case m, ok := <-s.frames:
			if err := s.interrupt(m, ok); err != nil {
				return nil, err
			}
		case <-ctx.Done():
			return nil, s.stop(ctx.Err())
		}
	}
}

// writeResult answers an invocation: payload, then its log.
func (s *session) writeResult(cfg *protocol.Init, inv *invocation, o *outcome, initDur, restoreDur time.Duration) error {
	res := protocol.Result{
		RequestID:       inv.req.RequestID,
		Duration:        o.end.Sub(inv.start),
		InitDuration:    initDur,
		RestoreDuration: restoreDur,
		MaxMemoryMB:     inv.rt.peakMB(),
		Reset:           o.reset,
	}
	payload, extra := o.payload, ""
	if o.fail != nil {
		res.FunctionError = functionErrUnhandled
		res.ErrorType = o.fail.errorType
		payload, extra = o.fail.doc, o.fail.logLine
	}
	report := protocol.Report{RequestID: res.RequestID, Duration: res.Duration, MemoryMB: cfg.MemoryMB, MaxMemoryMB: res.MaxMemoryMB,
		InitDuration: initDur, RestoreDuration: restoreDur}.Line()
	segs, n := invocationLog(inv.pre, inv.body, res.RequestID, cfg.FunctionVersion, extra, report)
	res.PayloadLen = len(payload)
	res.LogBytes = n
	return s.write(protocol.TypeResult, &res, append([][]byte{payload}, segs...)...)
}

// writeFailedInit answers an invocation whose INIT failed: the error
// document, and the INIT output followed by the invocation's lines.
func (s *session) writeFailedInit(cfg *protocol.Init, req protocol.Invoke, dur time.Duration, r initResult) error {
	res := protocol.Result{
		RequestID:     req.RequestID,
		FunctionError: functionErrUnhandled,
		ErrorType:     r.fail.errorType,
		Duration:      dur,
		InitDuration:  r.dur,
		MaxMemoryMB:   r.peakMB,
		Reset:         true,
	}
	report := protocol.Report{RequestID: req.RequestID, Duration: dur, MemoryMB: cfg.MemoryMB, MaxMemoryMB: r.peakMB, InitDuration: r.dur}.Line()
	segs, n := invocationLog(s.e.takePre(), newCapBuffer(minTail), req.RequestID, cfg.FunctionVersion, r.fail.logLine, report)
	res.PayloadLen = len(r.fail.doc)
	res.LogBytes = n
	return s.write(protocol.TypeResult, res, append([][]byte{r.fail.doc}, segs...)...)
}
