package harness

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

// pool holds one function's instances, across its revisions.
//
// Lock order: Harness.mu, then pool.mu, then Harness.capMu. No lock is held
// during Driver calls, code extraction or protocol I/O.
type pool struct {
	name string

	mu sync.Mutex
	// dead reports that the pool was removed from Harness.pools; a caller
	// that finds it dead looks the pool up again.
	dead      bool
	revisions map[string]*revision
	instances map[string]*instance // every instance not gone
	counts    [StateGone + 1]int   // instances by state
	// latest is the $LATEST revision most recently invoked or prepared;
	// the reaper keeps it (and its unpacked code) even when it has no
	// instances. Published versions never take its place.
	latest string
}

// revisionLocked returns cfg's revision of the pool, registering it if
// new, and makes it the latest when cfg is $LATEST. p.mu is held.
func (p *pool) revisionLocked(cfg *function.Config) *revision {
	rev := p.revisions[cfg.RevisionID]
	if rev == nil {
		rev = &revision{id: cfg.RevisionID}
		p.revisions[cfg.RevisionID] = rev
	}
	if cfg.Version == "" || cfg.Version == function.LatestVersion {
		p.latest = cfg.RevisionID
	}
	return rev
}

// revision is one code+configuration revision the pool serves.
type revision struct {
	id string
	// codeKey is the code this revision pins in the code cache ("" until
	// its first cold start unpacked it).
	codeKey string
	// idle is a stack: the most recently used instance is last and is
	// taken first, so few instances stay warm and the rest age out.
	idle []*instance
}

func newPool(name string) *pool {
	return &pool{name: name, revisions: map[string]*revision{}, instances: map[string]*instance{}}
}

// move changes i's state, keeping counts and idle stacks in step. p.mu held.
func (p *pool) move(i *instance, to State) error {
	from := i.state
	if err := transition(from, to); err != nil {
		return fmt.Errorf("instance %s of %s: %w", i.id, p.name, err)
	}
	if to == StateIdle {
		rev := p.revisions[i.revision]
		if rev == nil {
			return fmt.Errorf("instance %s of %s: revision %s is retired: %w", i.id, p.name, i.revision, errIllegalTransition)
		}
		rev.idle = append(rev.idle, i)
	}
	if from == StateIdle {
		p.removeIdle(i)
	}
	p.counts[from]--
	p.counts[to]++
	i.state = to
	if to == StateGone {
		delete(p.instances, i.id)
	}
	return nil
}

func (p *pool) removeIdle(i *instance) {
	rev := p.revisions[i.revision]
	if rev == nil {
		return
	}
	for k := len(rev.idle) - 1; k >= 0; k-- {
		if rev.idle[k] == i {
			rev.idle = append(rev.idle[:k], rev.idle[k+1:]...)
			rev.idle = rev.idle[:len(rev.idle):len(rev.idle)]
			return
		}
	}
}

// add registers a new starting instance. p.mu held.
func (p *pool) add(i *instance) {
	p.instances[i.id] = i
	p.counts[StateStarting]++
}

// pinCode makes revision hold a reference on its unpacked code, once.
func (p *pool) pinCode(revisionID, key string, code *codeCache) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if rev := p.revisions[revisionID]; rev != nil && rev.codeKey == "" {
		rev.codeKey = key
		code.retain(key)
	}
}

// active is the number of instances counting against the function's
// concurrency: those running or about to run an invocation. p.mu held.
func (p *pool) active() int { return p.counts[StateStarting] + p.counts[StateBusy] }

// poolFor returns the function's pool, creating it.
func (h *Harness) poolFor(name string) *pool {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.pools[name]
	if p == nil {
		p = newPool(name)
		h.pools[name] = p
	}
	return p
}

// maybeDropPool forgets a pool that has neither instances nor revisions.
func (h *Harness) maybeDropPool(p *pool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.instances) == 0 && len(p.revisions) == 0 && !p.dead && h.pools[p.name] == p {
		p.dead = true
		delete(h.pools, p.name)
	}
}

// acquire returns a busy instance of the request's revision (warm) or a
// new starting one (cold) that holds a host slot. It never waits: when the
// function's cap or the host's is reached it returns a throttle.
func (h *Harness) acquire(req *InvokeRequest) (i *instance, cold bool, err error) {
	fn := req.Function
	for {
		p := h.poolFor(fn.Name)
		p.mu.Lock()
		if p.dead {
			p.mu.Unlock()
			continue
		}
		rev := p.revisionLocked(fn)
		if n := len(rev.idle); n > 0 {
			i = rev.idle[n-1]
			err = p.move(i, StateBusy)
			p.mu.Unlock()
			if err != nil {
				return nil, false, err
			}
			return i, false, nil
		}
		limit, reason := h.cfg.DefaultConcurrency, errdefs.ReasonConcurrentInvocationLimit
		if fn.ReservedConcurrency != nil {
			limit, reason = *fn.ReservedConcurrency, errdefs.ReasonReservedFunctionConcurrency
		}
		if p.active() >= limit {
			p.mu.Unlock()
			h.stats.throttles.Add(1)
			return nil, false, errdefs.Throttled(reason, "Rate Exceeded.")
		}
		i = newInstance(p, fn.RevisionID, fn.MemorySize)
		p.add(i)
		h.live.Add(1)
		p.mu.Unlock()

		if err := h.reserveHost(i); err != nil {
			h.abandon(i, "host full")
			h.stats.throttles.Add(1)
			return nil, false, err
		}
		return i, true, nil
	}
}

