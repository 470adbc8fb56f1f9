package controlplane

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
)

// waitRecord waits until the record of id has a final status.
func (e *testEnv) waitRecord(id string) *invocation.Record {
	e.t.Helper()
	var rec *invocation.Record
	waitFor(e.t, "final record of "+id, func() bool {
		r, err := e.svc.GetInvocation(context.Background(), id)
		if err != nil || r.Status == invocation.StatusQueued {
			return false
		}
		rec = r
		return true
	})
	return rec
}

func (e *testEnv) queueLen() int {
	e.t.Helper()
	n, err := e.store.Queue().Len(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

func TestAsyncEventRuns(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	cfg := e.create("f")
	if err := e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "ev-1", Function: "f", Payload: []byte(`{"x":1}`), ClientContext: "Y2M="}); err != nil {
		t.Fatal(err)
	}
	// Accepted means queued or already run, never unknown.
	if rec, err := e.svc.GetInvocation(ctx, "ev-1"); err != nil || rec.Type != invocation.TypeEvent {
		t.Fatalf("record right after InvokeAsync: %+v, %v", rec, err)
	}
	rec := e.waitRecord("ev-1")
	if rec.Status != invocation.StatusSucceeded || rec.Attempts != 1 || rec.Type != invocation.TypeEvent || rec.RevisionID != cfg.RevisionID {
		t.Fatalf("record = %+v", rec)
	}
	reqs := e.host.requests()
	if len(reqs) != 1 || reqs[0].RequestID != "ev-1" || string(reqs[0].Payload) != `{"x":1}` || reqs[0].ClientContext != "Y2M=" {
		t.Fatalf("host requests = %+v", reqs)
	}
	waitFor(t, "queue empty", func() bool { return e.queueLen() == 0 })
}

func TestAsyncRejects(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	wantKind(t, e.svc.InvokeAsync(ctx, &InvokeInput{Function: "ghost"}), errdefs.ErrNotFound, "Function not found")
	wantKind(t, e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f", Qualifier: "3"}), errdefs.ErrNotFound, "function:f:3")
	big := make([]byte, MaxAsyncPayload+1)
	wantKind(t, e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f", Payload: big}), errdefs.ErrTooLarge, "262144")
	if err := e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f", Payload: big[:MaxAsyncPayload]}); err != nil {
		t.Fatalf("payload at the limit: %v", err)
	}
}

func TestAsyncFunctionErrorRetriedTwice(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		return fnErrorResult(req), nil
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	rec := e.waitRecord("ev")
	if rec.Status != invocation.StatusFunctionError || rec.Attempts != 3 || rec.ErrorType != "Error" || rec.ErrorMessage != "boom" {
		t.Fatalf("record = %+v", rec)
	}
	if n := e.host.calls("ev"); n != 3 {
		t.Fatalf("function ran %d times, want 3 (1 + 2 retries)", n)
	}
	waitFor(t, "queue empty", func() bool { return e.queueLen() == 0 })
}

func TestAsyncNoRetriesConfigured(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.RetryDelays = []time.Duration{} })
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		return fnErrorResult(req), nil
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	if rec := e.waitRecord("ev"); rec.Status != invocation.StatusFunctionError || rec.Attempts != 1 {
		t.Fatalf("record = %+v", rec)
	}
}

func TestAsyncThrottleRetriedThenSucceeds(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		if n <= 3 {
			return nil, errdefs.Throttled(errdefs.ReasonConcurrentInvocationLimit, "Rate Exceeded.")
		}
		return okResult(req, []byte("ok")), nil
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	rec := e.waitRecord("ev")
	if rec.Status != invocation.StatusSucceeded || rec.Attempts != 4 {
		t.Fatalf("record = %+v", rec)
	}
}

// Throttles do not use up the retries Lambda grants after function errors.
func TestAsyncThrottlesDoNotCountAsFunctionErrors(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		if n%2 == 1 {
			return nil, errdefs.Throttled(errdefs.ReasonConcurrentInvocationLimit, "Rate Exceeded.")
		}
		return fnErrorResult(req), nil
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	rec := e.waitRecord("ev")
	// throttle, error, throttle, error, throttle, error: three function errors.
	if rec.Status != invocation.StatusFunctionError || rec.Attempts != 6 || e.host.calls("ev") != 6 {
		t.Fatalf("record = %+v after %d calls", rec, e.host.calls("ev"))
	}
}

