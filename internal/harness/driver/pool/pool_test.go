package pool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// item is what the test pools hold: a name and the shape it was started
// for.
type item struct {
	name, key string
	dead      atomic.Bool
}

// fixture is a pool of *item keyed by string, with what it started and
// destroyed.
type fixture struct {
	t *testing.T
	p *Pool[string, *item]

	mu        sync.Mutex
	started   []*item
	destroyed map[string]bool
	marked    map[string]bool // OnIdle minus OnTake
	fail      int             // starts that fail before one succeeds
}

func newFixture(t *testing.T, cfg Config[*item]) *fixture {
	f := &fixture{t: t, destroyed: map[string]bool{}, marked: map[string]bool{}}
	cfg.Prefix = "test-"
	cfg.Kind = "test item"
	cfg.Name = func(it *item) string { return it.name }
	cfg.Destroy = func(_ context.Context, it *item) error {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.destroyed[it.name] {
			t.Errorf("%s destroyed twice", it.name)
		}
		f.destroyed[it.name] = true
		return nil
	}
	cfg.Usable = func(it *item) bool { return !it.dead.Load() }
	cfg.OnIdle = func(it *item) { f.mu.Lock(); f.marked[it.name] = true; f.mu.Unlock() }
	cfg.OnTake = func(it *item) { f.mu.Lock(); delete(f.marked, it.name); f.mu.Unlock() }
	if cfg.Retry == 0 {
		cfg.Retry = time.Millisecond
	}
	f.p = New[string](cfg)
	t.Cleanup(func() {
		if err := f.p.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return f
}

// start returns the StartFunc of shape key.
func (f *fixture) start(key string) StartFunc[*item] {
	return func(ctx context.Context, name string) (*item, error) {
		if !strings.HasPrefix(name, "test-") || len(name) != len("test-")+16 {
			f.t.Errorf("item name %q: want the prefix and 16 hex digits", name)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.fail > 0 {
			f.fail--
			return nil, errors.New("start failed")
		}
		it := &item{name: name, key: key}
		f.started = append(f.started, it)
		return it, nil
	}
}

func (f *fixture) take(key string) (*item, bool) {
	f.t.Helper()
	it, ok := f.p.Take(key, f.start(key))
	if ok && it.key != key {
		f.t.Fatalf("Take(%q) returned an item of %q", key, it.key)
	}
	return it, ok
}

// takeFilled has the pool fill shape key and takes the item it started.
func (f *fixture) takeFilled(key string) *item {
	f.t.Helper()
	f.take(key)
	f.await(map[string]int{key: 1})
	it, ok := f.take(key)
	if !ok {
		f.t.Fatal("no item to take")
	}
	return it
}

// idle is how many idle items of each shape the pool holds.
func (f *fixture) idle() map[string]int {
	n := map[string]int{}
	for _, it := range f.p.Idle() {
		n[it.key]++
	}
	return n
}

// await waits until the pool's idle items are want (shape → count).
func (f *fixture) await(want map[string]int) {
	f.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		got := f.idle()
		if fmt.Sprint(got) == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("idle items %v, want %v", got, want)
		}
		time.Sleep(time.Millisecond)
	}
}

func (f *fixture) isMarked(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.marked[name]
}

func (f *fixture) isDestroyed(name string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.destroyed[name]
}

// awaitDestroyed waits until every item in names is destroyed.
func (f *fixture) awaitDestroyed(names ...string) {
	f.t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if !slices.ContainsFunc(names, func(n string) bool { return !f.isDestroyed(n) }) {
			return
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("items %v not all destroyed", names)
		}
		time.Sleep(time.Millisecond)
	}
}

func names(items []*item) []string {
	var n []string
	for _, it := range items {
		n = append(n, it.name)
	}
	return n
}

func TestTakeServesAndRefills(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 2})
	if _, ok := f.take("a"); ok {
		t.Fatal("the first Take returned an item before anything was started")
	}
	f.await(map[string]int{"a": 2})
	idle := f.p.Idle()
	for _, it := range idle {
		if !f.isMarked(it.name) {
			t.Errorf("idle item %s was not marked (OnIdle)", it.name)
		}
		if !f.p.Owns(it.name) {
			t.Errorf("Owns(%s) = false for an idle item", it.name)
		}
	}
	it, ok := f.take("a")
	if !ok || !slices.Contains(names(idle), it.name) {
		t.Fatalf("Take = %v, %v; want one of the idle items %v", it, ok, names(idle))
	}
	if f.isMarked(it.name) {
		t.Errorf("taken item %s is still marked (OnTake)", it.name)
	}
	if f.p.Owns(it.name) {
		t.Errorf("Owns(%s) = true for a taken item", it.name)
	}
	if _, ok := f.take("b"); ok {
		t.Error("Take of a shape never asked for returned an item")
	}
	f.await(map[string]int{"a": 1, "b": 1})
}

