package controlplane

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

// configCache keeps functions' configurations and runtimes DB rows in
// memory, so that an invocation costs no database read: without it every
// Invoke and InvokeAsync read two rows from SQLite, 5-8% of the server's
// CPU under load.
//
// Assumption: the Service is the only writer of the functions and runtimes
// it caches. That holds for the all-in-one server, which holds its data
// dir's lock, so no other process opens its store; and every write the
// Service makes (CreateFunction, UpdateFunctionCode and
// UpdateFunctionConfiguration, PutFunctionConcurrency, DeleteFunction,
// PublishVersion, DeleteFunctionVersion, a version's state change, the
// runtimes sync of Start) calls invalidate once the store has it. A control
// plane whose hosts share one database must not rely on this: it needs
// invalidation by revision (each host checking the stored RevisionId, or
// change notifications) before it trusts an entry.
//
// Entries are shared and read-only: no one may modify a cached
// configuration or runtime; callers that hand one outside the package clone
// it first (Invoke documents that its configuration is read-only).
//
// A fill races with writes: a reader may load the old row, a writer then
// stores and invalidates, and the reader must not put its old row back. Each
// invalidation bumps gen, and a fill only lands if gen did not move since
// the reader started its load.
type configCache struct {
	mu  sync.RWMutex
	gen uint64
	fns map[string]*cachedFunction
	// vers holds published versions by function name, then version. An
	// entry also reflects its function's row (its reserved concurrency),
	// so every invalidation of the function drops its versions too.
	vers map[string]map[string]*cachedFunction
	rts  map[string]*runtimes.Runtime
}

// cachedFunction is a function's configuration ($LATEST or a published
// version) with what every invocation derives from it.
type cachedFunction struct {
	cfg *function.Config
	// arn is the invoked function ARN handed to the runtime: qualified
	// (NAME:7, NAME:$LATEST) when the invocation named a qualifier.
	arn string
}

func newConfigCache() *configCache {
	return &configCache{fns: map[string]*cachedFunction{},
		vers: map[string]map[string]*cachedFunction{}, rts: map[string]*runtimes.Runtime{}}
}

// generation returns the current generation, to pass to a later put.
func (c *configCache) generation() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.gen
}

func (c *configCache) function(name string) *cachedFunction {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.fns[name]
}

func (c *configCache) version(name, version string) *cachedFunction {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.vers[name][version]
}

func (c *configCache) runtime(id string) *runtimes.Runtime {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.rts[id]
}

// putFunction caches f unless an invalidation happened since gen.
func (c *configCache) putFunction(gen uint64, name string, f *cachedFunction) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == gen {
		c.fns[name] = f
	}
}

// putVersion caches a published version unless an invalidation happened
// since gen.
func (c *configCache) putVersion(gen uint64, name, version string, f *cachedFunction) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen != gen {
		return
	}
	m := c.vers[name]
	if m == nil {
		m = map[string]*cachedFunction{}
		c.vers[name] = m
	}
	m[version] = f
}

// putRuntime caches rt unless an invalidation happened since gen.
func (c *configCache) putRuntime(gen uint64, rt *runtimes.Runtime) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == gen {
		c.rts[rt.ID] = rt
	}
}

// invalidateFunction forgets name's configuration and its versions'.
// Writers call it after the store has the change (whether or not the write
// succeeded: a failed write may still have changed the row, e.g. on a lost
// commit reply).
func (c *configCache) invalidateFunction(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	delete(c.fns, name)
	delete(c.vers, name)
}

// invalidateAll forgets everything: after the runtimes sync, and for tests
// that write the store behind the Service's back.
func (c *configCache) invalidateAll() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gen++
	clear(c.fns)
	clear(c.vers)
	clear(c.rts)
}

// cachedFunction returns the function's configuration (shared, read-only)
// and its ARN, from the cache or else from the store.
func (s *Service) cachedFunction(ctx context.Context, name string) (*cachedFunction, error) {
	if f := s.cache.function(name); f != nil {
		return f, nil
	}
	gen := s.cache.generation()
	cfg, err := s.getFunction(ctx, name)
	if err != nil {
		return nil, err
	}
	f := &cachedFunction{cfg: cfg, arn: s.arn(cfg.Name)}
	s.cache.putFunction(gen, name, f)
	return f, nil
}

// cachedVersion returns published version of name (shared, read-only),
// from the cache or else from the store, with its function's current
// reserved concurrency: that cap is the function's, shared by $LATEST and
// every version, and the harness applies whatever the request carries.
func (s *Service) cachedVersion(ctx context.Context, name, version string) (*cachedFunction, error) {
	if f := s.cache.version(name, version); f != nil {
		return f, nil
	}
	gen := s.cache.generation()
	latest, err := s.cachedFunction(ctx, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, s.errVersionNotFound(name, version)
	}
	if err != nil {
		return nil, err
	}
	cfg, err := s.getVersion(ctx, name, version)
	if err != nil {
		return nil, err
	}
	if rc := latest.cfg.ReservedConcurrency; rc != nil {
		v := *rc
		cfg.ReservedConcurrency = &v
	}
	f := &cachedFunction{cfg: cfg, arn: function.QualifiedARN(s.cfg.Region, s.cfg.Account, name, version)}
	s.cache.putVersion(gen, name, version, f)
	return f, nil
}

// cachedRuntime returns the runtimes DB row of id (shared, read-only), from
// the cache or else from the store. ErrNotFound if the row does not exist.
func (s *Service) cachedRuntime(ctx context.Context, id string) (*runtimes.Runtime, error) {
	if rt := s.cache.runtime(id); rt != nil {
		return rt, nil
	}
	gen := s.cache.generation()
	rt, err := s.store.Runtimes().Get(ctx, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, err
	}
	if err != nil {
		return nil, fmt.Errorf("getting runtime %s: %w", id, err)
	}
	s.cache.putRuntime(gen, rt)
	return rt, nil
}
