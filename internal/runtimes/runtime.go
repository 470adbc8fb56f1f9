// Package runtimes is the runtimes DB's vocabulary: which runtime
// identifiers InvokeX knows (provided.al2023, python3.x, nodejs20.x ...),
// what each needs to run, and which of them this host can run.
package runtimes

// Family groups runtimes that share a bootstrap and a handler convention.
type Family string

const (
	// FamilyProvided runs an executable named "bootstrap" at the code root.
	FamilyProvided Family = "provided"
	// FamilyPython runs InvokeX's python runtime interface client; handler "file.function".
	FamilyPython Family = "python"
	// FamilyNode runs InvokeX's node runtime interface client; handler "file.export".
	FamilyNode Family = "nodejs"
)

// Runtime is one row of the runtimes DB.
type Runtime struct {
	// ID is Lambda's runtime identifier, e.g. "python3.11".
	ID     string
	Family Family
	// Available reports whether this host can run it; Reason says why not.
	Available bool
	Reason    string
	// Interpreter is the host path of the language interpreter the process
	// sandbox uses (empty for provided runtimes).
	Interpreter string
	// Bootstrap is the command line run inside the sandbox, with paths as the
	// sandbox sees them (/var/task, /var/runtime).
	Bootstrap []string
	// HandlerFormat documents the handler convention, e.g. "file.function".
	HandlerFormat string
	// DefaultHandler is used when CreateFunction gives none.
	DefaultHandler string
	// ExecutionEnv is the value of AWS_EXECUTION_ENV, e.g. "AWS_Lambda_python3.11".
	ExecutionEnv string
}
