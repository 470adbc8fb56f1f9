package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/pool"
)

// SpareNice is the CPU priority (nice value) a spare VM boots and waits at
// until it is assigned: under CPU contention its boot takes only what
// the cold starts, invocations and INITs of the moment leave, rather
// than slowing the very cold start whose take started it. A host driver
// without CAP_SYS_NICE boots spares at normal priority.
const SpareNice = 19

// spareKey is what a spare shares with the instance it becomes: what its
// VM was booted with.
type spareKey struct {
	root        string
	memoryMB    int
	ephemeralMB int
	network     bool
}

// newSpares is the pool of spare VMs (see SpareMachine), as Lambda's
// worker keeps a pool of booted microVMs: a cold start that finds one of
// its shape takes it, and swapping in the code and handing it over costs
// a fraction of a boot. The pool keeps spares for the size shapes asked
// for last (pool.Config.Shapes), refilling after every take, one boot at
// a time. A spare holds what an idle VM holds; its directory says it is
// ready (SpareReadyFile) while it waits in the pool. Close destroys them;
// a crashed harness's are removed by Recover like any VM (each has a
// record).
func newSpares[M Machine](h *Host[M], size int) *pool.Pool[spareKey, M] {
	return pool.New[spareKey](pool.Config[M]{
		Size:   size,
		Prefix: sparePrefix,
		Kind:   "spare vm",
		Name:   func(m M) string { return m.instance().Name() },
		Destroy: func(ctx context.Context, m M) error {
			return m.instance().stop(ctx, 0)
		},
		OnIdle: func(m M) {
			if err := os.WriteFile(filepath.Join(m.instance().Dir(), SpareReadyFile), nil, 0o600); err != nil {
				h.cfg.Log.Warn("marking a spare vm ready", "err", err)
			}
		},
		OnTake: func(m M) { _ = os.Remove(filepath.Join(m.instance().Dir(), SpareReadyFile)) },
		Log:    h.cfg.Log,
	})
}

// spareKeyOf is spec's shape; ok is false when no spare can serve spec:
// spares are off, spec is to be snapshotted (its RAM must live in a file
// from the start), or its root image is not available (the boot then says
// why).
func (h *Host[M]) spareKeyOf(ctx context.Context, spec driver.Spec) (spareKey, bool) {
	if h.cfg.Spares <= 0 {
		return spareKey{}, false
	}
	return h.shapeOf(ctx, spec)
}

// shapeOf is spareKeyOf whether or not the pool keeps spares.
func (h *Host[M]) shapeOf(ctx context.Context, spec driver.Spec) (spareKey, bool) {
	if spec.ForSnapshot {
		return spareKey{}, false
	}
	rt := spec.Runtime
	root, err := h.cfg.Images.Root(ctx, &rt)
	if err != nil {
		return spareKey{}, false
	}
	return spareKey{root: root, memoryMB: spec.MemoryMB, ephemeralMB: spec.EphemeralMB, network: spec.Network}, true
}

// bootSpare boots a spare named name of tmpl's shape with a machine of
// newMachine, which must be a SpareMachine. On error the machine is gone.
func (h *Host[M]) bootSpare(ctx context.Context, name string, tmpl driver.Spec, newMachine func(*Instance) M) (M, error) {
	return h.bootAsSpare(ctx, name, tmpl, newMachine, false)
}

// BootTemplate boots, under the ID name, a VM of tmpl's shape the way a
// spare boots (SpareMachine.BootSpare, at SpareNice), for the driver to
// snapshot and stop: package qemu restores its spares from such a
// snapshot. Unlike a spare it is registered like an instance (Get finds
// it, Stop and Close stop it, Recover leaves it). On error the machine is
// gone.
func (h *Host[M]) BootTemplate(ctx context.Context, name string, tmpl driver.Spec, newMachine func(*Instance) M) (M, error) {
	return h.bootAsSpare(ctx, name, tmpl, newMachine, true)
}

