package controlplane

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// memStore is an in-memory store.Store with the contract's semantics
// (copies in and out, revision CAS, leased queue), for unit tests.
type memStore struct {
	mu     sync.Mutex
	fns    map[string]*function.Config
	rts    map[string]*runtimes.Runtime
	recs   map[string]*invocation.Record
	events map[string]*memEvent
	seq    int
}

type memEvent struct {
	ev         store.Event
	seq        int
	leaseUntil time.Time
}

func newMemStore() *memStore {
	return &memStore{
		fns: map[string]*function.Config{}, rts: map[string]*runtimes.Runtime{},
		recs: map[string]*invocation.Record{}, events: map[string]*memEvent{},
	}
}

func (m *memStore) Functions() store.Functions     { return (*memFunctions)(m) }
func (m *memStore) Runtimes() store.Runtimes       { return (*memRuntimes)(m) }
func (m *memStore) Invocations() store.Invocations { return (*memInvocations)(m) }
func (m *memStore) Queue() store.Queue             { return (*memQueue)(m) }
func (m *memStore) Close() error                   { return nil }

type memFunctions memStore

func (f *memFunctions) Create(ctx context.Context, cfg *function.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.fns[cfg.Name]; ok {
		return fmt.Errorf("function %s: %w", cfg.Name, errdefs.ErrAlreadyExists)
	}
	f.fns[cfg.Name] = cfg.Clone()
	return nil
}

func (f *memFunctions) Get(ctx context.Context, name string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.fns[name]
	if !ok {
		return nil, fmt.Errorf("function %s: %w", name, errdefs.ErrNotFound)
	}
	return c.Clone(), nil
}

func (f *memFunctions) List(ctx context.Context, marker string, max int) ([]*function.Config, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var names []string
	for n := range f.fns {
		if n > marker {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	next := ""
	if len(names) > max {
		names = names[:max]
		next = names[max-1]
	}
	out := make([]*function.Config, len(names))
	for i, n := range names {
		out[i] = f.fns[n].Clone()
	}
	return out, next, nil
}

func (f *memFunctions) Update(ctx context.Context, cfg *function.Config, expected string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.fns[cfg.Name]
	if !ok {
		return fmt.Errorf("function %s: %w", cfg.Name, errdefs.ErrNotFound)
	}
	if c.RevisionID != expected {
		return fmt.Errorf("function %s: %w", cfg.Name, errdefs.ErrPreconditionFailed)
	}
	f.fns[cfg.Name] = cfg.Clone()
	return nil
}

func (f *memFunctions) Delete(ctx context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.fns[name]; !ok {
		return fmt.Errorf("function %s: %w", name, errdefs.ErrNotFound)
	}
	delete(f.fns, name)
	return nil
}

func (f *memFunctions) CodeInUse(ctx context.Context, digest string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.fns {
		if c.CodeSha256 == digest {
			return true, nil
		}
	}
	return false, nil
}

type memRuntimes memStore

func (r *memRuntimes) Put(ctx context.Context, rt *runtimes.Runtime) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := *rt
	r.rts[rt.ID] = &c
	return nil
}

func (r *memRuntimes) Get(ctx context.Context, id string) (*runtimes.Runtime, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rt, ok := r.rts[id]
	if !ok {
		return nil, fmt.Errorf("runtime %s: %w", id, errdefs.ErrNotFound)
	}
	c := *rt
	return &c, nil
}

func (r *memRuntimes) List(ctx context.Context) ([]*runtimes.Runtime, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*runtimes.Runtime
	for _, rt := range r.rts {
		c := *rt
		out = append(out, &c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

type memInvocations memStore

func (iv *memInvocations) Put(ctx context.Context, recs []*invocation.Record) error {
	iv.mu.Lock()
	defer iv.mu.Unlock()
	for _, r := range recs {
		iv.recs[r.RequestID] = cloneRecord(r)
	}
	return nil
}

func (iv *memInvocations) Get(ctx context.Context, id string) (*invocation.Record, error) {
	iv.mu.Lock()
	defer iv.mu.Unlock()
	r, ok := iv.recs[id]
	if !ok {
		return nil, fmt.Errorf("invocation %s: %w", id, errdefs.ErrNotFound)
	}
	return cloneRecord(r), nil
}

func (iv *memInvocations) ListByFunction(ctx context.Context, fn string, before time.Time, limit int) ([]*invocation.Record, error) {
	iv.mu.Lock()
	defer iv.mu.Unlock()
	var out []*invocation.Record
	for _, r := range iv.recs {
		if r.Function == fn && (before.IsZero() || r.Start.Before(before)) {
			out = append(out, cloneRecord(r))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start.After(out[j].Start) })
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

func (iv *memInvocations) DeleteBefore(ctx context.Context, t time.Time) (int64, error) {
	iv.mu.Lock()
	defer iv.mu.Unlock()
	var n int64
	for id, r := range iv.recs {
		if r.End.Before(t) {
			delete(iv.recs, id)
			n++
		}
	}
	return n, nil
}

type memQueue memStore

func (q *memQueue) Enqueue(ctx context.Context, evs []*store.Event) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, e := range evs {
		if _, ok := q.events[e.RequestID]; ok {
			return fmt.Errorf("event %s: %w", e.RequestID, errdefs.ErrAlreadyExists)
		}
	}
	for _, e := range evs {
		q.seq++
		c := *e
		c.Payload = bytes.Clone(e.Payload)
		q.events[e.RequestID] = &memEvent{ev: c, seq: q.seq}
	}
	return nil
}

func (q *memQueue) Claim(ctx context.Context, now time.Time, lease time.Duration, max int) ([]*store.Event, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var due []*memEvent
	for _, e := range q.events {
		if !e.ev.NotBefore.After(now) && !e.leaseUntil.After(now) {
			due = append(due, e)
		}
	}
	sort.Slice(due, func(i, j int) bool { return due[i].seq < due[j].seq })
	if len(due) > max {
		due = due[:max]
	}
	out := make([]*store.Event, len(due))
	for i, e := range due {
		e.ev.Attempts++
		e.leaseUntil = now.Add(lease)
		c := e.ev
		c.Payload = bytes.Clone(e.ev.Payload)
		out[i] = &c
	}
	return out, nil
}

func (q *memQueue) Complete(ctx context.Context, id string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.events, id)
	return nil
}

func (q *memQueue) Retry(ctx context.Context, id string, notBefore time.Time, lastErr string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	e, ok := q.events[id]
	if !ok {
		return fmt.Errorf("event %s: %w", id, errdefs.ErrNotFound)
	}
	e.ev.NotBefore, e.ev.LastError, e.leaseUntil = notBefore, lastErr, time.Time{}
	return nil
}

func (q *memQueue) Len(ctx context.Context) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.events), nil
}

// memBlobs is an in-memory blob.Store.
type memBlobs struct {
	mu    sync.Mutex
	blobs map[string][]byte
}

func newMemBlobs() *memBlobs { return &memBlobs{blobs: map[string][]byte{}} }

func (b *memBlobs) Put(ctx context.Context, r io.Reader) (string, int64, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return "", 0, err
	}
	sum := sha256.Sum256(data)
	d := base64.StdEncoding.EncodeToString(sum[:])
	b.mu.Lock()
	defer b.mu.Unlock()
	b.blobs[d] = data
	return d, int64(len(data)), nil
}

