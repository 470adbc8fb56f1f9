package driver

import "context"

// Snapshotter is implemented by drivers that can save an initialised
// instance and start new instances from the save (Lambda's SnapStart).
//
// The harness uses it for published versions with SnapStart: it starts an
// instance, runs INIT (InitType "snap-start"), calls Snapshot, and from
// then on starts that revision's instances with Restore. A restored
// instance's agent is mid-session, exactly where it was when the snapshot
// was taken (initialised, waiting for a frame); the harness sends it a
// protocol.Restore before any Invoke.
//
// Both methods are safe for concurrent use (for different IDs and
// directories). Errors wrap errdefs kinds.
type Snapshotter interface {
	// Snapshot saves the running instance id into dir, which it creates
	// (its parent exists; dir must not): memory, device state and its
	// writable disk, plus whatever Restore needs to find the read-only
	// disks again. The instance must be idle: its agent waiting for the
	// next frame, with no frame in flight. The instance is stopped and
	// removed afterwards, whether the snapshot succeeded or not. On
	// failure dir is removed. ErrNotFound for an unknown id.
	Snapshot(ctx context.Context, id, dir string) error
	// Restore starts a new instance, spec.ID, from the snapshot in dir.
	// spec describes the same revision the snapshot was taken of (same
	// Runtime, code, MemoryMB, EphemeralMB); Network may differ only if
	// the driver says so. Many instances may be restored from one
	// snapshot, at the same time; dir is never written. ErrNotFound if dir
	// holds no complete snapshot; on any failure nothing is left running
	// and the caller may fall back to Start.
	Restore(ctx context.Context, spec Spec, dir string) (Instance, error)
}
