package controlplane

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

// countingStore counts the function and runtime reads that reach the store.
type countingStore struct {
	store.Store
	fnGets, rtGets atomic.Int64
}

func (c *countingStore) Functions() store.Functions {
	return countingFunctions{Functions: c.Store.Functions(), n: &c.fnGets}
}

func (c *countingStore) Runtimes() store.Runtimes {
	return countingRuntimes{Runtimes: c.Store.Runtimes(), n: &c.rtGets}
}

type countingFunctions struct {
	store.Functions
	n *atomic.Int64
}

func (f countingFunctions) Get(ctx context.Context, name string) (*function.Config, error) {
	f.n.Add(1)
	return f.Functions.Get(ctx, name)
}

type countingRuntimes struct {
	store.Runtimes
	n *atomic.Int64
}

func (r countingRuntimes) Get(ctx context.Context, id string) (*runtimes.Runtime, error) {
	r.n.Add(1)
	return r.Runtimes.Get(ctx, id)
}

func TestWarmInvokesReadNoRows(t *testing.T) {
	var cs *countingStore
	e := newEnv(t, func(c *Config) {
		cs = &countingStore{Store: c.Store}
		c.Store = cs
	})
	ctx := context.Background()
	e.create("f")
	for i := 0; i < 3; i++ {
		if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
	}
	fns, rts := cs.fnGets.Load(), cs.rtGets.Load()
	for i := 0; i < 5; i++ {
		if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		if err := e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
	}
	if d := cs.fnGets.Load() - fns; d != 0 {
		t.Errorf("warm invokes read the function row %d times, want 0", d)
	}
	if d := cs.rtGets.Load() - rts; d != 0 {
		t.Errorf("warm invokes read the runtime row %d times, want 0", d)
	}
}

// Every write the Service makes is seen by the next invocation.
func TestInvokeSeesEveryWrite(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	invoke := func() *function.Config {
		t.Helper()
		if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		reqs := e.host.requests()
		return reqs[len(reqs)-1].Function
	}
	invoke()

	upd, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Environment: &map[string]string{"K": "v1"}}, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := invoke(); got.RevisionID != upd.RevisionID || got.Environment["K"] != "v1" {
		t.Fatalf("after a configuration update the host ran revision %s env %v, want %s K=v1", got.RevisionID, got.Environment, upd.RevisionID)
	}

	upd, err = e.svc.UpdateFunctionCode(ctx, "f", bootstrapZip(t, "v2"), "")
	if err != nil {
		t.Fatal(err)
	}
	if got := invoke(); got.CodeSha256 != upd.CodeSha256 || got.RevisionID != upd.RevisionID {
		t.Fatalf("after a code update the host ran code %s revision %s, want %s %s", got.CodeSha256, got.RevisionID, upd.CodeSha256, upd.RevisionID)
	}

	if _, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(3)); err != nil {
		t.Fatal(err)
	}
	if got := invoke(); got.ReservedConcurrency == nil || *got.ReservedConcurrency != 3 {
		t.Fatalf("after PutFunctionConcurrency the host ran with reserved concurrency %v, want 3", got.ReservedConcurrency)
	}

	if err := e.svc.DeleteFunction(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	_, _, err = e.svc.Invoke(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrNotFound, "Function not found")
	err = e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrNotFound, "Function not found")
	if _, err := e.svc.GetFunction(ctx, "f"); err == nil {
		t.Fatal("GetFunction found a deleted function")
	}

	created := e.create("f")
	if got := invoke(); got.RevisionID != created.RevisionID || got.ReservedConcurrency != nil {
		t.Fatalf("after delete and create the host ran revision %s, want %s", got.RevisionID, created.RevisionID)
	}
}

// What GetFunction and CheckInvoke return is the caller's to modify.
func TestCachedConfigIsNotShared(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	created := e.create("f")
	got, err := e.svc.GetFunction(ctx, "f")
	if err != nil {
		t.Fatal(err)
	}
	got.RevisionID, got.Runtime = "scribbled", "scribbled"
	checked, err := e.svc.CheckInvoke(ctx, "f", "")
	if err != nil {
		t.Fatal(err)
	}
	checked.State = function.StateFailed
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f"}); err != nil {
		t.Fatal(err)
	}
	reqs := e.host.requests()
	if r := reqs[len(reqs)-1].Function; r.RevisionID != created.RevisionID || r.Runtime != created.Runtime {
		t.Fatalf("host ran revision %s runtime %s, want %s %s", r.RevisionID, r.Runtime, created.RevisionID, created.Runtime)
	}
}

// A load that started before an invalidation must not put its (possibly
// old) row back into the cache.
func TestCacheFillLosesToInvalidation(t *testing.T) {
	c := newConfigCache()
	old := &cachedFunction{cfg: &function.Config{Name: "f", RevisionID: "old"}}
	gen := c.generation()
	c.invalidateFunction("f")
	c.putFunction(gen, "f", old)
	if c.function("f") != nil {
		t.Fatal("a fill older than an invalidation was cached")
	}
	gen = c.generation()
	c.putFunction(gen, "f", old)
	if c.function("f") != old {
		t.Fatal("a fill with the current generation was not cached")
	}

	rt := &runtimes.Runtime{ID: "r"}
	gen = c.generation()
	c.invalidateAll()
	c.putRuntime(gen, rt)
	if c.runtime("r") != nil || c.function("f") != nil {
		t.Fatal("invalidateAll left entries, or a stale runtime fill landed")
	}
}
