package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/invocation"
)

// Record writer tuning. Records are written in batches so the invoke path
// costs one channel send, not one database transaction. Larger batches cost
// the store less per record (one commit, and fewer pages written per record
// as the random request ids share b-tree pages): on SQLite, 27 µs per record
// in batches of 250 against 38 µs in batches of 60, which 50 ms gave at
// 1,200 invocations/s. Unflushed records are visible to lookups meanwhile.
const (
	recordFlushEvery  = 200 * time.Millisecond
	recordBatchMax    = 256
	recordBuffer      = 4096
	recordSendWait    = 2 * time.Second
	recordPutTimeout  = 10 * time.Second
	recordPutAttempts = 3
	// queuedRecordDelay is how long an Event's Queued record waits in
	// memory (visible to GetInvocation and ListInvocations all along)
	// before it is written: most events run by then, and their final record
	// replaces it unwritten, so a burst of Event invokes costs the store one
	// record write per event instead of two, after the burst rather than
	// during it. The event itself is durable from its enqueue; a crash
	// forgets only the Queued records of the last queuedRecordDelay, and
	// those events get their record when they run.
	queuedRecordDelay = 2 * time.Second
)

// ListInvocations page sizes.
const (
	defaultListInvocations = 20
	maxListInvocations     = 1000
)

// recordWriter batches invocation records into Invocations().Put. Records
// not yet flushed stay visible to lookups through pending. A full buffer
// makes write wait up to recordSendWait; past that the record is dropped
// and counted (and logged), never silently. After stop, writes go straight
// to the store.
type recordWriter struct {
	inv store.Invocations
	log *slog.Logger
	// delay is writeLater's (queuedRecordDelay; tests shorten it). One
	// delay for all keeps the delayed records in due order.
	delay time.Duration

	ch     chan recordWrite
	stopCh chan struct{}
	done   chan struct{}

	// gate is held shared by writers while they send, exclusively by stop,
	// so no send can race with the writer loop's exit.
	gate    sync.RWMutex
	stopped bool

	mu      sync.Mutex
	pending map[string]*invocation.Record

	blocked atomic.Int64
	dropped atomic.Int64
}

// recordWrite is one record handed to the writer loop; a record with a due
// time is held until then and dropped if a newer record of its request id
// replaced it meanwhile.
type recordWrite struct {
	rec *invocation.Record
	due time.Time
}

func newRecordWriter(inv store.Invocations, log *slog.Logger) *recordWriter {
	return &recordWriter{
		inv:     inv,
		log:     log,
		delay:   queuedRecordDelay,
		ch:      make(chan recordWrite, recordBuffer),
		stopCh:  make(chan struct{}),
		done:    make(chan struct{}),
		pending: map[string]*invocation.Record{},
	}
}

func (w *recordWriter) start() { go w.run() }

// stop flushes everything buffered and switches writes to synchronous.
func (w *recordWriter) stop() {
	w.gate.Lock()
	already := w.stopped
	w.stopped = true
	w.gate.Unlock()
	if already {
		return
	}
	close(w.stopCh)
	<-w.done
}

// write queues rec (which the writer now owns) for the store.
func (w *recordWriter) write(rec *invocation.Record) {
	w.send(recordWrite{rec: rec})
}

// writeLater queues rec to be written after the writer's delay unless a
// newer record of the same request id replaces it first; until then
// lookups see it.
func (w *recordWriter) writeLater(rec *invocation.Record) {
	w.send(recordWrite{rec: rec, due: time.Now().Add(w.delay)})
}

func (w *recordWriter) send(rw recordWrite) {
	rec := rw.rec
	w.gate.RLock()
	defer w.gate.RUnlock()
	if w.stopped {
		w.put([]*invocation.Record{rec})
		return
	}
	w.mu.Lock()
	w.pending[rec.RequestID] = rec
	w.mu.Unlock()
	select {
	case w.ch <- rw:
		return
	default:
	}
	n := w.blocked.Add(1)
	if n == 1 || n%1000 == 0 {
		w.log.Warn("invocation record buffer full; invocations wait for the store", "times", n)
	}
	t := time.NewTimer(recordSendWait)
	defer t.Stop()
	select {
	case w.ch <- rw:
	case <-t.C:
		w.forget([]*invocation.Record{rec})
		d := w.dropped.Add(1)
		w.log.Error("dropped invocation record: store too slow", "request_id", rec.RequestID, "function", rec.Function, "dropped_total", d)
	}
}

// current reports whether rec is still the newest record of its request
// id, i.e. nothing replaced it since it was queued.
func (w *recordWriter) current(rec *invocation.Record) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pending[rec.RequestID] == rec
}

// lookup returns a copy of a record that is buffered and not yet flushed.
func (w *recordWriter) lookup(requestID string) *invocation.Record {
	w.mu.Lock()
	defer w.mu.Unlock()
	if r, ok := w.pending[requestID]; ok {
		return cloneRecord(r)
	}
	return nil
}

