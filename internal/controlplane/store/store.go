// Package store is the contract of the control plane's databases: the
// applications DB (functions), the runtimes DB, invocation records and the
// async event queue. Implementations live beside it (sqlite/, later
// postgres/) and all run the conformance suite in storetest.
//
// Every method takes a context and honours its cancellation. All methods are
// safe for concurrent use. Values passed in and returned are copies: a
// caller may modify what it gets without affecting the store.
//
// Errors wrap errdefs kinds: ErrNotFound for a missing row, ErrAlreadyExists
// for a duplicate key, ErrPreconditionFailed for a failed revision check,
// ErrInvalidParameter for a bad argument (a limit <= 0, a time that cannot
// be stored), ErrUnavailable after Close. Anything else is an internal error.
//
// Times come back in UTC and exact to the nanosecond; an implementation on a
// database with coarser timestamps must store integers.
package store

import (
	"context"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// Store groups the databases. Close releases the underlying connection(s).
type Store interface {
	Functions() Functions
	Runtimes() Runtimes
	Invocations() Invocations
	Queue() Queue
	Close() error
}

// Functions is the applications DB: one row per function ($LATEST).
type Functions interface {
	// Create inserts cfg. ErrAlreadyExists if the name is taken.
	Create(ctx context.Context, cfg *function.Config) error
	// Get returns the function. ErrNotFound if absent.
	Get(ctx context.Context, name string) (*function.Config, error)
	// List returns up to max functions ordered by name, starting after
	// marker ("" = from the start), and the marker of the next page ("" when
	// there is none). Marker is opaque to callers.
	List(ctx context.Context, marker string, max int) ([]*function.Config, string, error)
	// Update replaces the stored function with cfg if its stored RevisionID
	// equals expectedRevision (compare-and-swap); cfg carries the new
	// RevisionID. ErrNotFound if absent, ErrPreconditionFailed on mismatch.
	Update(ctx context.Context, cfg *function.Config, expectedRevision string) error
	// Delete removes the function. ErrNotFound if absent.
	Delete(ctx context.Context, name string) error
	// CodeInUse reports whether any function references the code digest
	// (base64 CodeSha256), so unreferenced blobs can be removed.
	CodeInUse(ctx context.Context, codeSha256 string) (bool, error)
}

// Runtimes is the runtimes DB.
type Runtimes interface {
	// Put inserts or replaces a runtime by ID.
	Put(ctx context.Context, rt *runtimes.Runtime) error
	// Get returns a runtime by ID. ErrNotFound if absent.
	Get(ctx context.Context, id string) (*runtimes.Runtime, error)
	// List returns all runtimes ordered by ID.
	List(ctx context.Context) ([]*runtimes.Runtime, error)
}

// Invocations holds invocation records.
type Invocations interface {
	// Put inserts or replaces records by RequestID, all in one transaction.
	Put(ctx context.Context, recs []*invocation.Record) error
	// Get returns one record. ErrNotFound if absent.
	Get(ctx context.Context, requestID string) (*invocation.Record, error)
	// ListByFunction returns the newest records of a function, newest first,
	// at most limit; before (zero = now) pages back in time by Start.
	ListByFunction(ctx context.Context, function string, before time.Time, limit int) ([]*invocation.Record, error)
	// DeleteBefore removes records that ended before t (retention); returns the count.
	DeleteBefore(ctx context.Context, t time.Time) (int64, error)
}

// Event is one queued asynchronous invocation.
type Event struct {
	// RequestID is the invocation's id, assigned at enqueue.
	RequestID string
	Function  string
	Payload   []byte
	// ClientContext is X-Amz-Client-Context as received (base64).
	ClientContext string
	EnqueuedAt    time.Time
	// NotBefore: the event is not claimed before this time (retry backoff).
	NotBefore time.Time
	// Attempts counts runs started so far.
	Attempts  int
	LastError string
}

// Queue is the durable async (Event) invocation queue. Delivery is
// at-least-once: a claimed event whose lease expires before Complete or
// Retry is claimed again.
type Queue interface {
	// Enqueue durably stores events (one transaction) before returning. A
	// duplicate RequestID fails the whole batch with ErrAlreadyExists.
	Enqueue(ctx context.Context, evs []*Event) error
	// Claim leases up to max events whose NotBefore <= now and whose lease is
	// not held, earliest due first (oldest first among events due at the same
	// time), increments their Attempts and holds them for lease.
	Claim(ctx context.Context, now time.Time, lease time.Duration, max int) ([]*Event, error)
	// Complete removes a claimed event. Idempotent.
	Complete(ctx context.Context, requestID string) error
	// Retry releases a claimed event to be claimed again at notBefore.
	// ErrNotFound for an unknown event.
	Retry(ctx context.Context, requestID string, notBefore time.Time, lastErr string) error
	// ReleaseLeases ends every lease now, so that events claimed by a
	// process that crashed are due at once instead of when their leases
	// expire. Only the queue's sole owner may call it (the all-in-one server
	// holds its data dir's lock); returns how many were released.
	ReleaseLeases(ctx context.Context, now time.Time) (int, error)
	// Len returns the number of events in the queue (claimed or not).
	Len(ctx context.Context) (int, error)
}