func TestAsyncMaxEventAge(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.MaxEventAge = 30 * time.Millisecond
		c.ThrottleRetryBase = 5 * time.Millisecond
	})
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		return nil, fmt.Errorf("host draining: %w", errdefs.ErrUnavailable)
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	rec := e.waitRecord("ev")
	// The event ends when a retry would come too late (the last error's
	// type, ServiceException) or, when the worker's claim of the retry
	// itself came too late (a busy machine), at that claim
	// (EventAgeExceeded, that claim counted and not run).
	calls := e.host.calls("ev")
	switch {
	case rec.Status != invocation.StatusFailed || !strings.Contains(rec.ErrorMessage, "event exceeded maximum age"):
		t.Fatalf("record = %+v", rec)
	case rec.ErrorType == "ServiceException" && (rec.Attempts < 1 || calls != rec.Attempts):
		t.Fatalf("attempts %d, host calls %d", rec.Attempts, calls)
	case rec.ErrorType == "EventAgeExceeded" && (calls < 1 || rec.Attempts != calls+1):
		t.Fatalf("expired at a claim: attempts %d, host calls %d", rec.Attempts, calls)
	case rec.ErrorType != "ServiceException" && rec.ErrorType != "EventAgeExceeded":
		t.Fatalf("record = %+v", rec)
	}
	waitFor(t, "queue empty", func() bool { return e.queueLen() == 0 })
}

func TestAsyncDeletedFunctionFails(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	started := make(chan struct{})
	release := make(chan struct{})
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		if n == 1 {
			close(started)
			<-release
			return nil, errdefs.Throttled(errdefs.ReasonConcurrentInvocationLimit, "Rate Exceeded.")
		}
		return okResult(req, nil), nil
	}
	if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	<-started
	if err := e.svc.DeleteFunction(context.Background(), "f"); err != nil {
		t.Fatal(err)
	}
	close(release)
	rec := e.waitRecord("ev")
	if rec.Status != invocation.StatusFailed || rec.ErrorType != "ResourceNotFoundException" || rec.Attempts != 2 {
		t.Fatalf("record = %+v", rec)
	}
	if n := e.host.calls("ev"); n != 1 {
		t.Fatalf("host ran the deleted function's event %d times, want 1", n)
	}
	waitFor(t, "queue empty", func() bool { return e.queueLen() == 0 })
}

func TestAsyncEventOfUnknownFunctionInQueue(t *testing.T) {
	e := newEnv(t, nil)
	now := time.Now()
	// As if queued before the function was deleted by another process.
	if err := e.store.Queue().Enqueue(context.Background(), []*store.Event{{RequestID: "orphan", Function: "gone", EnqueuedAt: now, NotBefore: now}}); err != nil {
		t.Fatal(err)
	}
	e.svc.async.signal()
	rec := e.waitRecord("orphan")
	if rec.Status != invocation.StatusFailed || rec.ErrorType != "ResourceNotFoundException" || !strings.Contains(rec.ErrorMessage, "function:gone") {
		t.Fatalf("record = %+v", rec)
	}
}

// countingQueue blocks the first Enqueue until released and records the
// size of every batch.
type countingQueue struct {
	store.Queue
	mu      sync.Mutex
	sizes   []int
	first   chan struct{} // closed when the first Enqueue starts
	release chan struct{}
}

func (q *countingQueue) Enqueue(ctx context.Context, evs []*store.Event) error {
	q.mu.Lock()
	q.sizes = append(q.sizes, len(evs))
	isFirst := len(q.sizes) == 1
	q.mu.Unlock()
	if isFirst {
		close(q.first)
		<-q.release
	}
	return q.Queue.Enqueue(ctx, evs)
}

type queueStore struct {
	store.Store
	q *countingQueue
}

func (s *queueStore) Queue() store.Queue { return s.q }

func TestAsyncGroupCommit(t *testing.T) {
	var cq *countingQueue
	e := newEnv(t, func(c *Config) {
		cq = &countingQueue{Queue: c.Store.Queue(), first: make(chan struct{}), release: make(chan struct{})}
		c.Store = &queueStore{Store: c.Store, q: cq}
	})
	e.create("f")
	ctx := context.Background()
	errs := make(chan error, 50)
	go func() { errs <- e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "lead", Function: "f"}) }()
	<-cq.first
	// While the first batch commits, 49 more callers arrive; none may
	// return before its own batch has committed.
	for i := 0; i < 49; i++ {
		go func() { errs <- e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: fmt.Sprintf("ev%d", i), Function: "f"}) }()
	}
	waitFor(t, "49 callers waiting", func() bool { return len(e.svc.async.enq) == 49 })
	select {
	case err := <-errs:
		t.Fatalf("an InvokeAsync returned (%v) before its batch committed", err)
	default:
	}
	close(cq.release)
	for i := 0; i < 50; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	cq.mu.Lock()
	sizes := append([]int(nil), cq.sizes...)
	cq.mu.Unlock()
	if len(sizes) != 2 || sizes[0] != 1 || sizes[1] != 49 {
		t.Fatalf("batch sizes = %v, want [1 49]", sizes)
	}
	for i := 0; i < 49; i++ {
		if rec := e.waitRecord(fmt.Sprintf("ev%d", i)); rec.Status != invocation.StatusSucceeded {
			t.Fatalf("record = %+v", rec)
		}
	}
}