// pendingFor returns copies of a function's buffered records.
func (w *recordWriter) pendingFor(fn string) []*invocation.Record {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []*invocation.Record
	for _, r := range w.pending {
		if r.Function == fn {
			out = append(out, cloneRecord(r))
		}
	}
	return out
}

func (w *recordWriter) run() {
	defer close(w.done)
	t := time.NewTicker(recordFlushEvery)
	defer t.Stop()
	batch := make([]*invocation.Record, 0, recordBatchMax)
	// later holds delayed records in due order (they share w.delay).
	var later []recordWrite
	add := func(r *invocation.Record) {
		batch = append(batch, r)
		if len(batch) >= recordBatchMax {
			w.flush(batch)
			batch = batch[:0]
		}
	}
	take := func(rw recordWrite) {
		if rw.due.IsZero() {
			add(rw.rec)
		} else {
			later = append(later, rw)
		}
	}
	// promote moves the delayed records due by now (all with now zero)
	// that nothing replaced into the batch.
	promote := func(now time.Time) {
		k := 0
		for ; k < len(later) && (now.IsZero() || !later[k].due.After(now)); k++ {
			if w.current(later[k].rec) {
				add(later[k].rec)
			}
			later[k] = recordWrite{}
		}
		later = later[k:]
		if len(later) == 0 {
			later = nil // let the drained backing array go
		}
	}
	for {
		select {
		case rw := <-w.ch:
			take(rw)
		case now := <-t.C:
			promote(now)
			if len(batch) > 0 {
				w.flush(batch)
				batch = batch[:0]
			}
		case <-w.stopCh:
			for {
				select {
				case rw := <-w.ch:
					take(rw)
				default:
					// Everything queued is in: delayed records that are
					// still the newest of their request go now.
					promote(time.Time{})
					if len(batch) > 0 {
						w.flush(batch)
					}
					return
				}
			}
		}
	}
}

// flush writes a batch (keeping only the last record of a request id, in
// order) and then drops the flushed records from pending.
func (w *recordWriter) flush(batch []*invocation.Record) {
	last := make(map[string]int, len(batch))
	for i, r := range batch {
		last[r.RequestID] = i
	}
	recs := make([]*invocation.Record, 0, len(last))
	for i, r := range batch {
		if last[r.RequestID] == i {
			recs = append(recs, r)
		}
	}
	w.put(recs)
	w.forget(batch)
}

// put writes recs with a few retries; a batch the store keeps refusing is
// dropped, counted and logged.
func (w *recordWriter) put(recs []*invocation.Record) {
	var err error
	for attempt := 0; attempt < recordPutAttempts; attempt++ {
		if attempt > 0 {
			time.Sleep(time.Duration(attempt) * 200 * time.Millisecond)
		}
		ctx, cancel := context.WithTimeout(context.Background(), recordPutTimeout)
		err = w.inv.Put(ctx, recs)
		cancel()
		if err == nil {
			return
		}
	}
	d := w.dropped.Add(int64(len(recs)))
	w.log.Error("dropped invocation records: store write failed", "count", len(recs), "dropped_total", d, "error", err)
}

// forget removes recs from pending unless a newer record of the same
// request id replaced them meanwhile.
func (w *recordWriter) forget(recs []*invocation.Record) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, r := range recs {
		if w.pending[r.RequestID] == r {
			delete(w.pending, r.RequestID)
		}
	}
}

func cloneRecord(r *invocation.Record) *invocation.Record {
	c := *r
	c.Log = append([]byte(nil), r.Log...)
	return &c
}

// DroppedRecords returns how many invocation records could not be stored
// since the Service was built (for metrics).
func (s *Service) DroppedRecords() int64 { return s.records.dropped.Load() }

// GetInvocation returns one invocation record by request id.
func (s *Service) GetInvocation(ctx context.Context, requestID string) (*invocation.Record, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	if r := s.records.lookup(requestID); r != nil {
		return r, nil
	}
	r, err := s.store.Invocations().Get(ctx, requestID)
	if errors.Is(err, errdefs.ErrNotFound) {
		// The writer may have flushed it between the two looks.
		if r := s.records.lookup(requestID); r != nil {
			return r, nil
		}
		return nil, fmt.Errorf("Invocation not found: %s: %w", requestID, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting invocation %s: %w", requestID, err)
	}
	return r, nil
}

// ListInvocations returns a function's newest records, newest first
// (limit default 20, at most 1000), including records not yet flushed.
func (s *Service) ListInvocations(ctx context.Context, fn string, limit int) ([]*invocation.Record, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	switch {
	case limit <= 0:
		limit = defaultListInvocations
	case limit > maxListInvocations:
		limit = maxListInvocations
	}
	pending := s.records.pendingFor(fn)
	stored, err := s.store.Invocations().ListByFunction(ctx, fn, time.Time{}, limit)
	if err != nil {
		return nil, fmt.Errorf("listing invocations of %s: %w", fn, err)
	}
	out := pending
	seen := make(map[string]bool, len(pending))
	for _, r := range pending {
		seen[r.RequestID] = true
	}
	for _, r := range stored {
		if !seen[r.RequestID] {
			out = append(out, r)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Start.After(out[j].Start) })
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}
