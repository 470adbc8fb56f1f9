package agent

import (
	"net/http"
	"time"
)

// SnapStart's runtime hooks (Lambda's Runtime API for SnapStart): a
// runtime initialised for a snapshot (AWS_LAMBDA_INITIALIZATION_TYPE
// snap-start) that has before-snapshot work done calls GET
// /runtime/restore/next instead of /invocation/next at the end of INIT. The
// call ends INIT and blocks: the snapshot is taken while it waits. In each
// restored environment the agent releases it (200), the runtime runs its
// after-restore hooks (re-seeding its own random generators, reopening
// connections) and then calls /invocation/next, which completes the
// restore; a hook that fails is reported with POST /runtime/restore/error.
// A runtime that never calls /restore/next (aws-lambda-go) is simply
// restored.
const (
	pathRestoreNext  = "GET /2018-06-01/runtime/restore/next"
	pathRestoreError = "POST /2018-06-01/runtime/restore/error"
	// restoreHookTimeout is Lambda's limit for after-restore hooks.
	restoreHookTimeout = 10 * time.Second
)

// handleRestoreNext serves GET /restore/next: only during INIT, which it
// ends; it answers once the environment has been restored.
func (e *env) handleRestoreNext(w http.ResponseWriter, r *http.Request) {
	gen := connGen(r.Context())
	e.mu.Lock()
	rt := e.rt
	if rt == nil || rt.gen != gen {
		e.mu.Unlock()
		writeStatusError(w, errStaleRuntime)
		return
	}
	if !e.m.is(stateInitializing) {
		e.mu.Unlock()
		writeStatusError(w, errNotAllowed)
		return
	}
	gate := make(chan struct{})
	e.restoreGate = gate
	e.endInitLocked(rt, nil)
	e.mu.Unlock()
	select {
	case <-gate:
		w.WriteHeader(http.StatusOK)
	case <-rt.gone:
		writeError(w, http.StatusInternalServerError, "Runtime.Reset", "the execution environment is being reset")
	case <-e.closed:
		writeError(w, http.StatusInternalServerError, "Runtime.Shutdown", "the execution environment is shutting down")
	case <-r.Context().Done():
	}
}

// handleRestoreError serves POST /restore/error: an after-restore hook
// failed; the restore is reported failed.
func (e *env) handleRestoreError(w http.ResponseWriter, r *http.Request) {
	body, _, err := readPayload(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "InvalidRequest", "reading body: "+err.Error())
		return
	}
	f := postedError(body, r.Header.Get(hdrErrorType))
	if !e.finishHooks(f) {
		writeStatusError(w, errNotAllowed)
		return
	}
	writeAccepted(w)
}

// releaseRestore lets a runtime parked in /restore/next run its
// after-restore hooks. It returns a channel that receives the hooks'
// outcome (nil: the runtime called /invocation/next), or nil when no
// runtime is parked (nothing to wait for).
func (e *env) releaseRestore() <-chan *failure {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.restoreGate == nil {
		return nil
	}
	close(e.restoreGate)
	e.restoreGate = nil
	done := make(chan *failure, 1)
	e.hooksDone = done
	return done
}

// finishHooks reports the end of the after-restore hooks (f nil: success)
// to the restore waiting for them; false when none waits.
func (e *env) finishHooks(f *failure) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.finishHooksLocked(f)
}

// finishHooksLocked is finishHooks with e.mu held.
func (e *env) finishHooksLocked(f *failure) bool {
	if e.hooksDone == nil {
		return false
	}
	e.hooksDone <- f
	e.hooksDone = nil
	return true
}

// awaitHooks waits for the after-restore hooks released by
// releaseRestore, bounded by restoreHookTimeout and the runtime's life.
func (s *session) awaitHooks(done <-chan *failure) *failure {
	rt := s.e.idleRuntime()
	var gone <-chan struct{}
	if rt != nil {
		gone = rt.gone
	}
	timer := time.NewTimer(restoreHookTimeout)
	defer timer.Stop()
	select {
	case f := <-done:
		return f
	case <-gone:
		return newFailure("Runtime.ExitError", "the runtime exited during its after-restore hooks")
	case <-timer.C:
		s.e.finishHooks(nil) // nobody waits any more
		return newFailure("SnapStartTimeoutException", "after-restore hooks did not finish within 10 s")
	}
}
