package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

var _ driver.Snapshotter = (*Driver)(nil)

// A snapshot directory (see driver.Snapshotter) holds the VM's state as
// QEMU's migration stream, a copy of its scratch disk as it was, and hard
// links to the kernel, root and code images it ran (so that the image
// cache's pruning cannot take them), described by vm.json. QEMU 7.2 saves
// a 128 MB guest in tens of ms (stop, then migrate to a file descriptor
// handed over QMP) and restores it with the same command line plus
// "-incoming defer" and migrate-incoming from the inherited state file.
const (
	snapState    = "memory.state"
	snapScratch  = "scratch.img"
	snapKernel   = "vmlinux"
	snapRoot     = "root.ext4"
	snapCode     = "code.ext4"
	snapMetaFile = "vm.json"
	snapRAM      = "ram.img"
)

// snapSource is a snapshot a VM is restored from.
type snapSource struct {
	dir  string
	meta snapMeta
	// ram, if set, is the saved RAM as a sealed memfd (a spare template's,
	// see sealRAM), which restores map instead of dir's snapRAM.
	ram *os.File
}

// snapMeta is vm.json: the machine every restore must recreate exactly.
type snapMeta struct {
	Config vmConfig `json:"config"`
}

// snapshotTimeout bounds one save: the migration itself takes tens of ms;
// copying the scratch disk and linking the images take what the disk
// takes.
const snapshotTimeout = 2 * time.Minute

