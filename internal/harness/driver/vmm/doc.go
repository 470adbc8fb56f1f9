// Package vmm is what every microVM driver shares (the qemu and the
// firecracker driver today): the guest's images and the code keys that
// name them in the cache, the per-instance records Recover reads, the
// bounded console log, vCPU sizing, the KVM probe, and the sequence an
// instance goes through: start, stop, and recovery after a crash. Each
// driver keeps only what is its VMM's own: its command line or API
// client, its jailer, how it reaches the guest's agent (virtio-serial
// socket, hybrid vsock) and how it asks the VMM to quit (QMP, Ctrl-Alt-Del).
//
// # Shape
//
// A driver holds a Host[M], where M is its VM type: a struct that embeds
// *Instance (the state every VM has: ID, directory, slot, VMM process,
// output, agent stream) and implements Machine (Boot, Ask, Release).
//
//	Driver.Start ──> Host.Start: validate, slot, register ──> M.Boot
//	                   Boot: Instance.Create (record) ──> Host.Disks
//	                         ──> Instance.Launch (VMM) ──> AwaitAgent
//	Driver.Stop  ──> Host.Stop ──> close stream, M.Ask, SIGKILL,
//	                 M.Release, remove the instance directory
//	Driver.Recover ─> Host.Recover ──> the driver's leftover killer
//	                 (ReadLeftoverRecord, KillLeftover) ──> remove
//
// Both drivers boot the same guest: the root image of package guest
// (/dev/vda), the code image (/dev/vdb, named by CodeKey, so a revision's
// image built by one driver is found by the other) and a scratch disk
// (/dev/vdc), with the agent (package vminit) as init, which writes
// ReadyLine on its stream when it is about to serve.
//
// # Concurrency
//
// Host methods are safe for concurrent use. Machine methods are called by
// the Host, never two of one machine at a time.
package vmm
