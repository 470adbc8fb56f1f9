// Package pool keeps sandboxes started ahead of need, so that a cold start
// takes one instead of waiting for it: the process driver's warm sandboxes
// and the VM drivers' spare VMs are both a Pool.
//
// A pool learns what to start from the cold starts themselves. Each Take
// names a shape (what an item must have been started with to serve it:
// the network mode, the root image and memory size...) and how to start
// one; the pool keeps items for the shapes taken last, the most recent
// first, and starts them one at a time in the background until every shape
// has its share. Nothing is started before the first Take.
package pool

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"log/slog"
	"sync"
	"time"
)

// StartFunc starts an item named name of the shape it was given with. It
// must honour ctx: Close cancels it to abort a start in flight. On error
// nothing of the item may be left.
type StartFunc[T any] func(ctx context.Context, name string) (T, error)

// Config says what a Pool keeps and how it handles its items.
type Config[T any] struct {
	// Size is how many idle items the pool keeps in all; 0 or less turns
	// the pool off (Take never returns an item and starts nothing).
	Size int
	// Shapes is how many shapes the pool keeps items for, the most
	// recently taken ones; Size is shared among them, the more recent
	// ones taking the remainder. 0 means Size.
	Shapes int
	// Prefix begins the name of every item the pool starts, followed by
	// 16 random hex digits.
	Prefix string
	// Kind names an item in log messages ("warm sandbox", "spare vm").
	Kind string
	// Name returns the name an item was started with.
	Name func(T) string
	// Destroy removes an item the pool no longer wants. The pool calls it
	// outside its lock, in a goroutine of its own (Close: in the caller's).
	Destroy func(ctx context.Context, item T) error
	// Usable, if set, reports whether an idle item can still serve (its
	// process has not died while it waited); Take destroys one that
	// cannot. Called with the pool's lock held: it must not block.
	Usable func(T) bool
	// OnIdle and OnTake, if set, are called with the pool's lock held when
	// an item joins the idle set and when Take hands it out, so that
	// outside observers can tell idle items (see vmm.SpareReadyFile).
	OnIdle, OnTake func(T)
	// Retry is how long the pool waits after a failed start before it
	// starts again (default one second).
	Retry time.Duration
	Log   *slog.Logger
}

// shape is a shape asked for recently and how to start items of it.
type shape[K comparable, T any] struct {
	key   K
	start StartFunc[T]
}

// Pool keeps up to Config.Size idle items of type T for shapes of type K.
// Safe for concurrent use. Close stops it and destroys what it holds.
type Pool[K comparable, T any] struct {
	cfg Config[T]

	mu       sync.Mutex
	shapes   []shape[K, T] // most recent first, at most cfg.Shapes
	idle     map[K][]T
	starting string // name of the item being started, "" if none
	running  bool   // fill loop started
	closed   bool

	kick chan struct{} // buffered(1): wake the fill loop
	done chan struct{} // closed when the fill loop has returned
	// ctx is cancelled by Close: it stops the fill loop and a start in
	// flight.
	ctx    context.Context
	cancel context.CancelFunc
	// discards are the destroys of items no longer wanted; Close waits.
	discards sync.WaitGroup
}

