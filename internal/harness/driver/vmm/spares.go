package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// SpareNice is the CPU priority (nice value) a spare VM boots and waits at
// until it is assigned: under CPU contention its boot takes only what
// the cold starts, invocations and INITs of the moment leave, rather
// than slowing the very cold start whose take started it. A host driver
// without CAP_SYS_NICE boots spares at normal priority.
const SpareNice = 19

// spareRetry is how long the pool waits after a spare failed to boot.
const spareRetry = time.Second

// spareKey is what a spare shares with the instance it becomes: what its
// VM was booted with.
type spareKey struct {
	root        string
	memoryMB    int
	ephemeralMB int
	network     bool
}

// spareShape is a shape of VM cold starts asked for recently, and a spec
// to boot spares of it from.
type spareShape struct {
	key  spareKey
	spec driver.Spec
}

// spares keeps up to size spare VMs booted ahead of need (see
// SpareMachine), as Lambda's worker keeps a pool of booted microVMs: a
// cold start that finds one of its shape takes it, and swapping in the
// code and handing it over costs a fraction of a boot.
//
// The pool learns shapes from cold starts: it keeps spares for the size
// shapes asked for last, the most recent first, size/shapes each (at least
// one), and refills after every take, one boot at a time. A spare holds
// what an idle VM holds. close destroys them; a crashed harness's are
// removed by Recover like any VM (each has a record). Safe for concurrent
// use.
type spares[M Machine] struct {
	h    *Host[M]
	size int

	mu         sync.Mutex
	newMachine func(*Instance) M // the driver's, from the first take
	shapes     []spareShape      // most recent first, at most size
	idle       map[spareKey][]M
	booting    string // name of the spare being booted, "" if none
	running    bool   // fill loop started
	closed     bool

	kick chan struct{} // buffered(1): wake the fill loop
	done chan struct{} // closed when the fill loop has returned
	// ctx is cancelled by close: it stops the fill loop and a boot in
	// flight.
	ctx    context.Context
	cancel context.CancelFunc
	// discards are the stops of spares no longer wanted; close waits.
	discards sync.WaitGroup
}

func newSpares[M Machine](h *Host[M], size int) *spares[M] {
	ctx, cancel := context.WithCancel(context.Background())
	return &spares[M]{
		h: h, size: size, idle: map[spareKey][]M{},
		kick: make(chan struct{}, 1), done: make(chan struct{}),
		ctx: ctx, cancel: cancel,
	}
}

// keyOf is spec's shape; ok is false when no spare can serve spec: spares
// are off, spec is to be snapshotted (its RAM must live in a file from the
// start), or its root image is not available (the boot then says why).
func (p *spares[M]) keyOf(ctx context.Context, spec driver.Spec) (spareKey, bool) {
	if p.size <= 0 || spec.ForSnapshot {
		return spareKey{}, false
	}
	rt := spec.Runtime
	root, err := p.h.cfg.Images.Root(ctx, &rt)
	if err != nil {
		return spareKey{}, false
	}
	return spareKey{root: root, memoryMB: spec.MemoryMB, ephemeralMB: spec.EphemeralMB, network: spec.Network}, true
}

// take returns an idle spare of key, if any, and has the pool refilled
// with spec's shape first.
func (p *spares[M]) take(key spareKey, spec driver.Spec, newMachine func(*Instance) M) (M, bool) {
	var none M
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return none, false
	}
	if p.newMachine == nil {
		p.newMachine = newMachine
	}
	p.want(key, spec)
	if !p.running {
		p.running = true
		go p.fill()
	}
	p.wake()
	list := p.idle[key]
	if len(list) == 0 {
		return none, false
	}
	m := list[len(list)-1]
	p.idle[key] = list[:len(list)-1]
	_ = os.Remove(filepath.Join(m.instance().Dir(), SpareReadyFile))
	return m, true
}

// put gives back a spare that take returned but that could not be used
// for a reason of the instance's (its code image), not the spare's.
func (p *spares[M]) put(key spareKey, m M) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || p.quota(key) <= len(p.idle[key]) {
		p.discard(m)
		return
	}
	p.add(key, m)
}

// add puts m into the pool and marks its directory ready (SpareReadyFile,
// for SparePIDs). Called with mu held, so a take, which removes the mark,
// cannot come first.
func (p *spares[M]) add(key spareKey, m M) {
	p.idle[key] = append(p.idle[key], m)
	if err := os.WriteFile(filepath.Join(m.instance().Dir(), SpareReadyFile), nil, 0o600); err != nil {
		p.h.cfg.Log.Warn("marking a spare vm ready", "err", err)
	}
}

