package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// env is the execution environment: the runtime process, the current
// invocation, the output sinks and the state machine that orders them.
//
// Two kinds of goroutine change it: the session (Run's goroutine, driven by
// the harness) and the Runtime API handlers (driven by the runtime). Every
// change is one step under mu that first checks the state machine, so when
// two events race (a /response and the deadline, an /init/error and the
// runtime's exit) exactly one wins and the other sees the new state. The
// session only waits on channels; it never holds mu while blocking.
//
// Lock order: env.mu, then output.mu.
type env struct {
	log     *slog.Logger
	sup     *supervisor
	out     *output
	apiAddr string // host:port of the Runtime API, for AWS_LAMBDA_RUNTIME_API
	// closed is closed when Run ends; it releases every blocked handler.
	closed chan struct{}

	mu  sync.Mutex
	m   machine
	cfg *protocol.Init // nil until the first Init
	gen uint64         // generation of the newest runtime (see runtimeProc.gen)
	rt  *runtimeProc   // current runtime; nil when Idle
	inv *invocation    // current invocation; nil unless Invoking
	// pre collects output while no invocation is current: INIT output and
	// whatever the runtime prints between invocations. It is kept before
	// START in the next invocation's log, where Lambda would show it.
	pre *capBuffer
	// pendingInit is the INIT duration to report with the next invocation,
	// after an Init frame succeeded.
	pendingInit time.Duration
	// pendingRestore is the restore duration to report with the next
	// invocation (see protocol.Restore).
	pendingRestore time.Duration
	// restoreGate is closed to release a runtime parked in GET
	// /restore/next (nil when none is); hooksDone then receives how its
	// after-restore hooks ended. See restorehooks.go.
	restoreGate chan struct{}
	hooksDone   chan *failure
}

// runtimeProc is one start of the runtime, from fork to reset.
type runtimeProc struct {
	// gen numbers runtime starts. Runtime API connections are stamped with
	// the generation current when they were accepted, so requests from a
	// killed runtime (its last bytes may still be in flight) are refused
	// instead of acting on its successor.
	gen     uint64
	started time.Time
	proc    *process // set by the session right after fork; session-only
	// next carries the current invocation to a GET /next handler (cap 1).
	next chan *invocation
	// gone is closed when the runtime is torn down; it releases its handlers.
	gone     chan struct{}
	goneOnce sync.Once
	// initDone is closed when INIT ends; then readyAt (success) or
	// initFail (failure) is set. Guarded by env.mu until closed.
	initDone chan struct{}
	readyAt  time.Time
	initFail *failure
	// peakKB is the runtime's peak RSS seen so far, read through mem
	// (both session-only).
	peakKB int64
	mem    peakReader
}

// invocation is one event handed to the runtime.
type invocation struct {
	req   protocol.Invoke
	event []byte
	rt    *runtimeProc
	start time.Time
	// pre is the output before this invocation (INIT, between invocations);
	// body is its own output. body is the output sink while it is current.
	pre, body *capBuffer
	// delivered: a GET /next returned the event. Guarded by env.mu.
	delivered bool
	// done is closed when out is set; out is set once, under env.mu.
	done chan struct{}
	out  *outcome
}

// outcome is how an invocation ended.
type outcome struct {
	end     time.Time
	payload []byte   // the response, when fail is nil
	fail    *failure // function error, timeout, crash or oversize response
	// reset: the runtime must be (or was) killed and INIT run again.
	reset bool
	// exited: the runtime exited (set by the caller of fail).
	exited bool
	// undelivered: the runtime exited before any GET /next returned the
	// event, so the function never saw it and it may safely be retried.
	undelivered bool
}

// Errors the Runtime API maps to HTTP statuses.
var (
	errInvalidRequestID = errors.New("invalid request id")
	errStaleRuntime     = fmt.Errorf("request from a runtime that is no longer current: %w", errNotAllowed)
)

func newEnv(log *slog.Logger, sup *supervisor, out *output, pre *capBuffer, apiAddr string) *env {
	return &env{log: log, sup: sup, out: out, pre: pre, apiAddr: apiAddr, closed: make(chan struct{})}
}

// currentGen returns the generation to stamp on a new connection.
func (e *env) currentGen() uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.gen
}

// configure stores an Init's configuration; only allowed while Idle.
func (e *env) configure(cfg *protocol.Init) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.m.is(stateIdle) {
		return fmt.Errorf("init in state %s: %w", e.m.cur, errNotAllowed)
	}
	e.cfg = cfg
	return nil
}

// config returns the current configuration and whether the runtime must be
// initialised before an invocation.
func (e *env) config() (cfg *protocol.Init, idle bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cfg, e.m.is(stateIdle)
}

