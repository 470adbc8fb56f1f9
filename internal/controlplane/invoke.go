package controlplane

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// maxErrorMessage caps the ErrorMessage kept in a record.
const maxErrorMessage = 1024

// resolve finds what an invocation of name at qualifier ($LATEST or a
// published version) runs: its configuration, which must be Active, and
// its runtime, which must be available. Both come from the configuration
// cache and are shared: read-only.
func (s *Service) resolve(ctx context.Context, name, qualifier string) (*cachedFunction, *runtimes.Runtime, error) {
	fn, err := s.lookup(ctx, name, qualifier)
	if err != nil {
		return nil, nil, err
	}
	cfg := fn.cfg
	if err := checkRunnable(cfg); err != nil {
		return nil, nil, err
	}
	rt, err := s.cachedRuntime(ctx, cfg.Runtime)
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		return nil, nil, fmt.Errorf("The runtime %s of function %s is unknown to this server: %w", cfg.Runtime, name, errdefs.ErrInvalidRuntime)
	case err != nil:
		return nil, nil, err
	case !rt.Available:
		return nil, nil, fmt.Errorf("The runtime %s is not available on this host: %s: %w", rt.ID, rt.Reason, errdefs.ErrInvalidRuntime)
	}
	return fn, rt, nil
}

// CheckInvoke does what a DryRun does: resolves the function and verifies
// it could be invoked.
func (s *Service) CheckInvoke(ctx context.Context, name, qualifier string) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	fn, _, err := s.resolve(ctx, name, qualifier)
	if err != nil {
		return nil, err
	}
	return fn.cfg.Clone(), nil
}

// Invoke runs one synchronous invocation and records it. A function error
// is a result (FunctionError set), not an error. Errors from the harness
// (throttles, an unavailable host, a cancelled request) are recorded as
// Failed and returned; errors resolving the function are only returned.
// The returned configuration is the one that ran; it is shared with the
// configuration cache and must not be modified.
func (s *Service) Invoke(ctx context.Context, in *InvokeInput) (*harness.InvokeResult, *function.Config, error) {
	if err := s.running(); err != nil {
		return nil, nil, err
	}
	fn, rt, err := s.resolve(ctx, in.Function, in.Qualifier)
	if err != nil {
		return nil, nil, err
	}
	cfg := fn.cfg
	reqID := in.RequestID
	if reqID == "" {
		reqID = uuid.NewString()
	}
	start := s.now()
	req := &harness.InvokeRequest{
		RequestID:     reqID,
		Function:      cfg,
		Runtime:       rt,
		ARN:           fn.arn,
		Payload:       in.Payload,
		ClientContext: in.ClientContext,
		TraceID:       in.TraceID,
	}
	// The invocation runs to its end even if the client goes away (as on
	// Lambda), so its record holds what the function really did: the
	// harness call gets a context that outlives the request (the harness
	// bounds it by the function's timeout), and the caller stops waiting.
	type outcome struct {
		res *harness.InvokeResult
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		res, err := s.runOnHost(context.WithoutCancel(ctx), req)
		s.records.write(s.newRecord(reqID, cfg, invocation.TypeRequestResponse, 1, start, res, err))
		done <- outcome{res, err}
	}()
	var o outcome
	select {
	case o = <-done:
	case <-ctx.Done():
		return nil, cfg, ctx.Err()
	}
	if o.err != nil {
		return nil, cfg, fmt.Errorf("invoking %s: %w", cfg.Name, o.err)
	}
	return o.res, cfg, nil
}

// runOnHost places one invocation and runs it.
func (s *Service) runOnHost(ctx context.Context, req *harness.InvokeRequest) (*harness.InvokeResult, error) {
	host, done, err := s.placer.Place(req.Function)
	if err != nil {
		return nil, err
	}
	res, err := host.Invoke(ctx, req)
	done(err)
	if err == nil && res == nil {
		err = errors.New("harness returned neither a result nor an error")
	}
	return res, err
}

// newRecord builds the record of one run from its result or error.
func (s *Service) newRecord(reqID string, cfg *function.Config, typ invocation.Type, attempts int, start time.Time, res *harness.InvokeResult, err error) *invocation.Record {
	rec := &invocation.Record{
		RequestID:  reqID,
		Function:   cfg.Name,
		RevisionID: cfg.RevisionID,
		Version:    cfg.Version,
		Type:       typ,
		Attempts:   attempts,
		Start:      start,
		End:        s.now(),
	}
	if err != nil {
		rec.Status = invocation.StatusFailed
		rec.ErrorType = errorTypeOf(err)
		rec.ErrorMessage = capMessage(errdefs.Message(err))
		return rec
	}
	rec.Status = invocation.StatusSucceeded
	if res.FunctionError != "" {
		rec.Status = invocation.StatusFunctionError
		rec.ErrorType = res.ErrorType
		if rec.ErrorType == "" {
			rec.ErrorType = res.FunctionError
		}
		rec.ErrorMessage = functionErrorMessage(res.Payload)
	}
	if !res.Start.IsZero() {
		rec.Start = res.Start
	}
	if !res.End.IsZero() {
		rec.End = res.End
	}
	rec.Cold = res.Cold
	rec.InitDuration = res.InitDuration
	rec.Duration = res.Duration
	rec.MaxMemoryMB = res.MaxMemoryMB
	rec.Log = res.Log
	if len(rec.Log) > invocation.MaxLogBytes {
		rec.Log = rec.Log[len(rec.Log)-invocation.MaxLogBytes:]
	}
	rec.LogBytes = res.LogBytes
	return rec
}

// errorTypeOf names a platform error the way Lambda names the exception;
// a request that ended before the platform did is named for that.
func errorTypeOf(err error) string {
	switch {
	case errors.Is(err, context.Canceled):
		return "RequestCanceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "RequestTimeout"
	}
	if name, ok := errdefs.ExceptionName(err); ok {
		return name
	}
	return "ServiceException"
}

// functionErrorMessage extracts errorMessage from a runtime's error
// document, or keeps the start of whatever the payload is.
func functionErrorMessage(payload []byte) string {
	var doc struct {
		ErrorMessage string `json:"errorMessage"`
	}
	if json.Unmarshal(payload, &doc) == nil && doc.ErrorMessage != "" {
		return capMessage(doc.ErrorMessage)
	}
	return capMessage(string(payload))
}

func capMessage(s string) string {
	if len(s) > maxErrorMessage {
		return s[:maxErrorMessage]
	}
	return s
}
