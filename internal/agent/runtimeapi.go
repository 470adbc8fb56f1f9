package agent

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"

	"github.com/invokex/invokex/internal/protocol"
)

// Runtime API paths (API version 2018-06-01), as Go 1.22 ServeMux patterns.
const (
	pathNext      = "GET /2018-06-01/runtime/invocation/next"
	pathResponse  = "POST /2018-06-01/runtime/invocation/{id}/response"
	pathError     = "POST /2018-06-01/runtime/invocation/{id}/error"
	pathInitError = "POST /2018-06-01/runtime/init/error"
)

// Runtime API headers.
const (
	hdrRequestID       = "Lambda-Runtime-Aws-Request-Id"
	hdrDeadline        = "Lambda-Runtime-Deadline-Ms"
	hdrFunctionARN     = "Lambda-Runtime-Invoked-Function-Arn"
	hdrTraceID         = "Lambda-Runtime-Trace-Id"
	hdrClientContext   = "Lambda-Runtime-Client-Context"
	hdrCognitoIdentity = "Lambda-Runtime-Cognito-Identity"
	hdrErrorType       = "Lambda-Runtime-Function-Error-Type"
	// hdrErrorBody is a trailer: runtimes that stream a response (such as
	// aws-lambda-go) report an error met mid-stream as trailers, with the
	// error document base64-encoded.
	hdrErrorBody = "Lambda-Runtime-Function-Error-Body"
)

// genKey is the context key of a connection's runtime generation.
type genKey struct{}

// connGen returns the runtime generation stamped on a request's connection.
func connGen(ctx context.Context) uint64 {
	g, _ := ctx.Value(genKey{}).(uint64)
	return g
}

// newRuntimeAPI returns the Runtime API server for e. Connections are kept
// alive (runtimes reuse one) and carry no timeouts: GET /next legitimately
// blocks for as long as the environment stays warm.
func newRuntimeAPI(e *env) *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc(pathNext, e.handleNext)
	mux.HandleFunc(pathResponse, e.handleResponse)
	mux.HandleFunc(pathError, e.handleError)
	mux.HandleFunc(pathInitError, e.handleInitError)
	mux.HandleFunc(pathRestoreNext, e.handleRestoreNext)
	mux.HandleFunc(pathRestoreError, e.handleRestoreError)
	return &http.Server{
		Handler: mux,
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
			return context.WithValue(ctx, genKey{}, e.currentGen())
		},
	}
}

// handleNext serves GET /next. The first call of a runtime ends INIT; then
// it blocks until an invocation is queued and returns its event. While an
// invocation is delivered and unanswered, another /next is refused (403),
// as in Lambda's RIE.
func (e *env) handleNext(w http.ResponseWriter, r *http.Request) {
	gen := connGen(r.Context())
	for {
		e.mu.Lock()
		rt := e.rt
		if rt == nil || rt.gen != gen {
			e.mu.Unlock()
			writeStatusError(w, errStaleRuntime)
			return
		}
		// A runtime released from /restore/next is ready again: its
		// after-restore hooks are done.
		e.finishHooksLocked(nil)
		switch {
		case e.m.is(stateInitializing):
			e.endInitLocked(rt, nil)
		case e.m.is(stateInvoking) && e.inv.delivered:
			e.mu.Unlock()
			writeStatusError(w, errNotAllowed)
			return
		}
		e.mu.Unlock()

		select {
		case inv := <-rt.next:
			if !e.deliver(inv) {
				continue // it ended before the runtime asked; wait again
			}
			writeEvent(w, inv)
			return
		case <-rt.gone:
			writeError(w, http.StatusInternalServerError, "Runtime.Reset", "the execution environment is being reset")
			return
		case <-e.closed:
			writeError(w, http.StatusInternalServerError, "Runtime.Shutdown", "the execution environment is shutting down")
			return
		case <-r.Context().Done():
			return
		}
	}
}

// writeEvent writes an invocation's event with Lambda's headers.
func writeEvent(w http.ResponseWriter, inv *invocation) {
	h := w.Header()
	h.Set(hdrRequestID, inv.req.RequestID)
	h.Set(hdrDeadline, strconv.FormatInt(inv.req.DeadlineUnixMs, 10))
	h.Set(hdrFunctionARN, inv.req.FunctionARN)
	if inv.req.TraceID != "" {
		h.Set(hdrTraceID, inv.req.TraceID)
	}
	if inv.req.ClientContext != "" {
		h.Set(hdrClientContext, inv.req.ClientContext)
	}
	if inv.req.CognitoIdentity != "" {
		h.Set(hdrCognitoIdentity, inv.req.CognitoIdentity)
	}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(inv.event)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(inv.event) // a runtime that went away is handled by its exit
}