// beginInit moves Idle -> Initializing and registers a new runtime
// generation; the caller then forks the process.
func (e *env) beginInit() (*runtimeProc, protocol.Init, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.cfg == nil {
		return nil, protocol.Init{}, fmt.Errorf("no Init received: %w", errNotAllowed)
	}
	if err := e.m.to(stateInitializing); err != nil {
		return nil, protocol.Init{}, err
	}
	e.gen++
	rt := &runtimeProc{
		gen:      e.gen,
		started:  time.Now(),
		next:     make(chan *invocation, 1),
		gone:     make(chan struct{}),
		initDone: make(chan struct{}),
		mem:      newPeakReader(),
	}
	e.rt = rt
	e.pendingInit = 0
	return rt, *e.cfg, nil
}

// runtimeEnv is the runtime's environment: Init.Env with
// AWS_LAMBDA_RUNTIME_API pointing at this agent's Runtime API.
func (e *env) runtimeEnv(cfg *protocol.Init) []string {
	env := make([]string, 0, len(cfg.Env)+1)
	for _, kv := range cfg.Env {
		if !strings.HasPrefix(kv, "AWS_LAMBDA_RUNTIME_API=") {
			env = append(env, kv)
		}
	}
	return append(env, "AWS_LAMBDA_RUNTIME_API="+e.apiAddr)
}

// endInit ends INIT of rt with fail (nil: success) if INIT of rt is still
// running; otherwise it does nothing and reports false.
func (e *env) endInit(rt *runtimeProc, fail *failure) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.endInitLocked(rt, fail)
}

func (e *env) endInitLocked(rt *runtimeProc, fail *failure) bool {
	if e.rt != rt || !e.m.is(stateInitializing) {
		return false
	}
	next := stateReady
	if fail != nil {
		next = stateResetting
	}
	if err := e.m.to(next); err != nil {
		return false
	}
	if fail != nil {
		rt.initFail = fail
	} else {
		rt.readyAt = time.Now()
	}
	close(rt.initDone)
	return true
}

// setPendingInit records the INIT duration the next Result reports.
func (e *env) setPendingInit(d time.Duration) {
	e.mu.Lock()
	e.pendingInit = d
	e.mu.Unlock()
}

// setPendingRestore records the restore duration the next Result reports.
func (e *env) setPendingRestore(d time.Duration) {
	e.mu.Lock()
	e.pendingRestore = d
	e.mu.Unlock()
}

// takePendingRestore returns and clears the pending restore duration.
func (e *env) takePendingRestore() time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.pendingRestore
	e.pendingRestore = 0
	return d
}

// takePendingInit returns and clears the pending INIT duration.
func (e *env) takePendingInit() time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.pendingInit
	e.pendingInit = 0
	return d
}

// takePre returns the output collected while no invocation was current and
// starts a fresh collection (after it was reported in an InitDone or a
// failed INIT's Result).
func (e *env) takePre() *capBuffer {
	e.mu.Lock()
	defer e.mu.Unlock()
	old := e.pre
	e.pre = newCapBuffer(e.logLimit())
	e.out.setSink(e.pre)
	return old
}

func (e *env) logLimit() int {
	if e.cfg == nil {
		return defaultLogLimit
	}
	return e.cfg.LogLimit
}

// beginInvoke moves Ready -> Invoking, makes the invocation's log the
// output sink and queues the event for GET /next.
func (e *env) beginInvoke(req protocol.Invoke, event []byte) (*invocation, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.m.to(stateInvoking); err != nil {
		return nil, err
	}
	if e.restoreGate != nil {
		// An invocation without a Restore (the environment was not
		// restored from a snapshot): the runtime must not wait for one.
		close(e.restoreGate)
		e.restoreGate = nil
	}
	inv := &invocation{
		req:   req,
		event: event,
		rt:    e.rt,
		start: time.Now(),
		pre:   e.pre,
		body:  newCapBuffer(e.logLimit()),
		done:  make(chan struct{}),
	}
	e.pre = newCapBuffer(e.logLimit())
	e.out.setSink(inv.body)
	e.inv = inv
	e.rt.next <- inv // cannot block: a runtime's channel holds at most one invocation
	return inv, nil
}

// deliver marks inv as handed to the runtime by GET /next; false if it is
// no longer current (it timed out before the runtime asked for it).
func (e *env) deliver(inv *invocation) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inv != inv || !e.m.is(stateInvoking) || inv.delivered {
		return false
	}
	inv.delivered = true
	return true
}

