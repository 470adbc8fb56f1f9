package controlplane

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
)

// MaxAsyncPayload is Lambda's limit on an Event invocation's payload.
const MaxAsyncPayload = 256 << 10

const (
	// enqueueBatchMax caps the events committed in one transaction.
	enqueueBatchMax = 512
	// enqueueTimeout bounds one group commit; it is not tied to any one
	// caller's context because the batch is shared.
	enqueueTimeout = 10 * time.Second
	// asyncLease outlasts the longest invocation (900 s timeout plus init
	// and slack) so a running event is never claimed twice; a crashed
	// worker's event is claimed again when it expires.
	asyncLease = function.MaxTimeout*time.Second + 2*time.Minute
	// asyncPoll is how often idle workers look for events that became due
	// without a wake-up (retries scheduled by another process, expired leases).
	asyncPoll = 250 * time.Millisecond
	// maxThrottleBackoff caps the backoff after throttles, as Lambda does.
	maxThrottleBackoff = 5 * time.Minute
	// queueOpTimeout bounds Complete/Retry, which must run even when the
	// worker is being interrupted.
	queueOpTimeout = 10 * time.Second
	// interruptWait bounds how long Close waits for interrupted workers.
	interruptWait = 10 * time.Second

	// Accepting Event invocations and running them share the host's CPU.
	// When many callers wait on the accept path at once (a group commit of
	// at least yieldBatch enqueues), workers hold their next claim until
	// the accept path has had no such commit for yieldQuiet, but never for
	// longer than yieldMax, so execution always progresses (at least
	// AsyncWorkers events per yieldMax while accepting stays saturated).
	// Callers of InvokeAsync wait for their 202; the events they queued do
	// not: on 2 cores, running them during a burst of accepts halved the
	// accept rate. A trickle of enqueues (batches of one or a few) never
	// holds the workers.
	yieldBatch = 8
	yieldQuiet = 20 * time.Millisecond
	yieldMax   = 250 * time.Millisecond
)

// asyncQueue owns the Event path: the group-commit batcher behind
// InvokeAsync and the workers that run queued events.
type asyncQueue struct {
	s *Service

	enq         chan *enqueueReq
	wake        chan struct{}
	stopBatcher chan struct{}
	batcherDone chan struct{}
	stopWorkers chan struct{}
	workers     sync.WaitGroup
	cancelWork  context.CancelFunc

	// gate is held shared while a caller hands a request to the batcher and
	// exclusively by stop, so no request is sent after the batcher exits.
	gate   sync.RWMutex
	closed bool

	// commitMu is held exclusively by the batcher from its commit until the
	// batch's Queued records are handed to the record writer, and shared by
	// workers while they claim, so a worker cannot run an event (and write
	// its final record) before that event's Queued record is handed over,
	// which would then replace the final one.
	commitMu sync.RWMutex

	// saturatedAt is when (Service clock, Unix ns) the batcher last
	// committed a batch of at least yieldBatch enqueues; 0 if never.
	saturatedAt atomic.Int64
}

type enqueueReq struct {
	ev     *store.Event
	queued *invocation.Record
	done   chan error // buffered: the batcher never waits for a caller
}

func newAsyncQueue(s *Service) *asyncQueue {
	return &asyncQueue{
		s:           s,
		enq:         make(chan *enqueueReq, enqueueBatchMax),
		wake:        make(chan struct{}, 1),
		stopBatcher: make(chan struct{}),
		batcherDone: make(chan struct{}),
		stopWorkers: make(chan struct{}),
	}
}

func (q *asyncQueue) start(ctx context.Context) {
	go q.batcher()
	ctx, q.cancelWork = context.WithCancel(ctx)
	for i := 0; i < q.s.cfg.AsyncWorkers; i++ {
		q.workers.Add(1)
		go func() {
			defer q.workers.Done()
			q.worker(ctx)
		}()
	}
}