// handleResponse serves POST /invocation/{id}/response. A payload over 6 MB
// is answered 413 and fails the invocation with
// Function.ResponseSizeTooLarge; the runtime is then reset.
func (e *env) handleResponse(w http.ResponseWriter, r *http.Request) {
	body, tooLarge, err := readPayload(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "InvalidRequest", "reading body: "+err.Error())
		return
	}
	var o *outcome
	switch {
	case tooLarge:
		o = &outcome{fail: tooLargeFailure(), reset: true}
	case r.Trailer.Get(hdrErrorType) != "":
		o = &outcome{fail: trailerError(r.Trailer)}
	default:
		o = &outcome{payload: body}
	}
	e.answerPost(w, r, o, tooLarge)
}

// handleError serves POST /invocation/{id}/error: the function failed; the
// body is its error document.
func (e *env) handleError(w http.ResponseWriter, r *http.Request) {
	body, tooLarge, err := readPayload(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "InvalidRequest", "reading body: "+err.Error())
		return
	}
	o := &outcome{fail: postedError(body, r.Header.Get(hdrErrorType))}
	if tooLarge {
		o = &outcome{fail: tooLargeFailure(), reset: true}
	}
	e.answerPost(w, r, o, tooLarge)
}

// answerPost completes the invocation named in the path and answers 202,
// 413 (payload too large), 400 (not the current request id) or 403.
func (e *env) answerPost(w http.ResponseWriter, r *http.Request, o *outcome, tooLarge bool) {
	if err := e.complete(connGen(r.Context()), r.PathValue("id"), o); err != nil {
		writeStatusError(w, err)
		return
	}
	if tooLarge {
		writeError(w, http.StatusRequestEntityTooLarge, "RequestEntityTooLarge",
			"Exceeded maximum allowed payload size (6291556 bytes).")
		return
	}
	writeAccepted(w)
}

// handleInitError serves POST /init/error: INIT failed; the environment is
// reset and the error document reported. Only allowed during INIT.
func (e *env) handleInitError(w http.ResponseWriter, r *http.Request) {
	body, _, err := readPayload(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, "InvalidRequest", "reading body: "+err.Error())
		return
	}
	f := postedError(body, r.Header.Get(hdrErrorType))
	gen := connGen(r.Context())
	e.mu.Lock()
	var refused error
	switch {
	case e.rt == nil || e.rt.gen != gen:
		refused = errStaleRuntime
	case !e.endInitLocked(e.rt, f):
		refused = errNotAllowed
	}
	e.mu.Unlock()
	if refused != nil {
		writeStatusError(w, refused)
		return
	}
	writeAccepted(w)
}

// readPayload reads a posted body of at most maxPayload bytes. tooLarge
// reports a longer body, which is not read further.
func readPayload(r *http.Request) (body []byte, tooLarge bool, err error) {
	if r.ContentLength > maxPayload {
		return nil, true, nil
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		buf.Grow(int(r.ContentLength))
	}
	n, err := buf.ReadFrom(io.LimitReader(r.Body, maxPayload+1))
	if err != nil {
		return nil, false, err
	}
	if n > maxPayload {
		return nil, true, nil
	}
	return buf.Bytes(), false, nil
}

// trailerError turns the error trailers of a streamed response into a
// failure.
func trailerError(tr http.Header) *failure {
	doc, err := base64.StdEncoding.DecodeString(tr.Get(hdrErrorBody))
	if err != nil || len(doc) == 0 {
		return newFailure(tr.Get(hdrErrorType), "the runtime reported an error while sending the response")
	}
	return postedError(doc, tr.Get(hdrErrorType))
}

// writeStatusError answers a refused request: 400 for a request id that is
// not current, 403 for a transition the state does not allow.
func writeStatusError(w http.ResponseWriter, err error) {
	if errors.Is(err, errInvalidRequestID) {
		writeError(w, http.StatusBadRequest, "InvalidRequestID", "Invalid request ID")
		return
	}
	writeError(w, http.StatusForbidden, "InvalidStateTransition", "State transition is not allowed")
}

func writeError(w http.ResponseWriter, status int, errorType, msg string) {
	writeJSON(w, status, protocol.ErrorInfo{ErrorMessage: msg, ErrorType: errorType})
}

// acceptedBody is the body of every 202, encoded once.
var acceptedBody = []byte(`{"status":"OK"}`)

// writeAccepted answers 202 {"status":"OK"}, as Lambda does to a posted
// response or error.
func writeAccepted(w http.ResponseWriter) {
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Content-Length"] = []string{strconv.Itoa(len(acceptedBody))}
	w.WriteHeader(http.StatusAccepted)
	_, _ = w.Write(acceptedBody)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