func TestCloseInterruptsInFlightEvent(t *testing.T) {
	st, bl := newBackends(t)
	host := &fakeHost{}
	started := make(chan struct{})
	host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		close(started)
		<-ctx.Done()
		return nil, ctx.Err()
	}
	svc, err := New(Config{Store: st, Blobs: bl, Hosts: []harness.Host{host}, DetectRuntimes: testRuntimes, AsyncWorkers: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := svc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.CreateFunction(ctx, &function.Config{Name: "f", Runtime: "provided.al2023"}, bootstrapZip(t, "x")); err != nil {
		t.Fatal(err)
	}
	if err := svc.InvokeAsync(ctx, &InvokeInput{RequestID: "ev", Function: "f"}); err != nil {
		t.Fatal(err)
	}
	<-started
	cctx, cancel := context.WithCancel(ctx)
	cancel() // no grace at all: the in-flight event must be interrupted
	if err := svc.Close(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close = %v, want context.Canceled", err)
	}
	evs, err := st.Queue().Claim(ctx, time.Now(), time.Minute, 10)
	if err != nil || len(evs) != 1 || evs[0].RequestID != "ev" {
		t.Fatalf("interrupted event not back in the queue: %v %v", evs, err)
	}
	// Its Queued record was flushed by Close.
	rec, err := st.Invocations().Get(ctx, "ev")
	if err != nil || rec.Status != invocation.StatusQueued {
		t.Fatalf("record after Close = %+v, %v", rec, err)
	}
}

// Workers hold their claims while the accept path is saturated, until it
// has been quiet for yieldQuiet, and never longer than yieldMax in all.
func TestWorkersYieldToASaturatedAcceptPath(t *testing.T) {
	q := newAsyncQueue(&Service{})
	t0 := time.Unix(1700000000, 0)
	if d := q.yieldFor(t0, 0); d != 0 {
		t.Fatalf("yield %v before any saturated commit", d)
	}
	q.saturatedAt.Store(t0.UnixNano())
	for _, tc := range []struct {
		since, waited, want time.Duration
	}{
		{0, 0, yieldQuiet},
		{yieldQuiet / 2, 0, yieldQuiet / 2},
		{yieldQuiet, 0, 0},
		{time.Second, 0, 0},
		{0, yieldMax - time.Millisecond, time.Millisecond},
		{0, yieldMax, 0},
		{0, 2 * yieldMax, 0},
	} {
		if d := q.yieldFor(t0.Add(tc.since), tc.waited); d != tc.want {
			t.Errorf("%v after a saturated commit, having waited %v: yield %v, want %v", tc.since, tc.waited, d, tc.want)
		}
	}
}

// Only group commits of many enqueues mark the accept path saturated; a
// trickle never holds the workers.
func TestOnlyBigCommitsSaturate(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	for i := 0; i < 3; i++ {
		if err := e.svc.InvokeAsync(context.Background(), &InvokeInput{Function: "f"}); err != nil {
			t.Fatal(err)
		}
	}
	if at := e.svc.async.saturatedAt.Load(); at != 0 {
		t.Fatal("sequential enqueues marked the accept path saturated")
	}
	batch := make([]*enqueueReq, yieldBatch)
	for i := range batch {
		id := fmt.Sprintf("big-%d", i)
		batch[i] = &enqueueReq{
			ev:     &store.Event{RequestID: id, Function: "f", EnqueuedAt: time.Now(), NotBefore: time.Now()},
			queued: &invocation.Record{RequestID: id, Function: "f", Type: invocation.TypeEvent, Status: invocation.StatusQueued, Start: time.Now()},
			done:   make(chan error, 1),
		}
	}
	e.svc.async.commit(batch)
	for _, r := range batch {
		if err := <-r.done; err != nil {
			t.Fatal(err)
		}
	}
	if at := e.svc.async.saturatedAt.Load(); at == 0 {
		t.Fatalf("a commit of %d enqueues did not mark the accept path saturated", yieldBatch)
	}
	for _, r := range batch {
		if rec := e.waitRecord(r.ev.RequestID); rec.Status != invocation.StatusSucceeded {
			t.Fatalf("event of a saturated commit: %+v", rec)
		}
	}
}

func TestAsyncEventsLeasedByACrashedRunRunAtStart(t *testing.T) {
	var st store.Store
	e := newEnv(t, func(cfg *Config) {
		st = cfg.Store
		ctx := context.Background()
		now := time.Now()
		// A previous run enqueued the event, claimed it and died holding
		// its 17-minute lease.
		if err := st.Queue().Enqueue(ctx, []*store.Event{{RequestID: "leased", Function: "gone", EnqueuedAt: now, NotBefore: now}}); err != nil {
			t.Fatal(err)
		}
		if evs, err := st.Queue().Claim(ctx, now, time.Hour, 10); err != nil || len(evs) != 1 {
			t.Fatalf("claim: %v %v", evs, err)
		}
	})
	rec := e.waitRecord("leased")
	if rec.Status != invocation.StatusFailed || rec.ErrorType != "ResourceNotFoundException" {
		t.Fatalf("record = %+v", rec)
	}
}