// want makes key the most recent shape and drops the spares of shapes
// that fell out. Called with mu held.
func (p *spares[M]) want(key spareKey, spec driver.Spec) {
	shapes := []spareShape{{key: key, spec: spec}}
	for _, s := range p.shapes {
		if s.key != key {
			shapes = append(shapes, s)
		}
	}
	for _, s := range shapes[min(len(shapes), p.size):] {
		for _, m := range p.idle[s.key] {
			p.discard(m)
		}
		delete(p.idle, s.key)
	}
	p.shapes = shapes[:min(len(shapes), p.size)]
	for k, list := range p.idle { // a shape's share shrinks as shapes are added
		for q := p.quota(k); len(list) > q; list = list[:len(list)-1] {
			p.discard(list[len(list)-1])
		}
		p.idle[k] = list
	}
}

// quota is how many spares of key the pool keeps: size shared among the
// wanted shapes, the most recent ones taking the remainder. Called with mu
// held.
func (p *spares[M]) quota(key spareKey) int {
	for i, s := range p.shapes {
		if s.key == key {
			q := p.size / len(p.shapes)
			if i < p.size%len(p.shapes) {
				q++
			}
			return q
		}
	}
	return 0
}

// discard stops a spare in the background. Called with mu held.
func (p *spares[M]) discard(m M) {
	p.discards.Add(1)
	go func() {
		defer p.discards.Done()
		_ = m.instance().stop(context.Background(), 0)
	}()
}

func (p *spares[M]) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// next picks the shape to boot a spare of (the most recent one short of
// its quota) and names the spare; ok is false when none is short.
func (p *spares[M]) next() (shape spareShape, name string, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return spareShape{}, "", false
	}
	for _, s := range p.shapes {
		if len(p.idle[s.key]) < p.quota(s.key) {
			p.booting = spareName()
			return s, p.booting, true
		}
	}
	return spareShape{}, "", false
}

// fill boots spares until every wanted shape has its quota, each time it
// is woken, until close.
func (p *spares[M]) fill() {
	defer close(p.done)
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.kick:
		}
		for {
			shape, name, ok := p.next()
			if !ok {
				break
			}
			m, err := p.h.bootSpare(p.ctx, name, shape.spec, p.newMachine)
			p.mu.Lock()
			p.booting = ""
			switch {
			case err != nil:
			case p.closed || len(p.idle[shape.key]) >= p.quota(shape.key):
				p.discard(m) // the shape fell out while it booted
			default:
				p.add(shape.key, m)
			}
			p.mu.Unlock()
			if err != nil {
				if p.ctx.Err() != nil {
					return
				}
				p.h.cfg.Log.Warn("booting a spare vm failed", "err", err)
				select {
				case <-p.ctx.Done():
					return
				case <-time.After(spareRetry):
				}
			}
		}
	}
}

// owns reports whether name is the directory of one of the pool's spares,
// idle or booting (Recover leaves those alone).
func (p *spares[M]) owns(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if name == p.booting && name != "" {
		return true
	}
	for _, list := range p.idle {
		for _, m := range list {
			if m.instance().Name() == name {
				return true
			}
		}
	}
	return false
}

// close stops the fill loop (aborting a boot in flight) and destroys every
// spare. Idempotent.
func (p *spares[M]) close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var idle []M
	for _, list := range p.idle {
		idle = append(idle, list...)
	}
	p.idle = nil
	running := p.running
	p.mu.Unlock()
	p.cancel()
	if running {
		<-p.done
	}
	p.discards.Wait()
	var errs []error
	for _, m := range idle {
		errs = append(errs, m.instance().stop(ctx, 0))
	}
	return errors.Join(errs...)
}

// bootSpare boots a spare named name of tmpl's shape with a machine of
// newMachine, which must be a SpareMachine. On error the machine is gone.
func (h *Host[M]) bootSpare(ctx context.Context, name string, tmpl driver.Spec, newMachine func(*Instance) M) (M, error) {
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
	err = sm.BootSpare(ctx, spec)
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

// fromSpare makes a spare of the pool the instance of spec, if the pool
// has one of its shape; ok is false when it has none or spec's code does
// not fit one (Start then boots a VM). An error is the instance's: the
// spare was fine but spec cannot start (its ID runs, its code image
// cannot be built, the caller gave up), and the spare is given back.
func (h *Host[M]) fromSpare(ctx context.Context, spec driver.Spec, newMachine func(*Instance) M) (driver.Instance, bool, error) {
	key, ok := h.spares.keyOf(ctx, spec)
	if !ok {
		return nil, false, nil
	}
	m, ok := h.spares.take(key, spec, newMachine)
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
		h.spares.put(key, m)
		return nil, true, fmt.Errorf("starting vm %s: %w", spec.ID, err)
	}
	if fi, err := os.Stat(code); err != nil || fi.Size() > SpareCodeBytes {
		h.spares.put(key, m)
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
		h.spares.put(key, m)
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