func (b *memBlobs) Open(ctx context.Context, d string) (io.ReadCloser, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	data, ok := b.blobs[d]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", d, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(data)), nil
}

func (b *memBlobs) Delete(ctx context.Context, d string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.blobs, d)
	return nil
}

// fakeHost is a harness.Host that records requests and runs a script.
type fakeHost struct {
	mu      sync.Mutex
	reqs    []*harness.InvokeRequest
	retires []retireCall
	// script decides each invocation's outcome; n counts calls for the
	// same request id, from 1. nil means success echoing the payload.
	script func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error)
}

type retireCall struct{ function, keep string }

func (h *fakeHost) Invoke(ctx context.Context, req *harness.InvokeRequest) (*harness.InvokeResult, error) {
	h.mu.Lock()
	c := *req
	c.Function = req.Function.Clone()
	h.reqs = append(h.reqs, &c)
	n := 0
	for _, r := range h.reqs {
		if r.RequestID == req.RequestID {
			n++
		}
	}
	script := h.script
	h.mu.Unlock()
	if script != nil {
		return script(ctx, req, n)
	}
	return okResult(req, req.Payload), nil
}

func okResult(req *harness.InvokeRequest, payload []byte) *harness.InvokeResult {
	now := time.Now()
	return &harness.InvokeResult{
		RequestID: req.RequestID, Payload: payload,
		Log:   []byte("START RequestId: " + req.RequestID + "\nEND\n"),
		Start: now, End: now, Duration: time.Millisecond, Cold: true, MaxMemoryMB: 20,
	}
}

func fnErrorResult(req *harness.InvokeRequest) *harness.InvokeResult {
	r := okResult(req, []byte(`{"errorMessage":"boom","errorType":"Error"}`))
	r.FunctionError, r.ErrorType = "Unhandled", "Error"
	return r
}

func (h *fakeHost) Retire(ctx context.Context, fn, keep string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retires = append(h.retires, retireCall{fn, keep})
	return nil
}

func (h *fakeHost) requests() []*harness.InvokeRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*harness.InvokeRequest(nil), h.reqs...)
}

func (h *fakeHost) calls(reqID string) int {
	n := 0
	for _, r := range h.requests() {
		if r.RequestID == reqID {
			n++
		}
	}
	return n
}

func (h *fakeHost) retired() []retireCall {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]retireCall(nil), h.retires...)
}
