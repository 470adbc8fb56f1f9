// Package invocation holds the record InvokeX keeps of every invocation,
// synchronous or asynchronous, retrievable by request id.
package invocation

import "time"

// Type is Lambda's X-Amz-Invocation-Type.
type Type string

const (
	TypeRequestResponse Type = "RequestResponse"
	TypeEvent           Type = "Event"
	TypeDryRun          Type = "DryRun"
)

// Status is the outcome of an invocation.
type Status string

const (
	// StatusQueued: an Event invocation accepted and not yet run.
	StatusQueued Status = "Queued"
	// StatusSucceeded: the function returned a response.
	StatusSucceeded Status = "Succeeded"
	// StatusFunctionError: the function failed (X-Amz-Function-Error: Unhandled).
	StatusFunctionError Status = "FunctionError"
	// StatusFailed: the platform could not run it (throttled, no runtime, ...).
	StatusFailed Status = "Failed"
)

// Record is one invocation. Log is capped (see MaxLogBytes); LogBytes counts
// every byte the function wrote, including what the cap dropped.
type Record struct {
	RequestID  string
	Function   string
	RevisionID string
	Version    string
	Type       Type
	Status     Status
	// ErrorType is the runtime's errorType for a function error, or the
	// platform's error kind for StatusFailed.
	ErrorType    string
	ErrorMessage string
	Attempts     int
	Cold         bool
	Start        time.Time
	End          time.Time
	InitDuration time.Duration
	Duration     time.Duration
	MaxMemoryMB  int
	Log          []byte
	LogBytes     int64
}

// MaxLogBytes caps the log kept for one invocation.
const MaxLogBytes = 256 << 10