// reserveHost takes a host slot for i (instance count and memory), evicting
// the host's least recently used idle instances to make room. Lambda's
// placement would send the request to another host; with one host the
// caller is throttled.
func (h *Harness) reserveHost(i *instance) error {
	for {
		h.capMu.Lock()
		if h.hostInstances < h.cfg.MaxInstances && h.hostMemoryMB+i.memoryMB <= h.cfg.MaxMemoryMB {
			h.hostInstances++
			h.hostMemoryMB += i.memoryMB
			i.hostReserved = true
			h.capMu.Unlock()
			return nil
		}
		h.capMu.Unlock()
		if !h.evictOne() {
			return errdefs.Throttled(errdefs.ReasonConcurrentInvocationLimit, "Rate Exceeded.")
		}
	}
}

func (h *Harness) releaseHost(i *instance) {
	if !i.hostReserved {
		return
	}
	h.capMu.Lock()
	h.hostInstances--
	h.hostMemoryMB -= i.memoryMB
	i.hostReserved = false
	h.capMu.Unlock()
}

// evictOne stops the host's least recently used idle instance and waits
// until it is gone. It reports false when no instance is idle.
func (h *Harness) evictOne() bool {
	for {
		var victim *instance
		for _, p := range h.poolList() {
			p.mu.Lock()
			for _, rev := range p.revisions {
				if len(rev.idle) > 0 {
					c := rev.idle[0]
					if victim == nil || c.lastUsed.Before(victim.lastUsed) {
						victim = c
					}
				}
			}
			p.mu.Unlock()
		}
		if victim == nil {
			return false
		}
		p := victim.pool
		p.mu.Lock()
		if victim.state != StateIdle {
			// Taken meanwhile; look again.
			p.mu.Unlock()
			continue
		}
		err := p.move(victim, StateStopping)
		p.mu.Unlock()
		if err != nil {
			return false
		}
		h.stats.evictions.Add(1)
		h.teardown(victim, "evicted", true)
		return true
	}
}

// poolList snapshots the pools.
func (h *Harness) poolList() []*pool {
	h.mu.Lock()
	defer h.mu.Unlock()
	ps := make([]*pool, 0, len(h.pools))
	for _, p := range h.pools {
		ps = append(ps, p)
	}
	return ps
}

// release ends an instance's turn: back to the idle stack if keep allows,
// else it is destroyed in the background. It reports whether the instance
// went back to the pool.
func (h *Harness) release(i *instance, keep bool, reason string) bool {
	p := i.pool
	p.mu.Lock()
	switch {
	case !keep:
	case h.bgCtx.Err() != nil:
		reason = "harness closing"
	case i.retire:
		reason = "retired"
	default:
		i.lastUsed = h.now()
		if err := p.move(i, StateIdle); err == nil {
			p.mu.Unlock()
			return true
		}
		// The revision was retired while the instance was busy.
		reason = "retired"
	}
	err := p.move(i, StateStopping)
	p.mu.Unlock()
	if err == nil {
		go h.teardown(i, reason, keep)
	}
	return false
}

// destroy stops an instance that is starting or busy in the background.
func (h *Harness) destroy(i *instance, reason string, graceful bool) {
	p := i.pool
	p.mu.Lock()
	err := p.move(i, StateStopping)
	p.mu.Unlock()
	if err == nil {
		go h.teardown(i, reason, graceful)
	}
}

// abandon forgets a starting instance that has no sandbox (the driver was
// never called or its Start failed and cleaned up after itself).
func (h *Harness) abandon(i *instance, reason string) {
	p := i.pool
	p.mu.Lock()
	err := p.move(i, StateStopping)
	p.mu.Unlock()
	if err == nil {
		h.teardown(i, reason, false)
	}
}