// Snapshot saves the idle VM id into dir and stops it; see
// driver.Snapshotter.
func (d *Driver) Snapshot(ctx context.Context, id, dir string) (err error) {
	i, ok := d.host.Get(id)
	if !ok {
		return fmt.Errorf("snapshot of vm %s: %w", id, errdefs.ErrNotFound)
	}
	defer func() {
		serr := d.host.Stop(context.WithoutCancel(ctx), id)
		if err != nil {
			_ = os.RemoveAll(dir)
		} else if serr != nil {
			err = serr
			_ = os.RemoveAll(dir)
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, snapshotTimeout)
	defer cancel()
	if err := i.snapshot(ctx, dir); err != nil {
		return fmt.Errorf("snapshot of vm %s: %w", id, err)
	}
	return nil
}

func (i *instance) snapshot(ctx context.Context, dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	q, err := dialQMP(ctx, filepath.Join(i.Dir(), qmpSock))
	if err != nil {
		return err
	}
	defer q.Close()
	if err := q.Stop(ctx); err != nil {
		return err
	}
	// The default bandwidth cap (128 MiB/s) would make a save take a
	// second; the stream goes to a local file.
	if err := q.Execute(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 40}, nil); err != nil {
		return err
	}
	if i.cfg.RAMFile {
		// RAM is in its file already: the stream carries device state only.
		if err := q.Execute(ctx, "migrate-set-capabilities", map[string]any{
			"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(filepath.Join(dir, snapState), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	err = q.GetFD(ctx, "snapshot", f)
	f.Close() // QEMU has its own copy
	if err != nil {
		return err
	}
	if err := q.Execute(ctx, "migrate", map[string]string{"uri": "fd:snapshot"}, nil); err != nil {
		return err
	}
	if err := q.AwaitMigration(ctx); err != nil {
		return err
	}
	// The guest is stopped: its scratch disk is as the saved memory knows it.
	if err := guest.CopySparse(ctx, i.launched.scratch, filepath.Join(dir, snapScratch)); err != nil {
		return fmt.Errorf("saving the scratch disk: %w", err)
	}
	links := [][2]string{{i.launched.kernel, snapKernel}, {i.launched.root, snapRoot}}
	if !i.cfg.Spare {
		// A spare's code disk is a placeholder (see codeFile).
		links = append(links, [2]string{i.launched.code, snapCode})
	}
	if i.cfg.RAMFile {
		// Restores map it privately (copy on write: the file is never
		// written again). QEMU 7.2 opens a private mapping's file for
		// writing (its readonly=on makes the guest's RAM read-only), so
		// the VMs' users need write permission on it: it is reachable
		// only through the descriptor the driver hands each restoring
		// QEMU (the directories above are the driver's, 0700), and a
		// guest that escaped into its QEMU could at worst spoil later
		// restores of its own version.
		ram := filepath.Join(i.Dir(), ramImage)
		if err := os.Chown(ram, 0, 0); err != nil && os.Geteuid() == 0 {
			return fmt.Errorf("taking the ram file back: %w", err)
		}
		if err := os.Chmod(ram, 0o666); err != nil {
			return err
		}
		links = append(links, [2]string{ram, snapRAM})
	}
	for _, l := range links {
		if err := linkOrCopy(ctx, l[0], filepath.Join(dir, l[1])); err != nil {
			return fmt.Errorf("keeping %s: %w", l[0], err)
		}
	}
	b, err := json.Marshal(snapMeta{Config: i.cfg})
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, snapMetaFile), b, 0o600)
}

// Restore starts spec.ID from the snapshot in dir; see driver.Snapshotter.
func (d *Driver) Restore(ctx context.Context, spec driver.Spec, dir string) (driver.Instance, error) {
	b, err := os.ReadFile(filepath.Join(dir, snapMetaFile))
	if err != nil {
		return nil, fmt.Errorf("restoring %s: no snapshot in %s: %w", spec.ID, dir, errdefs.ErrNotFound)
	}
	var src snapSource
	src.dir = dir
	if err := json.Unmarshal(b, &src.meta); err != nil {
		return nil, fmt.Errorf("restoring %s: reading %s: %v: %w", spec.ID, snapMetaFile, err, errdefs.ErrNotFound)
	}
	if src.meta.Config.MemoryMB != spec.MemoryMB {
		return nil, errdefs.Invalid("restoring %s: the snapshot is of a %d MB VM, not %d MB", spec.ID, src.meta.Config.MemoryMB, spec.MemoryMB)
	}
	return d.host.StartFresh(ctx, spec, func(base *vmm.Instance) *instance {
		i := d.newInstance(base)
		i.from = &src
		return i
	})
}

// bootRestored is Boot from a snapshot: the saved machine with a copy of
// the saved scratch disk, loaded from the state file before it runs. The
// agent socket is connected before the guest resumes, so the guest never
// sees its port without a host (its agent would take that as the end).
func (i *instance) bootRestored(ctx context.Context, spec driver.Spec) error {
	d, src := i.d, i.from
	rec := &record{Record: vmm.NewRecord(spec), QEMU: d.opts.QEMUPath, AgentSocket: agentSock, QMPSocket: qmpSock}
	rec.UID = i.uid
	i.rec = rec // a restored spare's, which Assign rewrites
	if err := i.Create(rec); err != nil {
		return err
	}
	t0 := time.Now()
	scratch := filepath.Join(i.Dir(), scratchImage)
	if err := guest.CopySparse(ctx, filepath.Join(src.dir, snapScratch), scratch); err != nil {
		return fmt.Errorf("copying the snapshot's scratch disk: %w", err)
	}
	if i.uid != 0 {
		if err := os.Chown(scratch, i.uid, i.uid); err != nil {
			return fmt.Errorf("handing the scratch image to the vm user: %w", err)
		}
	}
	disks := vmDisks{
		kernel: filepath.Join(src.dir, snapKernel), root: filepath.Join(src.dir, snapRoot),
		code: filepath.Join(src.dir, snapCode), scratch: scratch,
	}
	if src.meta.Config.Spare {
		disks.code = os.DevNull // a spare template's placeholder
	}
	state, err := os.Open(filepath.Join(src.dir, snapState))
	if err != nil {
		return fmt.Errorf("opening the snapshot: %w", err)
	}
	defer state.Close() // QEMU has its own copy
	cfg := src.meta.Config
	cfg.ID, cfg.Incoming = spec.ID, true
	if i.cacheMB > 0 {
		cfg.TCGCacheMB = i.cacheMB // not part of the saved machine
	}
	if cfg.Network && !cfg.Tap && i.d.opts.Network != nil {
		// Taken on QEMU's user-mode network, which reaches the host:
		// this driver isolates networks, so it boots instead.
		return fmt.Errorf("the snapshot's vm is on qemu's user-mode network and this driver isolates vm networks")
	}
	if cfg.Network && cfg.Tap {
		// Every VM's guest side is the same (network.GuestAddr): the
		// restored guest's configuration holds on a namespace of its own.
		if i.d.opts.Network == nil {
			return fmt.Errorf("the snapshot's vm had a tap network and this driver has no network manager")
		}
		if err := i.connect(ctx, &cfg); err != nil {
			return err
		}
	}
	var ram *os.File
	if cfg.RAMFile {
		if src.ram != nil {
			ram, err = dupFile(src.ram)
		} else {
			ram, err = os.Open(filepath.Join(src.dir, snapRAM))
		}
		if err != nil {
			return fmt.Errorf("opening the snapshot's ram: %w", err)
		}
		defer ram.Close()
		cfg.RAMCopy = true
	}
	launched := time.Now()
	if err := i.launch(cfg, disks, &rec.Record, state, ram); err != nil {
		return err
	}
	if err := i.Record(rec); err != nil {
		return err
	}
	rctx, cancel := i.ReadyContext(ctx, d.opts.ReadyTimeout)
	defer cancel()
	if err := i.AttachAgent(rctx, "connecting to the restored agent", func(ctx context.Context) (net.Conn, error) {
		return hostproc.DialUnix(ctx, filepath.Join(i.Dir(), agentSock))
	}); err != nil {
		return err
	}
	q, err := dialQMP(rctx, filepath.Join(i.Dir(), qmpSock))
	if err != nil {
		return i.restoreErr(rctx, err)
	}
	defer q.Close()
	if cfg.RAMFile {
		if err := q.Execute(rctx, "migrate-set-capabilities", map[string]any{
			"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}, nil); err != nil {
			return i.restoreErr(rctx, err)
		}
	}
	if err := q.Execute(rctx, "migrate-incoming", map[string]string{"uri": "fd:" + strconv.Itoa(fdState)}, nil); err != nil {
		return i.restoreErr(rctx, err)
	}
	if err := q.AwaitMigration(rctx); err != nil {
		return i.restoreErr(rctx, err)
	}
	if err := q.Cont(rctx); err != nil {
		return i.restoreErr(rctx, err)
	}
	i.Log().Debug("vm restored", "restore", time.Since(launched), "disks", launched.Sub(t0), "config", cfg.String())
	return nil
}

// restoreErr explains a failed step of a restore.
func (i *instance) restoreErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return i.ReadyErr(ctx, "restoring")
	}
	return i.WithOutput(fmt.Errorf("restoring: %w", err))
}

// linkOrCopy hard-links src at dst, or copies it when they are on
// different file systems.
func linkOrCopy(ctx context.Context, src, dst string) error {
	err := os.Link(src, dst)
	if errors.Is(err, syscall.EXDEV) {
		return guest.CopySparse(ctx, src, dst)
	}
	return err
}
