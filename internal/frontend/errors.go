package frontend

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/invokex/invokex/internal/errdefs"
)

// apiError is an error as Lambda sends it: an HTTP status, the exception
// name (X-Amzn-ErrorType) and a message that is safe to show the client.
type apiError struct {
	status  int
	name    string
	message string
	// reason is TooManyRequestsException's Reason.
	reason string
	// allow is the Allow header of a 405.
	allow string
}

// routeError is an error of the routing layer itself (unknown operation,
// method not allowed), which has no errdefs kind.
type routeError struct {
	status int
	name   string
	msg    string
	allow  string
}

func (e *routeError) Error() string { return e.msg }

// retryAfterSeconds is sent with every throttle. Throttles clear as soon as
// an invocation ends, so one second is the useful hint.
const retryAfterSeconds = "1"

// kindStatus gives every errdefs kind its HTTP status; the exception name
// comes from errdefs.ExceptionName. The order matters only for errors that
// wrap two kinds: the first match wins.
var kindStatus = []struct {
	kind   error
	status int
}{
	{errdefs.ErrNotFound, http.StatusNotFound},
	{errdefs.ErrAlreadyExists, http.StatusConflict},
	{errdefs.ErrConflict, http.StatusConflict},
	{errdefs.ErrPreconditionFailed, http.StatusPreconditionFailed},
	{errdefs.ErrInvalidParameter, http.StatusBadRequest},
	{errdefs.ErrInvalidRequestContent, http.StatusBadRequest},
	{errdefs.ErrTooLarge, http.StatusRequestEntityTooLarge},
	{errdefs.ErrUnsupportedMediaType, http.StatusUnsupportedMediaType},
	{errdefs.ErrThrottled, http.StatusTooManyRequests},
	{errdefs.ErrNotReady, http.StatusBadGateway},
	{errdefs.ErrInvalidRuntime, http.StatusBadGateway},
	{errdefs.ErrUnavailable, http.StatusServiceUnavailable},
}

// translate is the one place where an error becomes a Lambda exception.
// internal reports that err has no kind: its text must not reach the client.
func translate(err error) (e apiError, internal bool) {
	var re *routeError
	if errors.As(err, &re) {
		return apiError{status: re.status, name: re.name, message: re.msg, allow: re.allow}, false
	}
	for _, k := range kindStatus {
		if !errors.Is(err, k.kind) {
			continue
		}
		name, _ := errdefs.ExceptionName(k.kind)
		e = apiError{status: k.status, name: name, message: errdefs.Message(err)}
		var te *errdefs.ThrottleError
		if errors.As(err, &te) {
			e.reason = te.Reason
		}
		return e, false
	}
	return apiError{status: http.StatusInternalServerError, name: "ServiceException"}, true
}

// writeError sends err in Lambda's error format and records it for the
// request log line. Errors of no kind are logged here, once, with the
// request id, and the client sees only a generic message carrying that id.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	st := stateOf(r.Context())
	e, internal := translate(err)
	if internal {
		if r.Context().Err() != nil && errors.Is(err, context.Canceled) {
			// The client went away; nobody will read the response and it
			// is not a fault of the server, so it is not logged as one.
			st.err = err
		} else {
			s.log.Error("internal error", "request_id", st.id, "operation", st.op, "error", err)
			st.err = errors.New("internal error (logged)")
		}
		e.message = "An internal error occurred while processing the request. Request ID: " + st.id
	} else {
		st.err = err
	}
	writeAPIError(w, e)
}

func writeAPIError(w http.ResponseWriter, e apiError) {
	typ := "User"
	if e.status >= 500 {
		typ = "Service"
	}
	body := struct {
		Type    string
		Message string `json:"message"`
		Reason  string `json:",omitempty"`
	}{typ, e.message, e.reason}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Amzn-ErrorType", e.name)
	if e.status == http.StatusTooManyRequests {
		h.Set("Retry-After", retryAfterSeconds)
	}
	if e.allow != "" {
		h.Set("Allow", e.allow)
	}
	w.WriteHeader(e.status)
	b, _ := json.Marshal(body) // a struct of strings always marshals
	_, _ = w.Write(b)          // the client may be gone; nothing left to tell it
}
