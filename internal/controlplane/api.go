package controlplane

import (
	"context"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// The interfaces below are what the frontend consumes; *Service implements
// all of them. Names are bare function names (the frontend resolves ARNs).
// Errors wrap errdefs kinds; the frontend translates them to Lambda's
// exceptions.

// Functions manages function configuration and code.
type Functions interface {
	// CreateFunction validates cfg and the zip, stores the code and the
	// function and returns the stored configuration (State Active).
	CreateFunction(ctx context.Context, cfg *function.Config, zip []byte) (*function.Config, error)
	GetFunction(ctx context.Context, name string) (*function.Config, error)
	ListFunctions(ctx context.Context, marker string, max int) ([]*function.Config, string, error)
	// UpdateFunctionCode replaces the code. If revisionID is not "" it must
	// equal the current RevisionId (else ErrPreconditionFailed).
	UpdateFunctionCode(ctx context.Context, name string, zip []byte, revisionID string) (*function.Config, error)
	UpdateFunctionConfiguration(ctx context.Context, name string, upd *ConfigUpdate, revisionID string) (*function.Config, error)
	DeleteFunction(ctx context.Context, name string) error
	// PutFunctionConcurrency sets (n != nil) or removes (n == nil) reserved concurrency.
	PutFunctionConcurrency(ctx context.Context, name string, n *int) (*function.Config, error)
	// FunctionCode returns the deployment package of $LATEST (qualifier
	// "" or "$LATEST") or of a published version.
	FunctionCode(ctx context.Context, name, qualifier string) ([]byte, error)
}

// Versions manages published versions: immutable, numbered copies of a
// function's $LATEST configuration and code.
type Versions interface {
	// PublishVersion publishes $LATEST as the next version (or returns the
	// newest version if $LATEST has not changed since it was published).
	// A version of a function with SnapStart.ApplyOn PublishedVersions is
	// Pending until every host has taken its snapshot (see
	// VersionPreparer); any other is Active.
	PublishVersion(ctx context.Context, name string, in *PublishInput) (*function.Config, error)
	// ListVersionsByFunction returns up to max configurations (default 50,
	// at most 10000): $LATEST first, then the versions by ascending
	// number, and the next page's marker ("" at the end).
	ListVersionsByFunction(ctx context.Context, name, marker string, max int) ([]*function.Config, string, error)
	// GetFunctionVersion returns $LATEST (qualifier "" or "$LATEST") or a
	// published version. ErrNotFound for anything else.
	GetFunctionVersion(ctx context.Context, name, qualifier string) (*function.Config, error)
	// DeleteFunctionVersion deletes one published version; $LATEST cannot
	// be deleted this way (ErrInvalidParameter).
	DeleteFunctionVersion(ctx context.Context, name, version string) error
}

// PublishInput is PublishVersion's optional checks and description.
type PublishInput struct {
	// CodeSha256, if not "", must be $LATEST's (else ErrInvalidParameter).
	CodeSha256 string
	// Description, if not "", replaces $LATEST's in the version.
	Description string
	// RevisionID, if not "", must be $LATEST's (else ErrPreconditionFailed).
	RevisionID string
}

// ConfigUpdate holds the fields UpdateFunctionConfiguration may change; nil
// fields are left as they are.
type ConfigUpdate struct {
	Runtime          *string
	Handler          *string
	Role             *string
	Description      *string
	Timeout          *int
	MemorySize       *int
	EphemeralStorage *int
	Environment      *map[string]string
	SnapStart        *function.SnapStartApplyOn
}

// InvokeInput is a synchronous invocation as the frontend received it.
type InvokeInput struct {
	// RequestID is assigned by the frontend (it is also X-Amzn-RequestId).
	RequestID     string
	Function      string
	Qualifier     string
	Payload       []byte
	ClientContext string
	TraceID       string
}

// Invoker runs functions.
type Invoker interface {
	// Invoke runs one synchronous invocation and records it. The
	// configuration it returns (the one that ran) is shared: read-only.
	Invoke(ctx context.Context, in *InvokeInput) (*harness.InvokeResult, *function.Config, error)
	// InvokeAsync durably queues an Event invocation and returns once it is
	// stored; it runs later with Lambda's retry semantics.
	InvokeAsync(ctx context.Context, in *InvokeInput) error
	// CheckInvoke does what a DryRun does: resolves the function and
	// verifies it could be invoked.
	CheckInvoke(ctx context.Context, name, qualifier string) (*function.Config, error)
}

// Records reads invocation records.
type Records interface {
	GetInvocation(ctx context.Context, requestID string) (*invocation.Record, error)
	ListInvocations(ctx context.Context, function string, limit int) ([]*invocation.Record, error)
}

// Catalog reads the runtimes DB.
type Catalog interface {
	ListRuntimes(ctx context.Context) ([]*runtimes.Runtime, error)
}

// API is everything the frontend needs.
type API interface {
	Functions
	Versions
	Invoker
	Records
	Catalog
}
