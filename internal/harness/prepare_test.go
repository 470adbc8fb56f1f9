package harness

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
)

// codeDir is where the cache unpacks digest.
func (e *testEnv) codeDir(t *testing.T, digest string) string {
	t.Helper()
	key, err := digestKey(digest)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(e.dir, "code", key)
}

func exists(t *testing.T, path string) bool {
	t.Helper()
	_, err := os.Stat(path)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return err == nil
}

func (e *testEnv) hasPool(name string) bool {
	e.h.mu.Lock()
	defer e.h.mu.Unlock()
	return e.h.pools[name] != nil
}

func TestPrepareUnpacksBeforeTheFirstInvoke(t *testing.T) {
	e := newTestEnv(t, nil)
	ctx := context.Background()
	fn := e.fn("f", "r1")
	if err := e.h.Prepare(ctx, fn); err != nil {
		t.Fatal(err)
	}
	if !exists(t, e.codeDir(t, fn.CodeSha256)) {
		t.Fatal("Prepare did not unpack the code")
	}
	if err := e.h.Prepare(ctx, fn); err != nil {
		t.Fatalf("second Prepare: %v", err)
	}
	if n := e.src.opens.Load(); n != 1 {
		t.Fatalf("code fetched %d times by two Prepares, want 1", n)
	}
	if res := mustInvoke(t, e.h, request(fn, "x")); !res.Cold || string(res.Payload) != "x" {
		t.Fatalf("first invoke = cold %v payload %q", res.Cold, res.Payload)
	}
	if n := e.src.opens.Load(); n != 1 {
		t.Fatalf("the first invoke after Prepare fetched the code again (%d fetches)", n)
	}
}

// A prepared revision keeps its code while it is the latest, with no
// instance: the reaper must not take it.
func TestPreparedCodeOutlivesItsInstances(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.KeepAlive = 10 * time.Millisecond })
	fn := e.fn("f", "r1")
	if err := e.h.Prepare(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
	mustInvoke(t, e.h, request(fn, "x"))
	waitFor(t, "idle instance reaped", func() bool { return e.h.Stats().Instances == 0 })
	e.h.reap()
	if !exists(t, e.codeDir(t, fn.CodeSha256)) {
		t.Fatal("the latest revision's code was removed when its instance was reaped")
	}
	mustInvoke(t, e.h, request(fn, "y"))
	if n := e.src.opens.Load(); n != 1 {
		t.Fatalf("code fetched %d times, want 1", n)
	}
}

// Invoking a published version (a revision of its own, with other code)
// does not make $LATEST's prepared revision reapable.
func TestVersionInvokeKeepsLatestPrepared(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.KeepAlive = 10 * time.Millisecond })
	e.openGate()
	latest := e.fn("f", "r-latest")
	if err := e.h.Prepare(context.Background(), latest); err != nil {
		t.Fatal(err)
	}
	v1 := e.fn("f", "r-v1")
	v1.Version = "1"
	v1.CodeSha256 = e.src.add(t, "v1-code")
	mustInvoke(t, e.h, request(v1, "x"))
	waitFor(t, "the version's instance reaped", func() bool { return e.h.Stats().Instances == 0 })
	e.h.reap()
	if !exists(t, e.codeDir(t, latest.CodeSha256)) {
		t.Fatal("$LATEST's prepared code was removed after an invoke of a published version")
	}
}

// Prepare, then a new revision: the old one's code goes when it is retired;
// a configuration-only revision keeps the same directory without fetching
// it again; retiring everything leaves nothing.
func TestPreparedCodeGoesWithItsRevision(t *testing.T) {
	e := newTestEnv(t, nil)
	ctx := context.Background()
	r1 := e.fn("f", "r1")
	if err := e.h.Prepare(ctx, r1); err != nil {
		t.Fatal(err)
	}

	// A configuration change: same code, new revision, prepared before the
	// old revision is retired (as the control plane does).
	r2 := e.fn("f", "r2")
	if err := e.h.Prepare(ctx, r2); err != nil {
		t.Fatal(err)
	}
	if err := e.h.Retire(ctx, "f", "r2"); err != nil {
		t.Fatal(err)
	}
	if !exists(t, e.codeDir(t, r2.CodeSha256)) {
		t.Fatal("code shared with the kept revision was removed")
	}
	if n := e.src.opens.Load(); n != 1 {
		t.Fatalf("code fetched %d times for one digest, want 1", n)
	}

	// A code change.
	r3 := e.fn("f", "r3")
	r3.CodeSha256 = e.src.add(t, "v3")
	if err := e.h.Prepare(ctx, r3); err != nil {
		t.Fatal(err)
	}
	if err := e.h.Retire(ctx, "f", "r3"); err != nil {
		t.Fatal(err)
	}
	if exists(t, e.codeDir(t, r2.CodeSha256)) {
		t.Fatal("a retired revision's code is still unpacked")
	}
	if !exists(t, e.codeDir(t, r3.CodeSha256)) {
		t.Fatal("the kept revision's code was removed")
	}

	if err := e.h.Retire(ctx, "f", ""); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(filepath.Join(e.dir, "code")); len(entries) != 0 {
		t.Fatalf("code cache not emptied by retiring everything: %v", entries)
	}
	if e.hasPool("f") {
		t.Fatal("pool kept after retiring everything")
	}
}