// stop commits pending enqueues, then lets the workers finish their
// current event; when ctx ends first it interrupts them (their events go
// back to the queue) and returns ctx.Err().
func (q *asyncQueue) stop(ctx context.Context) error {
	q.gate.Lock()
	q.closed = true
	q.gate.Unlock()
	close(q.stopBatcher)
	<-q.batcherDone

	close(q.stopWorkers)
	done := make(chan struct{})
	go func() {
		q.workers.Wait()
		close(done)
	}()
	select {
	case <-done:
		q.cancelWork()
		return nil
	case <-ctx.Done():
	}
	q.cancelWork()
	select {
	case <-done:
	case <-time.After(interruptWait):
		q.s.log.Error("async workers did not stop after interruption")
	}
	return fmt.Errorf("stopping async workers: %w", ctx.Err())
}

// signal wakes one idle worker without blocking.
func (q *asyncQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// InvokeAsync durably queues an Event invocation and returns once the
// transaction holding it has committed. If ctx ends while waiting, the
// event may still have been queued (delivery is at-least-once).
func (s *Service) InvokeAsync(ctx context.Context, in *InvokeInput) error {
	if err := s.running(); err != nil {
		return err
	}
	if len(in.Payload) > MaxAsyncPayload {
		return fmt.Errorf("Request must be smaller than %d bytes for the Invoke operation: %w", MaxAsyncPayload, errdefs.ErrTooLarge)
	}
	fn, err := s.lookup(ctx, in.Function, in.Qualifier)
	if err != nil {
		return err
	}
	cfg := fn.cfg
	if err := checkRunnable(cfg); err != nil {
		return err
	}
	reqID := in.RequestID
	if reqID == "" {
		reqID = uuid.NewString()
	}
	now := s.now()
	req := &enqueueReq{
		ev: &store.Event{
			RequestID:     reqID,
			Function:      cfg.Name,
			Qualifier:     in.Qualifier,
			Payload:       append([]byte(nil), in.Payload...),
			ClientContext: in.ClientContext,
			EnqueuedAt:    now,
			NotBefore:     now,
		},
		queued: &invocation.Record{
			RequestID:  reqID,
			Function:   cfg.Name,
			RevisionID: cfg.RevisionID,
			Version:    cfg.Version,
			Type:       invocation.TypeEvent,
			Status:     invocation.StatusQueued,
			Start:      now,
		},
		done: make(chan error, 1),
	}
	return s.async.enqueue(ctx, req)
}

func (q *asyncQueue) enqueue(ctx context.Context, req *enqueueReq) error {
	q.gate.RLock()
	if q.closed {
		q.gate.RUnlock()
		return fmt.Errorf("control plane is shutting down: %w", errdefs.ErrUnavailable)
	}
	select {
	case q.enq <- req:
	case <-ctx.Done():
		q.gate.RUnlock()
		return ctx.Err()
	}
	q.gate.RUnlock()
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// batcher group-commits enqueues: it takes every request already waiting
// (up to enqueueBatchMax) into one transaction. It does not linger for more:
// under load, requests that arrive while one batch commits form the next,
// so batches grow with concurrency and a lone request pays no extra wait.
func (q *asyncQueue) batcher() {
	defer close(q.batcherDone)
	for {
		var first *enqueueReq
		select {
		case first = <-q.enq:
		case <-q.stopBatcher:
			// The gate guarantees no more sends; commit what is left.
			for {
				batch := q.drain(nil)
				if len(batch) == 0 {
					return
				}
				q.commit(batch)
			}
		}
		q.commit(q.drain([]*enqueueReq{first}))
	}
}

func (q *asyncQueue) drain(batch []*enqueueReq) []*enqueueReq {
	for len(batch) < enqueueBatchMax {
		select {
		case r := <-q.enq:
			batch = append(batch, r)
		default:
			return batch
		}
	}
	return batch
}

func (q *asyncQueue) commit(batch []*enqueueReq) {
	evs := make([]*store.Event, len(batch))
	for i, r := range batch {
		evs[i] = r.ev
	}
	ctx, cancel := context.WithTimeout(context.Background(), enqueueTimeout)
	if len(batch) >= yieldBatch {
		q.saturatedAt.Store(q.s.now().UnixNano())
	}
	q.commitMu.Lock()
	err := q.s.store.Queue().Enqueue(ctx, evs)
	cancel()
	if err != nil {
		err = fmt.Errorf("queueing event: %w", err)
	} else {
		for _, r := range batch {
			q.s.records.writeLater(r.queued)
		}
	}
	q.commitMu.Unlock()
	if err == nil {
		q.signal()
	}
	for _, r := range batch {
		r.done <- err
	}
}

// yieldFor returns how long a worker that has waited waited so far should
// still hold its next claim at now (see yieldBatch).
func (q *asyncQueue) yieldFor(now time.Time, waited time.Duration) time.Duration {
	at := q.saturatedAt.Load()
	if at == 0 || waited >= yieldMax {
		return 0
	}
	quiet := time.Unix(0, at).Add(yieldQuiet).Sub(now)
	return max(min(quiet, yieldMax-waited), 0)
}

// yield holds a worker's next claim while the accept path is saturated,
// within yieldMax. It reports false when the worker must stop.
func (q *asyncQueue) yield(ctx context.Context, t *time.Timer) bool {
	var waited time.Duration
	for {
		d := q.yieldFor(q.s.now(), waited)
		if d <= 0 {
			return true
		}
		t.Reset(d)
		select {
		case <-q.stopWorkers:
			return false
		case <-ctx.Done():
			return false
		case <-t.C:
		}
		waited += d
	}
}

func (q *asyncQueue) worker(ctx context.Context) {
	idle := time.NewTimer(asyncPoll)
	defer idle.Stop()
	hold := time.NewTimer(time.Hour)
	hold.Stop()
	for {
		select {
		case <-q.stopWorkers:
			return
		default:
		}
		if !q.yield(ctx, hold) {
			return
		}
		q.commitMu.RLock()
		evs, err := q.s.store.Queue().Claim(ctx, q.s.now(), asyncLease, 1)
		q.commitMu.RUnlock()
		if err != nil && ctx.Err() == nil {
			q.s.log.Warn("claiming queued events", "error", err)
		}
		if len(evs) > 0 {
			// There may be more: let another idle worker look too.
			q.signal()
			q.s.runEvent(ctx, evs[0])
			continue
		}
		if !idle.Stop() {
			select {
			case <-idle.C:
			default:
			}
		}
		idle.Reset(asyncPoll)
		select {
		case <-q.stopWorkers:
			return
		case <-ctx.Done():
			return
		case <-q.wake:
		case <-idle.C:
		}
	}
}

// wakeAt signals a worker when a retry scheduled for t becomes due, so a
// short retry delay is not stretched to the poll interval.
func (q *asyncQueue) wakeAt(t time.Time) {
	if d := t.Sub(q.s.now()); d <= asyncPoll {
		time.AfterFunc(max(d, 0), q.signal)
	}
}

// Event retry bookkeeping. The queue counts every run in Attempts; Lambda
// limits retries after function errors separately from retries after
// throttles, so the number of function errors so far travels in the
// event's LastError as a "fe=N " prefix.
const fnErrPrefix = "fe="

func encodeLastError(fnErrors int, msg string) string {
	return fnErrPrefix + strconv.Itoa(fnErrors) + " " + msg
}

func functionErrors(lastErr string) int {
	rest, ok := strings.CutPrefix(lastErr, fnErrPrefix)
	if !ok {
		return 0
	}
	n, _, _ := strings.Cut(rest, " ")
	v, err := strconv.Atoi(n)
	if err != nil || v < 0 {
		return 0
	}
	return v
}

// runEvent runs one claimed event and settles it: Complete, or Retry later.
func (s *Service) runEvent(ctx context.Context, ev *store.Event) {
	now := s.now()
	fnErrs := functionErrors(ev.LastError)
	deadline := ev.EnqueuedAt.Add(s.cfg.MaxEventAge)
	stub := &function.Config{Name: ev.Function, Version: function.LatestVersion}
	if _, ok := function.ParseVersion(ev.Qualifier); ok {
		stub.Version = ev.Qualifier
	}
	if now.After(deadline) {
		s.finishEvent(ev, s.failedRecord(ev, stub, now, "EventAgeExceeded",
			fmt.Sprintf("event exceeded maximum age of %s", s.cfg.MaxEventAge)))
		return
	}
	fn, rt, err := s.resolve(ctx, ev.Function, ev.Qualifier)
	if errors.Is(err, errdefs.ErrNotFound) {
		s.finishEvent(ev, s.failedRecord(ev, stub, now, "ResourceNotFoundException", errdefs.Message(err)))
		return
	}
	var (
		res *harness.InvokeResult
		cfg = stub
	)
	if err == nil {
		cfg = fn.cfg
		res, err = s.runOnHost(ctx, &harness.InvokeRequest{
			RequestID:     ev.RequestID,
			Function:      cfg,
			Runtime:       rt,
			ARN:           fn.arn,
			Payload:       ev.Payload,
			ClientContext: ev.ClientContext,
		})
	}
	if err != nil && ctx.Err() != nil {
		// Interrupted by Close: put the event back to run after restart.
		s.retryEvent(ev, s.now(), encodeLastError(fnErrs, "interrupted by shutdown"), nil)
		return
	}
	rec := s.newRecord(ev.RequestID, cfg, invocation.TypeEvent, ev.Attempts, now, res, err)
	switch {
	case err == nil && res.FunctionError == "":
		s.finishEvent(ev, rec)
	case err == nil:
		fnErrs++
		if fnErrs > len(s.cfg.RetryDelays) {
			s.finishEvent(ev, rec)
			return
		}
		at := s.now().Add(s.cfg.RetryDelays[fnErrs-1])
		if at.After(deadline) {
			s.finishEvent(ev, rec)
			return
		}
		s.retryEvent(ev, at, encodeLastError(fnErrs, rec.ErrorType+": "+rec.ErrorMessage), rec)
	default:
		// Throttles and platform errors back off exponentially until the
		// event is too old.
		runs := ev.Attempts - fnErrs
		backoff := s.cfg.ThrottleRetryBase << min(max(runs-1, 0), 20)
		if backoff <= 0 || backoff > maxThrottleBackoff { // also catches overflow
			backoff = maxThrottleBackoff
		}
		at := s.now().Add(backoff)
		if at.After(deadline) {
			rec.ErrorMessage = capMessage(fmt.Sprintf("event exceeded maximum age of %s; last error: %s", s.cfg.MaxEventAge, rec.ErrorMessage))
			s.finishEvent(ev, rec)
			return
		}
		s.retryEvent(ev, at, encodeLastError(fnErrs, rec.ErrorType+": "+rec.ErrorMessage), rec)
	}
}

func (s *Service) failedRecord(ev *store.Event, cfg *function.Config, now time.Time, errType, msg string) *invocation.Record {
	return &invocation.Record{
		RequestID:    ev.RequestID,
		Function:     ev.Function,
		RevisionID:   cfg.RevisionID,
		Version:      cfg.Version,
		Type:         invocation.TypeEvent,
		Status:       invocation.StatusFailed,
		ErrorType:    errType,
		ErrorMessage: capMessage(msg),
		Attempts:     ev.Attempts,
		Start:        now,
		End:          s.now(),
	}
}

// finishEvent removes the event from the queue and writes its final record.
func (s *Service) finishEvent(ev *store.Event, rec *invocation.Record) {
	s.records.write(rec)
	ctx, cancel := context.WithTimeout(context.Background(), queueOpTimeout)
	defer cancel()
	if err := s.store.Queue().Complete(ctx, ev.RequestID); err != nil {
		// The lease will expire and the event run again: at-least-once.
		s.log.Warn("completing queued event", "request_id", ev.RequestID, "function", ev.Function, "error", err)
	}
}

// retryEvent puts the event back for another run at "at". rec, if not
// nil, is the outcome of this run, recorded with status Queued since the
// invocation is not over.
func (s *Service) retryEvent(ev *store.Event, at time.Time, lastErr string, rec *invocation.Record) {
	if rec != nil {
		rec.Status = invocation.StatusQueued
		s.records.write(rec)
	}
	ctx, cancel := context.WithTimeout(context.Background(), queueOpTimeout)
	defer cancel()
	if err := s.store.Queue().Retry(ctx, ev.RequestID, at, lastErr); err != nil {
		s.log.Warn("rescheduling queued event", "request_id", ev.RequestID, "function", ev.Function, "error", err)
		return
	}
	s.async.wakeAt(at)
}
