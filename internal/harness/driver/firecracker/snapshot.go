package firecracker

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

var _ driver.Snapshotter = (*Driver)(nil)

// A snapshot directory (see driver.Snapshotter) holds what Firecracker
// writes on PUT /snapshot/create (the VM state and a full copy of guest
// memory), a copy of the scratch disk as it was, and hard links to the
// kernel, root and code images the VM ran (so the image cache's pruning
// cannot take them; copies when they are on another file system),
// described by vm.json, which is written last: a directory without a
// readable vm.json, or without one of the other files, is no snapshot.
//
// The state file records the paths the VM was configured with: its
// drives' path_on_host and its vsock's uds_path. Firecracker resolves
// them again when it loads the snapshot, so every VM is configured with
// paths that name files of its own root (see vmFiles): relative to its
// working directory, the instance directory, or, jailed, absolute in its
// chroot. A restored VM's Firecracker runs in its own instance directory
// (or chroot) holding its own copy of the scratch disk and links to the
// snapshot's images, so the same recorded paths reach its own files and
// its own vsock socket.
const (
	snapState    = "snapshot.vmstate"
	snapMemory   = "snapshot.mem"
	snapMetaFile = "vm.json"
	// snapFormat is the layout of the directory, vm.json's "format".
	snapFormat = 1
)

// snapFiles are the files a complete snapshot directory holds besides
// vm.json.
var snapFiles = []string{snapState, snapMemory, scratchImage, kernelFile, rootImage, codeImage}

// snapMeta is vm.json: what Restore checks a spec and the driver against.
type snapMeta struct {
	Format int `json:"format"`
	// Jailed snapshots record in-chroot paths ("/root.ext4"), others
	// paths relative to the instance directory: one restores only where
	// its paths resolve.
	Jailed      bool `json:"jailed"`
	MemoryMB    int  `json:"memory_mb"`
	EphemeralMB int  `json:"ephemeral_mb"`
	VCPUs       int  `json:"vcpus"`
	// Network: the VM had a network of the driver's making (its tap,
	// network.TapName, in a namespace of its own); a restore gets one.
	Network bool `json:"network,omitempty"`
	// Firecracker is the binary that took it (its state file's format is
	// that version's; a newer one may refuse to load it).
	Firecracker string    `json:"firecracker"`
	Created     time.Time `json:"created"`
}

// snapSource is a snapshot a VM is restored from.
type snapSource struct {
	dir  string
	meta snapMeta
}

func (s *snapSource) path(name string) string { return filepath.Join(s.dir, name) }

// snapshotTimeout bounds one save: Firecracker writes the guest's memory
// at disk speed; copying the scratch disk and linking the images take
// what the disk takes.
const snapshotTimeout = 2 * time.Minute

// Snapshot pauses the idle VM id, has Firecracker write its state and
// memory into dir, keeps its disks there and stops it; see
// driver.Snapshotter. The VM is never resumed (a snapshot's VM must not
// run on: what it would do, its restores would do again).
func (d *Driver) Snapshot(ctx context.Context, id, dir string) (err error) {
	i, ok := d.host.Get(id)
	if !ok {
		return fmt.Errorf("snapshot of vm %s: %w", id, errdefs.ErrNotFound)
	}
	made := false
	defer func() {
		serr := d.host.Stop(context.WithoutCancel(ctx), id)
		if err == nil && serr != nil {
			err = fmt.Errorf("snapshot of vm %s: %w", id, serr)
		}
		if err != nil && made {
			_ = os.RemoveAll(dir)
		}
	}()
	if i.nic && i.vnet == nil {
		// An operator's tap and guest address belong to its slot; a
		// restore gets another slot, and the guest's address is in its
		// memory. (With Options.Network every VM's are the same.)
		return errdefs.Invalid("snapshot of vm %s: the firecracker driver takes no snapshots of vms on operator-made taps (Options.TapName)", id)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("snapshot of vm %s: %w", id, err)
	}
	if err := os.Mkdir(abs, 0o700); err != nil {
		return fmt.Errorf("snapshot of vm %s: %w", id, err)
	}
	made = true
	sctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	t0 := time.Now()
	if err := i.snapshot(sctx, abs); err != nil {
		return fmt.Errorf("snapshot of vm %s: %w", id, err)
	}
	i.Log().Debug("vm snapshot taken", "dir", abs, "took", time.Since(t0))
	return nil
}