// New returns an empty pool; it starts filling at the first Take.
func New[K comparable, T any](cfg Config[T]) *Pool[K, T] {
	if cfg.Shapes <= 0 {
		cfg.Shapes = cfg.Size
	}
	if cfg.Retry <= 0 {
		cfg.Retry = time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool[K, T]{
		cfg: cfg, idle: map[K][]T{},
		kick: make(chan struct{}, 1), done: make(chan struct{}),
		ctx: ctx, cancel: cancel,
	}
}

// Take returns an idle item of shape key, if the pool has one (the most
// recently started: it has waited least), and makes key the most recent
// shape, to be started with start: the pool refills after every take. Items of shapes that fall out of the pool's Shapes
// are destroyed.
func (p *Pool[K, T]) Take(key K, start StartFunc[T]) (T, bool) {
	var none T
	if p.cfg.Size <= 0 {
		return none, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return none, false
	}
	p.want(key, start)
	if !p.running {
		p.running = true
		go p.fill()
	}
	p.wake()
	for list := p.idle[key]; len(list) > 0; list = p.idle[key] {
		item := list[len(list)-1]
		p.idle[key] = list[:len(list)-1]
		if p.cfg.Usable != nil && !p.cfg.Usable(item) {
			p.discard(item, "it exited while it waited")
			continue
		}
		if p.cfg.OnTake != nil {
			p.cfg.OnTake(item)
		}
		return item, true
	}
	return none, false
}

// Put gives back an item that Take returned but that could not be used
// for a reason of the caller's, not the item's; the pool keeps it if its
// shape is still short of items, and destroys it otherwise (after Close,
// before Put returns).
func (p *Pool[K, T]) Put(key K, item T) {
	p.mu.Lock()
	if p.closed {
		// Close may be waiting for the discards already: this one is the
		// caller's to finish.
		p.mu.Unlock()
		if err := p.cfg.Destroy(context.Background(), item); err != nil {
			p.cfg.Log.Warn("removing a "+p.cfg.Kind, "instance", p.cfg.Name(item), "why", "put back after close", "err", err)
		}
		return
	}
	defer p.mu.Unlock()
	if p.quota(key) <= len(p.idle[key]) {
		p.discard(item, "not wanted back")
		return
	}
	p.add(key, item)
}

// Idle returns the idle items, of every shape.
func (p *Pool[K, T]) Idle() []T {
	p.mu.Lock()
	defer p.mu.Unlock()
	var all []T
	for _, list := range p.idle {
		all = append(all, list...)
	}
	return all
}

// Owns reports whether name is an item of the pool, idle or being
// started (a driver's Recover leaves those alone).
func (p *Pool[K, T]) Owns(name string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if name == p.starting && name != "" {
		return true
	}
	for _, list := range p.idle {
		for _, item := range list {
			if p.cfg.Name(item) == name {
				return true
			}
		}
	}
	return false
}

// Close stops refilling (aborting a start in flight), waits for the
// destroys under way and destroys every idle item with ctx; Take returns
// nothing afterwards. Idempotent: a second call returns nil at once.
func (p *Pool[K, T]) Close(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	var idle []T
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
	for _, item := range idle {
		errs = append(errs, p.cfg.Destroy(ctx, item))
	}
	return errors.Join(errs...)
}

// add puts item into the idle set. Called with mu held.
func (p *Pool[K, T]) add(key K, item T) {
	p.idle[key] = append(p.idle[key], item)
	if p.cfg.OnIdle != nil {
		p.cfg.OnIdle(item)
	}
}

// want makes key the most recent shape and destroys the items of shapes
// that fell out, and those beyond a shape's share. Called with mu held.
func (p *Pool[K, T]) want(key K, start StartFunc[T]) {
	shapes := []shape[K, T]{{key: key, start: start}}
	for _, s := range p.shapes {
		if s.key != key {
			shapes = append(shapes, s)
		}
	}
	keep := min(len(shapes), p.cfg.Shapes)
	for _, s := range shapes[keep:] {
		for _, item := range p.idle[s.key] {
			p.discard(item, "its shape is no longer asked for")
		}
		delete(p.idle, s.key)
	}
	p.shapes = shapes[:keep]
	for k, list := range p.idle { // a shape's share shrinks as shapes are added
		for q := p.quota(k); len(list) > q; list = list[:len(list)-1] {
			p.discard(list[len(list)-1], "its shape's share shrank")
		}
		p.idle[k] = list
	}
}

// quota is how many items of key the pool keeps: Size shared among the
// wanted shapes, the most recent ones taking the remainder. Called with mu
// held.
func (p *Pool[K, T]) quota(key K) int {
	for i, s := range p.shapes {
		if s.key == key {
			q := p.cfg.Size / len(p.shapes)
			if i < p.cfg.Size%len(p.shapes) {
				q++
			}
			return q
		}
	}
	return 0
}

// discard destroys item in the background. Called with mu held.
func (p *Pool[K, T]) discard(item T, why string) {
	p.discards.Add(1)
	go func() {
		defer p.discards.Done()
		if err := p.cfg.Destroy(context.Background(), item); err != nil {
			p.cfg.Log.Warn("removing a "+p.cfg.Kind, "instance", p.cfg.Name(item), "why", why, "err", err)
		}
	}()
}

func (p *Pool[K, T]) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// next picks the shape to start an item of (the most recent one short of
// its share) and names the item; ok is false when none is short.
func (p *Pool[K, T]) next() (s shape[K, T], name string, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return s, "", false
	}
	for _, s := range p.shapes {
		if len(p.idle[s.key]) < p.quota(s.key) {
			p.starting = p.newName()
			return s, p.starting, true
		}
	}
	return s, "", false
}

// fill starts items until every wanted shape has its share, each time it
// is woken, until Close.
func (p *Pool[K, T]) fill() {
	defer close(p.done)
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.kick:
		}
		for {
			s, name, ok := p.next()
			if !ok {
				break
			}
			item, err := s.start(p.ctx, name)
			p.mu.Lock()
			p.starting = ""
			switch {
			case err != nil:
			case p.closed || len(p.idle[s.key]) >= p.quota(s.key):
				p.discard(item, "its shape fell out while it started")
			default:
				p.add(s.key, item)
			}
			p.mu.Unlock()
			if err != nil {
				if p.ctx.Err() != nil {
					return
				}
				p.cfg.Log.Warn("starting a "+p.cfg.Kind+" failed", "err", err)
				select {
				case <-p.ctx.Done():
					return
				case <-time.After(p.cfg.Retry):
				}
			}
		}
	}
}

// newName is cfg.Prefix and 16 random hex digits: a valid instance ID
// that no harness ID ("ix-...") collides with.
func (p *Pool[K, T]) newName() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return p.cfg.Prefix + hex.EncodeToString(b[:])
}