func TestShapesShareTheSize(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 3})
	f.take("a")
	f.await(map[string]int{"a": 3})
	f.take("b") // the most recent shape takes the remainder
	f.await(map[string]int{"a": 1, "b": 2})
	f.take("c")
	f.await(map[string]int{"a": 1, "b": 1, "c": 1})
	f.take("d") // a, the least recent, falls out
	f.await(map[string]int{"b": 1, "c": 1, "d": 1})
	f.mu.Lock()
	started := slices.Clone(f.started)
	f.mu.Unlock()
	idle := names(f.p.Idle())
	var gone []string
	for _, it := range started {
		if !slices.Contains(idle, it.name) {
			gone = append(gone, it.name)
		}
	}
	f.awaitDestroyed(gone...)
	for _, n := range idle {
		if f.isDestroyed(n) {
			t.Errorf("idle item %s was destroyed", n)
		}
	}
}

func TestOneShapeReplacesTheLast(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 2, Shapes: 1})
	f.take("a")
	f.await(map[string]int{"a": 2})
	old := names(f.p.Idle())
	if _, ok := f.take("b"); ok {
		t.Fatal("Take(b) returned an item of another shape")
	}
	f.await(map[string]int{"b": 2})
	f.awaitDestroyed(old...)
}

func TestUnusableItemsAreDestroyed(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 2})
	f.take("a")
	f.await(map[string]int{"a": 2})
	idle := f.p.Idle()
	for _, it := range idle {
		it.dead.Store(true)
	}
	if it, ok := f.take("a"); ok {
		t.Fatalf("Take returned %s, which had died", it.name)
	}
	f.awaitDestroyed(names(idle)...)
	f.await(map[string]int{"a": 2})
}

func TestPut(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 1})
	it := f.takeFilled("a")
	f.await(map[string]int{"a": 1}) // refilled: now there is no room
	f.p.Put("a", it)
	f.awaitDestroyed(it.name)

	// Taken while the refill is short of its share: kept.
	f.mu.Lock()
	f.fail = 1 << 30 // no refill from now on
	f.mu.Unlock()
	it, ok := f.take("a")
	if !ok {
		t.Fatal("no item to take")
	}
	f.p.Put("a", it)
	if got := names(f.p.Idle()); !slices.Equal(got, []string{it.name}) {
		t.Fatalf("idle after Put: %v, want [%s]", got, it.name)
	}
	if !f.isMarked(it.name) {
		t.Errorf("put-back item %s is not marked idle", it.name)
	}
}

func TestFailedStartsAreRetried(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 1})
	f.fail = 3
	f.take("a")
	f.await(map[string]int{"a": 1})
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != 0 || len(f.started) != 1 {
		t.Errorf("after 3 failures: %d failures left, %d started; want 0 and 1", f.fail, len(f.started))
	}
}

func TestCloseAbortsAStartAndDestroysIdle(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 2})
	f.take("a")
	f.await(map[string]int{"a": 2})
	idle := names(f.p.Idle())

	// The next start blocks until Close cancels it.
	blocked := make(chan string)
	aborted := make(chan error, 1)
	taken, _ := f.p.Take("a", func(ctx context.Context, name string) (*item, error) {
		blocked <- name
		<-ctx.Done()
		aborted <- ctx.Err()
		return nil, ctx.Err()
	})
	name := <-blocked
	if !f.p.Owns(name) {
		t.Errorf("Owns(%s) = false for the item being started", name)
	}
	if err := f.p.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-aborted:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("the start in flight saw %v, want context.Canceled", err)
		}
	default:
		t.Error("Close returned before the start in flight was aborted")
	}
	for _, n := range idle {
		if n == taken.name {
			continue
		}
		if !f.isDestroyed(n) {
			t.Errorf("idle item %s outlived Close", n)
		}
	}
	if _, ok := f.take("a"); ok {
		t.Error("Take after Close returned an item")
	}
	if err := f.p.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestSizeZeroStartsNothing(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 0})
	called := false
	if _, ok := f.p.Take("a", func(context.Context, string) (*item, error) {
		called = true
		return &item{}, nil
	}); ok {
		t.Fatal("a pool of size 0 returned an item")
	}
	if err := f.p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if called {
		t.Error("a pool of size 0 started an item")
	}
}

// TestPutAfterClose: an item given back after Close is destroyed before
// Put returns, not left to a background destroy that Close no longer
// waits for.
func TestPutAfterClose(t *testing.T) {
	f := newFixture(t, Config[*item]{Size: 1})
	it := f.takeFilled("a")
	if err := f.p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.p.Put("a", it)
	if !f.isDestroyed(it.name) {
		t.Errorf("%s put back after Close was not destroyed by Put", it.name)
	}
}
