package vmm

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/protocol"
)

// SpareLine is what the init of a spare VM writes on its stream when it
// waits for its assignment (package vminit's Spare; see
// protocol.Assignment).
const SpareLine = "INVOKEX-AGENT-SPARE\n"

// SpareCodeBytes is the size of the placeholder a spare VM's code disk
// has until its assignment, and so the largest code image a spare can
// take: the guest sized the disk when it booted and keeps that size (QEMU
// tells it nothing when the image behind the disk changes). A code image
// only needs a disk at least its size; the guest never reads past its file
// system. Lambda's limit is 250 MB of unzipped code.
const SpareCodeBytes = 1 << 30

// SpareMachine is a Machine that can also boot as a spare: a VM booted
// ahead of need, for no function, that a cold start then turns into its
// instance in a fraction of a boot (see Host's spares). The Host calls
// its methods, never two at a time, and never Boot on a spare.
type SpareMachine interface {
	Machine
	// BootSpare boots the VM of spec, whose ID is the spare's name and
	// whose CodeDir is empty, with a placeholder of SpareCodeBytes where
	// the code disk goes and invokex.spare=1 on the kernel command line,
	// and returns once the guest waits for its assignment
	// (Instance.AwaitSpare). Like Boot, it returns with whatever it made
	// in place on error, and the Host stops the machine.
	BootSpare(ctx context.Context, spec driver.Spec) error
	// Assign makes the waiting spare the instance of spec (the Host has
	// set its ID and logger already): it moves its directory
	// (Instance.Rename), then records the VM under spec's ID (the record
	// keeps Instance.Name, the name the VMM was launched with, as
	// Record.Machine; until then its ID is that name), puts the code image
	// at code in the placeholder's place, and hands over to the guest
	// (Instance.SendAssignment). On error the Host stops the machine.
	Assign(ctx context.Context, spec driver.Spec, code string) error
}

// sparePrefix begins the name of a spare VM until it is assigned (the
// pool adds 16 random hex digits).
const sparePrefix = "spare-"

// AwaitSpare connects to the guest's init with dial and waits for its
// SpareLine; see AwaitAgent, whose contract it shares.
func (i *Instance) AwaitSpare(ctx context.Context, what string, dial func(context.Context) (net.Conn, error)) error {
	conn, err := i.dial(ctx, what, dial)
	if err != nil {
		return err
	}
	i.conn = conn
	return i.awaitLine(ctx, SpareLine, "waiting for the spare vm")
}

// Name is the name the VMM was launched with (its process's -name, the
// base of its first directory): the ID it booted for, or a spare's name.
func (i *Instance) Name() string { return i.name }

// Rename moves an assigned spare's instance directory to the one of its
// new ID. The VMM keeps its sockets and disks through the descriptors it
// holds.
func (i *Instance) Rename() error {
	dir := filepath.Join(filepath.Dir(i.dir), i.id)
	if err := os.Rename(i.dir, dir); err != nil {
		return fmt.Errorf("moving the spare's state directory: %w", err)
	}
	i.dir = dir
	return nil
}

// SendAssignment sends the spare's guest its protocol.Assignment (the
// hostname of instance id) and waits, at most timeout, for the ReadyLine
// the guest writes once it has mounted its code: the VM is then like any
// booted one.
func (i *Instance) SendAssignment(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := i.ReadyContext(ctx, timeout)
	defer cancel()
	if err := i.writeAssignment(ctx, protocol.Assignment{Hostname: Hostname(i.id)}, "sending the assignment"); err != nil {
		return err
	}
	return i.awaitLine(ctx, ReadyLine, "waiting for the assigned agent")
}

// RenewSpare sends a spare restored from a template (its agent attached:
// AttachAgent) the renewal r and waits, at most timeout, for its SpareLine:
// the spare is then ready for an assignment like a booted one.
func (i *Instance) RenewSpare(ctx context.Context, timeout time.Duration, r protocol.Renewal) error {
	ctx, cancel := i.ReadyContext(ctx, timeout)
	defer cancel()
	if err := i.writeAssignment(ctx, protocol.Assignment{Renew: &r}, "renewing the restored spare"); err != nil {
		return err
	}
	return i.awaitLine(ctx, SpareLine, "waiting for the renewed spare")
}

// writeAssignment writes a to the guest, abandoned when ctx ends.
func (i *Instance) writeAssignment(ctx context.Context, a protocol.Assignment, what string) error {
	stop := context.AfterFunc(ctx, func() { _ = i.conn.SetWriteDeadline(time.Now()) })
	err := protocol.WriteAssignment(i.conn, a)
	if !stop() {
		if ctx.Err() != nil {
			return i.ReadyErr(ctx, what)
		}
		_ = i.conn.SetWriteDeadline(time.Time{})
	}
	if err != nil {
		return i.WithOutput(fmt.Errorf("%s: %w", what, err))
	}
	return nil
}

// SpareReadyFile, in a spare's directory, says that the spare is ready
// and in the pool: the pool writes it once it holds the booted spare and
// removes it when a cold start takes the spare.
const SpareReadyFile = "spare-ready"

// SparePIDs returns the VMM pids of the spares recorded in a driver's
// StateDir, and how many of them are ready (in the pool, waiting for a
// cold start): a tool looking at the driver's processes from outside (the
// benchmark, tests) tells them from instances by it. A spare being booted
// or assigned at that moment may be missing.
func SparePIDs(stateDir string) (pids []int, ready int) {
	dirs, _ := filepath.Glob(filepath.Join(stateDir, sparePrefix+"*"))
	for _, dir := range dirs {
		rec, err := hostproc.ReadRecord[Record](dir)
		if err != nil || rec.PID <= 0 {
			continue // renamed, removed or not written yet
		}
		pids = append(pids, rec.PID)
		if _, err := os.Stat(filepath.Join(dir, SpareReadyFile)); err == nil {
			ready++
		}
	}
	return pids, ready
}
