// Package errdefs is InvokeX's one error vocabulary.
//
// Every package wraps one of these sentinels with context
// (fmt.Errorf("getting function %q: %w", name, errdefs.ErrNotFound)); callers
// test kinds with errors.Is. The frontend is the only place that translates a
// kind into an HTTP status and a Lambda exception name, so no other package
// knows about HTTP.
//
// The message of a wrapped error is what a client is shown for the kinds
// below (they describe the caller's own input); errors of no kind are
// internal and are shown only as a generic ServiceException message.
package errdefs

import (
	"errors"
	"fmt"
)

// Error kinds. Each maps to one Lambda exception at the frontend.
var (
	// ErrNotFound: the named resource does not exist (ResourceNotFoundException, 404).
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a resource with that name exists (ResourceConflictException, 409).
	ErrAlreadyExists = errors.New("already exists")
	// ErrConflict: the resource is in a state that forbids the operation now,
	// e.g. an update is in progress (ResourceConflictException, 409).
	ErrConflict = errors.New("conflict")
	// ErrPreconditionFailed: an optimistic-concurrency check failed, i.e. the
	// caller's RevisionId is not the current one (PreconditionFailedException, 412).
	ErrPreconditionFailed = errors.New("precondition failed")
	// ErrInvalidParameter: a parameter is out of range or malformed
	// (InvalidParameterValueException, 400).
	ErrInvalidParameter = errors.New("invalid parameter")
	// ErrInvalidRequestContent: the request body cannot be parsed
	// (InvalidRequestContentException, 400).
	ErrInvalidRequestContent = errors.New("invalid request content")
	// ErrTooLarge: a request body is over its limit (RequestTooLargeException, 413).
	ErrTooLarge = errors.New("request too large")
	// ErrUnsupportedMediaType: wrong Content-Type (UnsupportedMediaTypeException, 415).
	ErrUnsupportedMediaType = errors.New("unsupported media type")
	// ErrThrottled: a concurrency limit was hit (TooManyRequestsException, 429).
	// Prefer Throttled(reason), which carries Lambda's Reason field.
	ErrThrottled = errors.New("too many requests")
	// ErrNotReady: the function exists but cannot run yet, e.g. State is
	// Pending or Failed (ResourceNotReadyException, 502).
	ErrNotReady = errors.New("resource not ready")
	// ErrInvalidRuntime: the function's runtime cannot be run on this host
	// (InvalidRuntimeException, 502).
	ErrInvalidRuntime = errors.New("invalid runtime")
	// ErrUnavailable: a dependency (harness, store) is shutting down or
	// unreachable; retrying later may succeed (ServiceException, 503).
	ErrUnavailable = errors.New("service unavailable")
)

// Throttle reasons used by Lambda in TooManyRequestsException.Reason.
const (
	ReasonReservedFunctionConcurrency = "ReservedFunctionConcurrentInvocationLimitExceeded"
	ReasonConcurrentInvocationLimit   = "ConcurrentInvocationLimitExceeded"
)

// ThrottleError is an ErrThrottled that carries Lambda's Reason.
type ThrottleError struct {
	Reason string
	Msg    string
}

func (e *ThrottleError) Error() string { return e.Msg }

// Is reports whether target is ErrThrottled, so errors.Is works on wrapped throttles.
func (e *ThrottleError) Is(target error) bool { return target == ErrThrottled }

// Throttled returns an ErrThrottled with Lambda's reason and a message.
func Throttled(reason, format string, args ...any) error {
	return &ThrottleError{Reason: reason, Msg: fmt.Sprintf(format, args...)}
}

// Invalid is shorthand for an ErrInvalidParameter with a message for the caller.
func Invalid(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrInvalidParameter)
}

// Message returns the part of err's text that is meant for a client: the
// message without the trailing ": <kind>" that wrapping a sentinel adds.
func Message(err error) string {
	msg := err.Error()
	for _, k := range exceptions {
		suffix := ": " + k.kind.Error()
		if len(msg) > len(suffix) && msg[len(msg)-len(suffix):] == suffix {
			return msg[:len(msg)-len(suffix)]
		}
	}
	return msg
}

// exceptions names each kind's Lambda exception. The order matters only for
// errors that wrap two kinds: the first match wins.
var exceptions = []struct {
	kind error
	name string
}{
	{ErrNotFound, "ResourceNotFoundException"},
	{ErrAlreadyExists, "ResourceConflictException"},
	{ErrConflict, "ResourceConflictException"},
	{ErrPreconditionFailed, "PreconditionFailedException"},
	{ErrInvalidParameter, "InvalidParameterValueException"},
	{ErrInvalidRequestContent, "InvalidRequestContentException"},
	{ErrTooLarge, "RequestTooLargeException"},
	{ErrUnsupportedMediaType, "UnsupportedMediaTypeException"},
	{ErrThrottled, "TooManyRequestsException"},
	{ErrNotReady, "ResourceNotReadyException"},
	{ErrInvalidRuntime, "InvalidRuntimeException"},
	{ErrUnavailable, "ServiceException"},
}

// ExceptionName returns the Lambda exception err's kind maps to, and false
// when err has no kind (an internal error).
func ExceptionName(err error) (string, bool) {
	for _, e := range exceptions {
		if errors.Is(err, e.kind) {
			return e.name, true
		}
	}
	return "", false
}