func (h *Host[M]) bootAsSpare(ctx context.Context, name string, tmpl driver.Spec, newMachine func(*Instance) M, register bool) (M, error) {
	var none M
	spec := tmpl
	spec.ID, spec.Function, spec.RevisionID, spec.CodeDir, spec.RuntimeDir = name, "", "", "", ""
	inst, err := h.newInstance(ctx, spec)
	if err != nil {
		return none, err
	}
	inst.spare = true
	m := newMachine(inst)
	inst.m = m
	sm, ok := any(m).(SpareMachine)
	if !ok {
		inst.cancelStart()
		h.releaseSlot(inst.slot)
		return none, fmt.Errorf("%s vms cannot be spares: %w", h.cfg.Name, errdefs.ErrUnavailable)
	}
	if register {
		if err := h.instances.Add(name, m); err != nil {
			inst.cancelStart()
			h.releaseSlot(inst.slot)
			return none, fmt.Errorf("booting vm %s: %w", name, err)
		}
	}
	err = sm.BootSpare(inst.startCtx, spec)
	inst.cancelStart()
	close(inst.started)
	if err != nil {
		if cerr := inst.stop(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return none, fmt.Errorf("booting spare vm %s: %w", name, err)
	}
	return m, nil
}

// ShapeKey names what a spare of spec's shape is booted with (its root
// image, memory, /tmp size and network: a spare serves only specs with
// the same); ok is false when no spare could serve spec (spec is to be
// snapshotted, or its root image is not available), whether or not the
// pool keeps spares.
func (h *Host[M]) ShapeKey(ctx context.Context, spec driver.Spec) (key string, ok bool) {
	k, ok := h.shapeOf(ctx, spec)
	if !ok {
		return "", false
	}
	return fmt.Sprintf("%s|%d|%d|%t", k.root, k.memoryMB, k.ephemeralMB, k.network), true
}

// fromSpare makes a spare of the pool the instance of spec, if the pool
// has one of its shape; ok is false when it has none or spec's code does
// not fit one (Start then boots a VM). An error is the instance's: the
// spare was fine but spec cannot start (its ID runs, its code image
// cannot be built, the caller gave up), and the spare is given back.
func (h *Host[M]) fromSpare(ctx context.Context, spec driver.Spec, newMachine func(*Instance) M) (driver.Instance, bool, error) {
	key, ok := h.spareKeyOf(ctx, spec)
	if !ok {
		return nil, false, nil
	}
	m, ok := h.spares.Take(key, func(ctx context.Context, name string) (M, error) {
		return h.bootSpare(ctx, name, spec, newMachine)
	})
	if !ok {
		return nil, false, nil
	}
	codeKey, err := CodeKey(spec)
	var code string
	if err == nil {
		code, err = h.cfg.Images.Code(ctx, spec.CodeDir, spec.RuntimeDir, codeKey)
		if err != nil {
			err = fmt.Errorf("code image: %w", err)
		}
	}
	if err != nil {
		h.spares.Put(key, m)
		return nil, true, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	if fi, err := os.Stat(code); err != nil || fi.Size() > SpareCodeBytes {
		h.spares.Put(key, m)
		return nil, false, nil
	}
	i := m.instance()
	// From now on the VM serves a cold start: normal priority.
	if err := hostproc.Renice(i.PID(), 0); err != nil {
		i.log.Debug("raising the spare's priority", "err", err)
	}
	startCtx, cancel := context.WithCancel(ctx)
	i.started, i.cancelStart = make(chan struct{}), cancel
	i.id = spec.ID
	i.log = h.cfg.Log.With("instance", spec.ID, "function", spec.Function)
	if err := h.instances.Add(spec.ID, m); err != nil {
		cancel()
		close(i.started)
		i.id = i.name
		h.spares.Put(key, m)
		return nil, true, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	err = startCtx.Err()
	if err == nil {
		err = any(m).(SpareMachine).Assign(startCtx, spec, code)
	}
	cancel()
	close(i.started)
	if err != nil {
		if cerr := i.stop(context.WithoutCancel(ctx), 0); cerr != nil {
			err = errors.Join(err, cerr)
		}
		if ctx.Err() != nil {
			return nil, true, fmt.Errorf("starting vm %s from a spare: %w", spec.ID, err)
		}
		h.cfg.Log.Warn("assigning a spare vm failed; booting one", "instance", spec.ID, "spare", i.name, "err", err)
		return nil, false, nil
	}
	return m, true, nil
}
