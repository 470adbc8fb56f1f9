// Package driver is the contract between the harness and the things that
// run sandboxes on one host: the process sandbox (Linux namespaces and
// cgroups), QEMU microvm and Firecracker. Implementations live in
// subpackages; every one of them runs the conformance suite in drivertest.
//
// # Vocabulary
//
// An instance is one execution environment: an isolated sandbox with the
// agent (package agent) running inside it, reachable over one byte stream.
// The driver only creates, connects and destroys instances; what runs inside
// (INIT, invocations) is spoken over the stream with package protocol by the
// harness.
//
// # Lifecycle
//
//	Start ──> running ──(Stop | sandbox exits)──> gone
//
// Start returns once the agent's stream is connected; it does not send Init.
// After Stop returns, or after Done is closed and Stop was called, nothing of
// the instance remains on the host: no process, mount, cgroup, VM, socket or
// directory.
//
// # Crash recovery
//
// Every resource an instance owns is recorded under the driver's state
// directory before it is created, so that Recover, called once when a
// harness starts, can find what a previous (crashed) harness left behind and
// either re-adopt it or remove it.
package driver

import (
	"context"
	"io"

	"github.com/invokex/invokex/internal/runtimes"
)

// Spec describes one instance to start.
type Spec struct {
	// ID is unique per host, chosen by the harness; [a-z0-9-], at most 40 bytes.
	ID string
	// Function and RevisionID label the instance (logs, re-adoption).
	Function   string
	RevisionID string
	Runtime    runtimes.Runtime
	// CodeDir is a host directory holding the unpacked code; the sandbox sees
	// it read-only at /var/task.
	CodeDir string
	// CodeSha256 is the base64 SHA-256 of the deployment package CodeDir was
	// unpacked from: drivers that turn the code into an image cache it by this.
	CodeSha256 string
	// RuntimeDir is a host directory with the runtime's support files
	// (runtime interface clients); the sandbox sees it read-only at /var/runtime.
	RuntimeDir string
	// MemoryMB caps the sandbox's memory. The pids limit is Lambda's fixed
	// 1,024 processes and threads, whatever the memory.
	MemoryMB int
	// EphemeralMB caps the sandbox's writable /tmp.
	EphemeralMB int
	// Network gives the sandbox a network to the outside: with a driver
	// that has a network.Manager, the internet and nothing of the host's
	// (package network); without one, the host's network (each driver's
	// Describe says so). False isolates it in an empty network namespace
	// (loopback only).
	Network bool
	// ForSnapshot says the instance will be saved with Snapshotter.Snapshot
	// after its INIT: a driver may start it so that its snapshot restores
	// faster or shares more (the qemu driver keeps its RAM in a file).
	// Drivers without snapshots ignore it.
	ForSnapshot bool
}

// Instance is one running sandbox.
type Instance interface {
	// ID returns Spec.ID.
	ID() string
	// Conn is the byte stream to the agent. Closing it makes the agent exit.
	Conn() io.ReadWriteCloser
	// Done is closed when the sandbox has exited, for any reason.
	Done() <-chan struct{}
}

// Driver starts and stops instances on one host.
//
// All methods are safe for concurrent use. Errors wrap errdefs kinds:
// ErrInvalidParameter for a bad Spec, ErrUnavailable when the host cannot
// start more instances or the driver is closed.
type Driver interface {
	// Name is the driver's name as given to --driver ("process", "qemu", ...).
	Name() string
	// Start creates and starts an instance and connects to its agent. If ctx
	// is cancelled or Start fails, everything it created is removed before
	// it returns.
	Start(ctx context.Context, spec Spec) (Instance, error)
	// Stop destroys the instance: the agent and everything in the sandbox are
	// killed (gracefully first, bounded by ctx, then forcibly) and all its
	// host resources removed. Idempotent: stopping a gone or unknown ID
	// returns nil. Cleanup runs to completion even if ctx is cancelled.
	Stop(ctx context.Context, id string) error
	// Recover is called once, before the first Start, by a harness that is
	// starting up. It removes (or re-adopts) every instance a previous
	// driver process left behind and returns the re-adopted ones. Drivers
	// that cannot re-connect to an instance remove it.
	Recover(ctx context.Context) ([]Instance, error)
}

// Closer is implemented by drivers that hold resources beyond instances.
// Close stops all instances and releases them; the driver is unusable after.
type Closer interface {
	Close(ctx context.Context) error
}

// Preparer is implemented by drivers that turn a revision into artifacts
// of their own before its first Start, such as a VM driver's root and code
// disk images. The harness calls Prepare when a revision is deployed, with
// a Spec whose Function, RevisionID, Runtime, CodeDir, CodeSha256 and
// RuntimeDir are set (no ID: there is no instance yet). What Prepare makes
// is a cache Start uses: a failed or skipped Prepare only makes the first
// Start slower, and Start must work without it. Idempotent and safe for
// concurrent use; it stops early when ctx is cancelled. Errors wrap errdefs
// kinds.
type Preparer interface {
	Prepare(ctx context.Context, spec Spec) error
}

// RuntimeDetector is implemented by drivers whose sandboxes do not run
// the host's interpreters: a VM driver boots each runtime's own root image,
// so which runtimes it can run, and where their interpreters are, depends
// on its images, not on the host. The runtimes DB is filled from it instead
// of from probing the host. Safe for concurrent use; stops when ctx is done
// (the runtimes left are reported unavailable).
type RuntimeDetector interface {
	DetectRuntimes(ctx context.Context) []*runtimes.Runtime
}

// Lambda gives a function one vCPU's worth of time per 1,769 MB of
// memory and at most 6 vCPUs (at 10,240 MB).
const (
	mbPerVCPU = 1769
	maxVCPUs  = 6
)

// VCPUsFor is how many vCPUs a sandbox of memoryMB gets, derived from its
// memory as Lambda does, and capped by hostCPUs (more vCPUs than the
// host's cores only adds contention; 0: no cap).
func VCPUsFor(memoryMB, hostCPUs int) int {
	n := (memoryMB + mbPerVCPU - 1) / mbPerVCPU
	n = min(max(n, 1), maxVCPUs)
	if hostCPUs > 0 {
		n = min(n, hostCPUs)
	}
	return n
}

// Emulator is implemented by drivers whose guests may run under software
// emulation (QEMU's TCG where KVM cannot run a standard guest). Emulated
// reports whether they do on this host: guest code then runs several
// times slower than on the host, which the harness allows for in the
// limits that Lambda fixes rather than the function's configuration
// (INIT's 10 s). It must not change after the driver is created.
type Emulator interface {
	Emulated() bool
}

// Describer is implemented by drivers that can report how well they isolate
// on this host (e.g. "cgroup memory limits unavailable: not root").
type Describer interface {
	Describe() []string
}