// snapshot fills dir, which exists and is empty.
func (i *instance) snapshot(ctx context.Context, dir string) error {
	if err := i.api.pause(ctx); err != nil {
		return fmt.Errorf("pausing the vm: %w", err)
	}
	i.paused.Store(true)
	state, memory := filepath.Join(dir, snapState), filepath.Join(dir, snapMemory)
	create := snapshotCreate{SnapshotType: snapshotFull, SnapshotPath: state, MemFilePath: memory}
	if i.jail != nil {
		// The jailed Firecracker writes in its chroot only.
		create.SnapshotPath, create.MemFilePath = i.inRoot(snapState), i.inRoot(snapMemory)
	}
	if err := i.api.createSnapshot(ctx, create); err != nil {
		return fmt.Errorf("creating the snapshot: %w", err)
	}
	if i.jail != nil {
		for _, name := range []string{snapState, snapMemory} {
			if err := moveFile(ctx, filepath.Join(i.root, name), filepath.Join(dir, name)); err != nil {
				return fmt.Errorf("taking %s out of the jail: %w", name, err)
			}
		}
	}
	// Every restore maps the memory file and reads the state file, jailed
	// as a user of its own: they become the driver's, read-only for all
	// (the snapshot directory and the instance directories keep others
	// out), so no VM's user can change what the other restores read.
	for _, p := range []string{state, memory} {
		if err := os.Chown(p, os.Geteuid(), os.Getegid()); err != nil {
			return fmt.Errorf("owning the snapshot: %w", err)
		}
		if err := os.Chmod(p, 0o444); err != nil {
			return fmt.Errorf("owning the snapshot: %w", err)
		}
	}
	// The guest is paused: its scratch disk is as the saved memory knows
	// it (Firecracker writes through to the file, no cache of its own).
	if err := guest.CopySparse(ctx, filepath.Join(i.root, scratchImage), filepath.Join(dir, scratchImage)); err != nil {
		return fmt.Errorf("saving the scratch disk: %w", err)
	}
	for _, f := range []struct{ src, name string }{
		{i.images.kernel, kernelFile}, {i.images.root, rootImage}, {i.images.code, codeImage},
	} {
		if _, err := linkOrCopy(f.src, filepath.Join(dir, f.name)); err != nil {
			return fmt.Errorf("keeping %s: %w", f.name, err)
		}
	}
	meta := snapMeta{
		Format: snapFormat, Jailed: i.jail != nil,
		MemoryMB: i.spec.MemoryMB, EphemeralMB: i.spec.EphemeralMB, VCPUs: i.vcpus,
		Network: i.vnet != nil, Firecracker: i.d.opts.FirecrackerPath, Created: time.Now().UTC(),
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, snapMetaFile), b, 0o600)
}

// readSnapshot reads the snapshot in dir: ErrNotFound unless it is
// complete and of this driver's format.
func readSnapshot(dir string) (*snapSource, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("no snapshot in %s: %v: %w", dir, err, errdefs.ErrNotFound)
	}
	src := &snapSource{dir: abs}
	b, err := os.ReadFile(src.path(snapMetaFile))
	if err != nil {
		return nil, fmt.Errorf("no snapshot in %s: %w", dir, errdefs.ErrNotFound)
	}
	if err := json.Unmarshal(b, &src.meta); err != nil {
		return nil, fmt.Errorf("no complete snapshot in %s: reading %s: %v: %w", dir, snapMetaFile, err, errdefs.ErrNotFound)
	}
	if src.meta.Format != snapFormat {
		return nil, fmt.Errorf("no snapshot in %s: format %d, not %d: %w", dir, src.meta.Format, snapFormat, errdefs.ErrNotFound)
	}
	var missing []string
	for _, name := range snapFiles {
		if fi, err := os.Stat(src.path(name)); err != nil || !fi.Mode().IsRegular() {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("no complete snapshot in %s: %s missing: %w", dir, strings.Join(missing, ", "), errdefs.ErrNotFound)
	}
	return src, nil
}

// Restore starts spec.ID from the snapshot in dir; see
// driver.Snapshotter. A restored VM has a network if the snapshot's had
// one (Options.Network: a new namespace with the same tap and guest
// address); the driver takes no snapshots of VMs on operator-made taps.
func (d *Driver) Restore(ctx context.Context, spec driver.Spec, dir string) (driver.Instance, error) {
	src, err := readSnapshot(dir)
	if err != nil {
		return nil, fmt.Errorf("restoring %s: %w", spec.ID, err)
	}
	jailed := d.opts.JailerPath != ""
	switch {
	case src.meta.Jailed != jailed:
		return nil, errdefs.Invalid("restoring %s: the snapshot was taken with jailed %v, the driver runs with jailed %v", spec.ID, src.meta.Jailed, jailed)
	case src.meta.MemoryMB != spec.MemoryMB || src.meta.EphemeralMB != spec.EphemeralMB:
		return nil, errdefs.Invalid("restoring %s: the snapshot is of a vm of %d MB memory and %d MB /tmp, not %d and %d",
			spec.ID, src.meta.MemoryMB, src.meta.EphemeralMB, spec.MemoryMB, spec.EphemeralMB)
	case spec.Network && d.opts.TapName != "":
		return nil, errdefs.Invalid("restoring %s: restored vms have no network interface", spec.ID)
	case src.meta.Network && d.opts.Network == nil:
		return nil, errdefs.Invalid("restoring %s: the snapshot's vm had a network and the driver makes none (Options.Network)", spec.ID)
	}
	return d.host.StartFresh(ctx, spec, func(base *vmm.Instance) *instance {
		i := d.newInstance(base)
		i.from = src
		return i
	})
}