// gatedSource holds every Open until release is closed.
type gatedSource struct {
	*memSource
	opened  chan struct{}
	release chan struct{}
}

func (s *gatedSource) Open(ctx context.Context, digest string) (io.ReadCloser, error) {
	s.opened <- struct{}{}
	select {
	case <-s.release:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.memSource.Open(ctx, digest)
}

// A revision retired while it is being prepared leaves no directory and no
// pool behind.
func TestPrepareRacingRetireLeavesNothing(t *testing.T) {
	src := &gatedSource{opened: make(chan struct{}, 1), release: make(chan struct{})}
	e := newTestEnv(t, func(c *Config) {
		src.memSource = c.Code.(*memSource)
		c.Code = src
	})
	fn := e.fn("f", "r1")
	done := make(chan error, 1)
	go func() { done <- e.h.Prepare(context.Background(), fn) }()
	<-src.opened
	if err := e.h.Retire(context.Background(), "f", ""); err != nil {
		t.Fatal(err)
	}
	close(src.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if exists(t, e.codeDir(t, fn.CodeSha256)) {
		t.Fatal("code of a revision retired during Prepare was left unpacked")
	}
	if e.hasPool("f") {
		t.Fatal("pool of a function retired during Prepare was kept")
	}
}

func TestPrepareErrors(t *testing.T) {
	e := newTestEnv(t, nil)
	ctx := context.Background()
	bad := e.fn("f", "r1")
	bad.CodeSha256 = ""
	if err := e.h.Prepare(ctx, bad); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("Prepare without a digest = %v, want ErrInvalidParameter", err)
	}
	missing := e.fn("f", "r1")
	missing.CodeSha256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" // sha256 of nothing, not stored
	if err := e.h.Prepare(ctx, missing); err == nil {
		t.Fatal("Prepare of code the source does not have succeeded")
	}
	if entries, _ := os.ReadDir(filepath.Join(e.dir, "code")); len(entries) != 0 {
		t.Fatalf("failed Prepare left %v", entries)
	}
	// The revision can still be prepared once its code exists.
	if err := e.h.Prepare(ctx, e.fn("f", "r2")); err != nil {
		t.Fatal(err)
	}

	cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e.closeErrOK = true
	if err := e.h.Close(cctx); err != nil {
		t.Fatal(err)
	}
	if err := e.h.Prepare(ctx, e.fn("f", "r3")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Prepare after Close = %v, want ErrUnavailable", err)
	}
}

// preparingDriver is a fakeDriver that also implements driver.Preparer.
type preparingDriver struct {
	*fakeDriver
	mu       sync.Mutex
	prepared []driver.Spec
	err      error
}

func (d *preparingDriver) Prepare(_ context.Context, spec driver.Spec) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prepared = append(d.prepared, spec)
	return d.err
}

func TestPrepareLetsTheDriverPrepare(t *testing.T) {
	var pd *preparingDriver
	e := newTestEnv(t, func(c *Config) {
		pd = &preparingDriver{fakeDriver: c.Driver.(*fakeDriver)}
		c.Driver = pd
	})
	fn := e.fn("f", "r1")
	if err := e.h.Prepare(context.Background(), fn); err != nil {
		t.Fatal(err)
	}
	pd.mu.Lock()
	got := pd.prepared
	pd.mu.Unlock()
	if len(got) != 1 {
		t.Fatalf("driver prepared %d times, want 1", len(got))
	}
	sp := got[0]
	if sp.Function != "f" || sp.RevisionID != "r1" || sp.Runtime.ID != fn.Runtime || sp.CodeSha256 != fn.CodeSha256 ||
		sp.CodeDir != e.codeDir(t, fn.CodeSha256) || sp.ID != "" {
		t.Fatalf("driver got spec %+v", sp)
	}

	// A driver's failure is Prepare's (the control plane logs it); the
	// revision still runs.
	pd.mu.Lock()
	pd.err = errors.New("disk full")
	pd.mu.Unlock()
	fn2 := e.fn("g", "r1")
	if err := e.h.Prepare(context.Background(), fn2); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Prepare with a failing driver: %v", err)
	}
	if res := mustInvoke(t, e.h, request(fn2, "y")); string(res.Payload) != "y" {
		t.Fatalf("invoke after a failed driver Prepare: %q", res.Payload)
	}

	// An unknown runtime is an error naming it.
	fn3 := e.fn("h", "r1")
	fn3.Runtime = "cobol1.0"
	if err := e.h.Prepare(context.Background(), fn3); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Prepare of an unknown runtime: %v", err)
	}
}
