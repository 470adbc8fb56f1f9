package controlplane

import (
	"context"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
)

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

// preparingHost is a fakeHost that is also a harness.Preparer.
type preparingHost struct {
	fakeHost
	fail     error
	prepared []prepareCall
	// order lists "prepare <revision>" and "retire <keep>" as they happened.
	order []string
}

type prepareCall struct{ function, revision, code string }

func (h *preparingHost) Prepare(ctx context.Context, cfg *function.Config) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.prepared = append(h.prepared, prepareCall{cfg.Name, cfg.RevisionID, cfg.CodeSha256})
	h.order = append(h.order, "prepare "+cfg.RevisionID)
	return h.fail
}

func (h *preparingHost) Retire(ctx context.Context, fn, keep string) error {
	h.mu.Lock()
	h.order = append(h.order, "retire "+keep)
	h.mu.Unlock()
	return h.fakeHost.Retire(ctx, fn, keep)
}

func (h *preparingHost) calls() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.order...)
}

// preparedCalls returns the Prepare calls so far.
func (h *preparingHost) preparedCalls() []prepareCall {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]prepareCall(nil), h.prepared...)
}
