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
	Versions() Versions
	Runtimes() Runtimes
	Invocations() Invocations
	Queue() Queue
	Close() error
}

// Functions is the applications DB: one row per function ($LATEST).
// A function's published versions live in Versions and belong to it: they
// go when it goes.
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
	// Delete removes the function and all its published versions, in one
	// transaction. ErrNotFound if absent.
	Delete(ctx context.Context, name string) error
	// CodeInUse reports whether any function or published version
	// references the code digest (base64 CodeSha256), so unreferenced blobs
	// can be removed.
	CodeInUse(ctx context.Context, codeSha256 string) (bool, error)
}

// Versions holds published function versions: numbered, immutable copies
// of a function's $LATEST configuration (and so of its code reference).
//
// Numbers are assigned by Publish, per function, from 1 up, and are never
// reused: deleting version 3 does not make 3 available again. They start
// from 1 again only for a function that was deleted and created anew,
// since deleting a function deletes its versions and its counter.
//
// A version's configuration never changes after Publish except for its
// state (State, StateReason, StateReasonCode, SnapStart.OptimizationStatus),
// which SetState moves. Versions are returned with Version set to their
// number in decimal; ReservedConcurrency is not a property of a version
// (it is the function's) and comes back as stored.
type Versions interface {
	// Publish stores cfg as cfg.Name's next version if the function's
	// current RevisionID is latestRevision, the $LATEST revision cfg was
	// copied from (compare-and-swap: ErrPreconditionFailed if it moved on,
	// ErrNotFound if the function does not exist). cfg carries the
	// version's own RevisionID; its Version is ignored and assigned.
	//
	// If the function's newest existing version was itself published from
	// latestRevision, $LATEST has not changed since, and Publish stores
	// nothing and returns that version with created false, as Lambda does.
	// Concurrent Publishes of one function get distinct numbers or, for
	// the same unchanged $LATEST, the same version.
	Publish(ctx context.Context, cfg *function.Config, latestRevision string) (v *function.Config, created bool, err error)
	// Get returns version (a decimal number) of the function. ErrNotFound
	// if the function or the version does not exist.
	Get(ctx context.Context, name, version string) (*function.Config, error)
	// List returns up to max versions of the function in ascending number
	// order, starting after marker ("" = from the first), and the marker
	// of the next page ("" when there is none). Marker is opaque to
	// callers; one this store did not return is ErrInvalidParameter. A
	// function without versions, or without a row, has an empty list.
	List(ctx context.Context, name, marker string, max int) ([]*function.Config, string, error)
	// SetState writes cfg's State, StateReason, StateReasonCode and
	// SnapStart.OptimizationStatus to version cfg.Version of cfg.Name if
	// the stored State is from (ErrPreconditionFailed otherwise), so two
	// writers cannot both settle one transition. ErrNotFound if the
	// version is gone.
	SetState(ctx context.Context, cfg *function.Config, from function.State) error
	// Delete removes one version. ErrNotFound if absent.
	Delete(ctx context.Context, name, version string) error
	// ListPending returns every version, of any function, whose State is
	// Pending, ordered by function name and number: the work a control
	// plane that stopped while preparing versions has left.
	ListPending(ctx context.Context) ([]*function.Config, error)
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
	// Qualifier is the published version the event invokes; "" is $LATEST.
	Qualifier string
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