// complete ends the current invocation with an outcome the runtime posted
// (response, function error, oversize response). gen is the posting
// connection's generation. Before anything is acknowledged to the runtime,
// the output it wrote before posting is moved into the invocation's log and
// later output goes to the next one.
func (e *env) complete(gen uint64, requestID string, o *outcome) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.rt == nil || e.rt.gen != gen {
		return errStaleRuntime
	}
	inv := e.inv
	if inv == nil || inv.req.RequestID != requestID || !inv.delivered {
		return fmt.Errorf("request id %q: %w", requestID, errInvalidRequestID)
	}
	next := stateReady
	if o.reset {
		next = stateResetting
	}
	if err := e.m.to(next); err != nil {
		return err
	}
	o.end = time.Now()
	e.out.setSink(e.pre)
	e.finishLocked(inv, o)
	return nil
}

// fail ends inv with an outcome the agent decided (timeout, crash) unless
// the runtime completed it first, and returns the outcome that won. The
// runtime is then reset; output stays in inv's log until the reset has
// reaped every writer.
func (e *env) fail(inv *invocation, o *outcome) *outcome {
	e.mu.Lock()
	defer e.mu.Unlock()
	if inv.out != nil {
		return inv.out
	}
	if err := e.m.to(stateResetting); err != nil {
		// Only Closed refuses, and then nobody reads the outcome.
		e.log.Debug("failing invocation", "request_id", inv.req.RequestID, "err", err)
	}
	o.end = time.Now()
	o.reset = true
	o.undelivered = o.exited && !inv.delivered
	e.finishLocked(inv, o)
	return o
}

// carryOver keeps the output of an invocation that is retried (see
// outcome.undelivered): it goes before the retry's own INIT output, in the
// order it was written. Called after the reset, with the runtime dead.
func (e *env) carryOver(inv *invocation) {
	e.mu.Lock()
	defer e.mu.Unlock()
	merged := newCapBuffer(e.logLimit())
	e.out.replaceSink(func(cur *capBuffer) *capBuffer {
		for _, b := range []*capBuffer{inv.pre, inv.body, cur} {
			for _, seg := range b.Segments() {
				merged.Write(seg)
			}
		}
		return merged
	})
	e.pre = merged
}

func (e *env) finishLocked(inv *invocation, o *outcome) {
	inv.out = o
	e.inv = nil
	close(inv.done)
}

// runtimeDied moves Ready -> Resetting when the idle runtime rt exited on
// its own; it reports whether the caller must reset it.
func (e *env) runtimeDied(rt *runtimeProc) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.rt != rt || !e.m.is(stateReady) {
		return false
	}
	return e.m.to(stateResetting) == nil
}

// idleRuntime returns the runtime when one is Ready, to watch for its exit.
func (e *env) idleRuntime() *runtimeProc {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.m.is(stateReady) && e.rt != nil && e.rt.proc != nil {
		return e.rt
	}
	return nil
}

// reset tears rt down (state Resetting): it releases rt's handlers, kills
// every process of the runtime, waits until it is reaped, moves what the
// dead processes wrote into the current sink, and ends in Idle with later
// output going to pre.
func (e *env) reset(rt *runtimeProc) error {
	rt.goneOnce.Do(func() { close(rt.gone) })
	if p := rt.proc; p != nil {
		rt.peakKB = max(rt.peakKB, rt.mem.readKB(p.pid))
		rt.mem.close()
		e.sup.kill(p)
		if err := awaitExit(p); err != nil {
			return fmt.Errorf("resetting runtime: %w", err)
		}
		rt.peakKB = max(rt.peakKB, p.ru.Maxrss) // ru_maxrss is in KiB on Linux
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.out.setSink(e.pre)
	if e.rt == rt {
		e.rt = nil
	}
	if err := e.m.to(stateIdle); err != nil {
		return fmt.Errorf("resetting runtime: %w", err)
	}
	return nil
}

// peakMB samples the runtime's peak RSS and returns it in MB (rounded up).
func (rt *runtimeProc) peakMB() int {
	if rt.proc != nil && !rt.proc.exited() {
		rt.peakKB = max(rt.peakKB, rt.mem.readKB(rt.proc.pid))
	}
	return toMB(rt.peakKB)
}

// close ends the environment for good: state Closed, handlers released,
// the runtime killed and reaped.
func (e *env) close() error {
	e.mu.Lock()
	_ = e.m.to(stateClosed)
	select {
	case <-e.closed:
	default:
		close(e.closed)
	}
	rt := e.rt
	e.mu.Unlock()
	if rt == nil {
		return nil
	}
	rt.goneOnce.Do(func() { close(rt.gone) })
	rt.mem.close()
	if p := rt.proc; p != nil {
		e.sup.kill(p)
		return awaitExit(p)
	}
	return nil
}