// teardown destroys an instance in state stopping: asks its agent to shut
// down when graceful, stops the sandbox through the driver, returns its
// host slot and code, and marks it gone. It runs to completion whatever
// the caller's context, bounded by stopTimeout.
func (h *Harness) teardown(i *instance, reason string, graceful bool) {
	var stopErr error
	if i.drv != nil {
		if graceful {
			i.shutdown()
		}
		close(i.closed)
		_ = i.conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		stopErr = h.cfg.Driver.Stop(ctx, i.id)
		cancel()
	} else {
		close(i.closed)
	}
	h.releaseHost(i)
	if i.codeKey != "" {
		h.code.release(i.codeKey)
	}
	p := i.pool
	p.mu.Lock()
	moveErr := p.move(i, StateGone)
	p.mu.Unlock()
	close(i.gone)
	h.live.Done()
	h.stats.stops.Add(1)

	if i.drv != nil {
		attrs := []any{"function", i.function, "revision", i.revision, "instance", i.id, "reason", reason}
		if err := errors.Join(stopErr, moveErr); err != nil {
			h.log.Error("instance stopped", append(attrs, "error", err)...)
		} else {
			h.log.Info("instance stopped", attrs...)
		}
	}
	h.maybeDropPool(p)
}

// Retire stops the function's instances whose revision is not
// keepRevision ("" retires all): idle ones now, starting and busy ones when
// their work ends. Retired revisions stop pinning their code. It waits for
// the idle ones to be gone, bounded by ctx and the driver's stop timeout.
func (h *Harness) Retire(ctx context.Context, fn, keepRevision string) error {
	return h.retireWhere(ctx, fn, func(rev string) bool { return keepRevision == "" || rev != keepRevision })
}

// RetireRevisions implements the control plane's RevisionRetirer: it
// retires only the named revisions of fn (a published version that was
// deleted, or the $LATEST revision an update replaced), so the instances
// of every other version stay warm. Unknown revisions are ignored.
func (h *Harness) RetireRevisions(ctx context.Context, fn string, revisions []string) error {
	set := make(map[string]bool, len(revisions))
	for _, r := range revisions {
		set[r] = true
	}
	return h.retireWhere(ctx, fn, func(rev string) bool { return set[rev] })
}

// retireWhere stops fn's instances whose revision retire selects (idle
// ones now, busy and starting ones when they finish) and drops what was
// prepared for those revisions.
func (h *Harness) retireWhere(ctx context.Context, fn string, retire func(revision string) bool) error {
	h.mu.Lock()
	p := h.pools[fn]
	h.mu.Unlock()
	if p == nil {
		// No instance, but maybe a snapshot taken for a version.
		h.removeSnapshots(h.snaps.drop(fn, retire))
		return nil
	}
	var stop []*instance
	var unpin []string
	p.mu.Lock()
	for _, i := range p.instances {
		if !retire(i.revision) {
			continue
		}
		switch i.state {
		case StateIdle:
			if p.move(i, StateStopping) == nil {
				stop = append(stop, i)
			}
		case StateStarting, StateBusy:
			i.retire = true
		}
	}
	for id, rev := range p.revisions {
		if !retire(id) {
			continue
		}
		delete(p.revisions, id)
		if rev.codeKey != "" {
			unpin = append(unpin, rev.codeKey)
		}
	}
	p.mu.Unlock()
	for _, key := range unpin {
		h.code.release(key)
	}
	h.removeSnapshots(h.snaps.drop(fn, retire))
	h.stopAll(ctx, stop, "retired")
	h.maybeDropPool(p)
	return ctx.Err()
}

// stopAll tears the instances (already stopping) down concurrently and
// waits until they are gone or ctx is done; teardown goes on regardless.
func (h *Harness) stopAll(ctx context.Context, insts []*instance, reason string) {
	if len(insts) == 0 {
		return
	}
	var wg sync.WaitGroup
	for _, i := range insts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.teardown(i, reason, true)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// reap stops instances idle for longer than KeepAlive and forgets revisions
// other than the latest that have no instance left.
func (h *Harness) reap() {
	cutoff := h.now().Add(-h.cfg.KeepAlive)
	var stop []*instance
	var unpin []string
	for _, p := range h.poolList() {
		p.mu.Lock()
		inUse := map[string]bool{}
		for _, i := range p.instances {
			inUse[i.revision] = true
		}
		for id, rev := range p.revisions {
			// The stack is ordered by last use: the oldest are at the bottom.
			for len(rev.idle) > 0 && rev.idle[0].lastUsed.Before(cutoff) {
				i := rev.idle[0]
				if p.move(i, StateStopping) != nil {
					break
				}
				stop = append(stop, i)
			}
			if id != p.latest && !inUse[id] {
				delete(p.revisions, id)
				if rev.codeKey != "" {
					unpin = append(unpin, rev.codeKey)
				}
			}
		}
		p.mu.Unlock()
	}
	for _, key := range unpin {
		h.code.release(key)
	}
	h.stopAll(context.Background(), stop, "idle")
}

// reaper runs reap every min(KeepAlive/4, 30s) until stop is closed.
func (h *Harness) reaper(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	every := h.cfg.KeepAlive / 4
	if every > 30*time.Second {
		every = 30 * time.Second
	}
	if every < time.Millisecond {
		every = time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			h.reap()
		}
	}
}
