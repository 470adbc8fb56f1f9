package harness

import (
	"context"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

// InvokeRequest is one synchronous invocation placed on this host.
type InvokeRequest struct {
	RequestID string
	// Function is the configuration to run (its RevisionID selects the pool);
	// Runtime is its row of the runtimes DB. Both are read, never kept.
	Function *function.Config
	Runtime  *runtimes.Runtime
	// ARN is the invoked function ARN handed to the runtime.
	ARN           string
	Payload       []byte
	ClientContext string
	TraceID       string
}

// InvokeResult is what the function did. A function error is a result, not
// an error: FunctionError is "Unhandled" and Payload the error document.
type InvokeResult struct {
	RequestID     string
	Payload       []byte
	FunctionError string
	ErrorType     string
	// Log is the invocation's log (START ... REPORT), capped; LogBytes counts
	// everything the function wrote.
	Log          []byte
	LogBytes     int64
	Start        time.Time
	End          time.Time
	Duration     time.Duration
	InitDuration time.Duration
	Cold         bool
	MaxMemoryMB  int
	// Instance is the id of the execution environment that ran it (one
	// sandbox; a log stream in Lambda's terms).
	Instance string
}

// Host is the harness as the control plane sees it: in the same process
// for the all-in-one server, over the network when roles run apart.
//
// Invoke runs one invocation on a warm instance of the function's revision,
// starting one if none is idle and the function's concurrency cap allows.
// Errors (not function errors) wrap errdefs kinds: ErrThrottled when the
// cap is reached, ErrInvalidRuntime when the runtime cannot run here,
// ErrUnavailable when the harness is shutting down. If ctx is cancelled
// (client gone) Invoke returns ctx.Err() promptly and the instance is
// released or destroyed, never leaked.
type Host interface {
	Invoke(ctx context.Context, req *InvokeRequest) (*InvokeResult, error)
	// Retire stops the function's instances whose revision is not
	// keepRevision ("" retires all of them): idle ones now, busy ones when
	// their invocation ends. Used on update and delete.
	Retire(ctx context.Context, function, keepRevision string) error
}

// Preparer is implemented by hosts that can get a revision ready before its
// first invocation, as Lambda does while a function is Pending: the control
// plane finds it by type assertion on a Host and calls it right after it
// stored a new revision, so that the first invocation after a deploy does
// not wait for the code to be fetched and unpacked.
//
// Prepare is best-effort and idempotent: the caller logs a failure and
// carries on (an invocation prepares whatever Prepare did not). What it
// prepares is kept until the revision is retired (Retire with another
// keepRevision, or DeleteFunction's Retire of all) or superseded and
// unused. Errors wrap errdefs kinds: ErrInvalidParameter for a
// configuration without name, revision or code digest, ErrUnavailable when
// the host is not running; anything else is the platform's own failure.
type Preparer interface {
	Prepare(ctx context.Context, cfg *function.Config) error
}