// restoredDisks puts the snapshot's images into the VM's root under the
// names the snapshot recorded, with a copy of its scratch disk (each
// restore writes its own) and, jailed, links to its state and memory
// files, which a jailed Firecracker reaches only in its chroot.
func (i *instance) restoredDisks(ctx context.Context, _ driver.Spec) (vmFiles, error) {
	src := i.from
	if err := os.MkdirAll(i.root, 0o700); err != nil {
		return vmFiles{}, fmt.Errorf("creating the vm's root: %w", err)
	}
	i.vcpus = src.meta.VCPUs
	if err := i.placeImages(hostImages{kernel: src.path(kernelFile), root: src.path(rootImage), code: src.path(codeImage)}); err != nil {
		return vmFiles{}, err
	}
	scratch := filepath.Join(i.root, scratchImage)
	if err := guest.CopySparse(ctx, src.path(scratchImage), scratch); err != nil {
		return vmFiles{}, fmt.Errorf("copying the snapshot's scratch disk: %w", err)
	}
	if err := i.ownScratch(scratch); err != nil {
		return vmFiles{}, err
	}
	f := i.files()
	f.state, f.memory = src.path(snapState), src.path(snapMemory)
	if i.jail == nil {
		return f, nil
	}
	for _, name := range []string{snapState, snapMemory} {
		copied, err := linkOrCopy(src.path(name), filepath.Join(i.root, name))
		if err != nil {
			return vmFiles{}, fmt.Errorf("putting %s into the jail: %w", name, err)
		}
		if copied {
			i.d.warnOnce(&i.d.warnedCopy, "images are copied into every jail: put the state, cache and snapshot directories on one file system so they can be hard links",
				"state_dir", i.d.opts.StateDir)
		}
	}
	f.state, f.memory = i.inRoot(snapState), i.inRoot(snapMemory)
	return f, nil
}

// resume loads the snapshot into the fresh Firecracker (after the logger
// and metrics, the only configuration a load may follow) and resumes the
// VM, then connects to the restored agent through the VM's own vsock
// socket. The agent is mid-session, waiting for a frame: no ready line
// comes (see docs/firecracker.md on the guest's side of a restore).
func (i *instance) resume(ctx context.Context, f vmFiles) error {
	load := snapshotLoad{
		SnapshotPath: f.state,
		MemBackend:   memoryBackend{BackendType: backendFile, BackendPath: f.memory},
		ResumeVM:     true,
	}
	// The logger and metrics are not part of a snapshot: they are the one
	// configuration a load may follow.
	if err := i.configureObservers(ctx); err != nil {
		if ctx.Err() != nil && !isAPIError(err) {
			return i.ReadyErr(ctx, "configuring the logger and metrics")
		}
		return i.WithOutput(fmt.Errorf("configuring the logger and metrics: %w", err))
	}
	// Firecracker exits right after it refuses a load, and ctx (see
	// vmm.Instance.ReadyContext) ends at that exit: the request must not
	// lose its answer, which says why, to that race. It needs no exit to
	// end it either: a dead Firecracker closes the socket. So it is bounded
	// by ctx's deadline only.
	loadCtx, cancel := context.WithoutCancel(ctx), context.CancelFunc(func() {})
	if dl, ok := ctx.Deadline(); ok {
		loadCtx, cancel = context.WithDeadline(loadCtx, dl)
	}
	err := i.api.loadSnapshot(loadCtx, load)
	cancel()
	if err != nil {
		if ctx.Err() != nil && !isAPIError(err) {
			return i.ReadyErr(ctx, "loading the snapshot")
		}
		// Firecracker exits after a failed load; WithOutput waits a
		// moment for its last words.
		return i.WithOutput(fmt.Errorf("loading the snapshot: %w", err))
	}
	return i.AttachAgent(ctx, "connecting to the restored agent", func(ctx context.Context) (net.Conn, error) {
		return connectGuest(ctx, filepath.Join(i.root, vsockSock), agentVsockPort)
	})
}

// moveFile renames src to dst, or copies it (sparse) and removes src
// when they are on different file systems.
func moveFile(ctx context.Context, src, dst string) error {
	err := os.Rename(src, dst)
	if err == nil || !isCrossDevice(err) {
		return err
	}
	if err := guest.CopySparse(ctx, src, dst); err != nil {
		return err
	}
	return os.Remove(src)
}
