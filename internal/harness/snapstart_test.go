package harness

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/protocol"
)

// snapDriver is a fakeDriver that snapshots: a snapshot is the Init the
// instance had, in a file; a restored instance's agent starts initialised.
type snapDriver struct {
	*fakeDriver
	mu          sync.Mutex
	snapshots   int
	restored    []string // instance ids
	failRestore bool
}

func (d *snapDriver) Snapshot(ctx context.Context, id, dir string) error {
	init := d.initOf(id)
	defer d.Stop(ctx, id)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	b, _ := json.Marshal(init)
	d.mu.Lock()
	d.snapshots++
	d.mu.Unlock()
	return os.WriteFile(filepath.Join(dir, "state"), b, 0o600)
}

func (d *snapDriver) Restore(ctx context.Context, spec driver.Spec, dir string) (driver.Instance, error) {
	d.mu.Lock()
	fail := d.failRestore
	d.mu.Unlock()
	if fail {
		return nil, errors.New("snapshot file is corrupt")
	}
	b, err := os.ReadFile(filepath.Join(dir, "state"))
	if err != nil {
		return nil, fmt.Errorf("no snapshot in %s: %w", dir, errdefs.ErrNotFound)
	}
	var init protocol.Init
	if err := json.Unmarshal(b, &init); err != nil {
		return nil, err
	}
	h, a := net.Pipe()
	inst := &fakeInstance{id: spec.ID, harness: h, agent: a, done: make(chan struct{})}
	d.fakeDriver.mu.Lock()
	d.live[spec.ID] = inst
	d.inits[spec.ID] = init
	d.fakeDriver.mu.Unlock()
	d.mu.Lock()
	d.restored = append(d.restored, spec.ID)
	d.mu.Unlock()
	go func() {
		defer inst.exit()
		d.serve(inst, protocol.NewConn(inst.agent), false)
	}()
	return inst, nil
}

func (d *snapDriver) counts() (snaps, restores int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.snapshots, len(d.restored)
}

func newSnapEnv(t *testing.T) (*testEnv, *snapDriver) {
	t.Helper()
	var sd *snapDriver
	e := newTestEnv(t, func(c *Config) {
		sd = &snapDriver{fakeDriver: c.Driver.(*fakeDriver)}
		c.Driver = sd
	})
	return e, sd
}

func (d *fakeDriver) allInits() map[string]protocol.Init {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]protocol.Init{}
	for k, v := range d.inits {
		out[k] = v
	}
	return out
}

// version is a published version of fn with SnapStart, as the control
// plane hands it to PrepareVersion and, once Active, to Invoke.
func (e *testEnv) version(name, revision string, on bool) *function.Config {
	v := e.fn(name, revision)
	v.Version = "1"
	v.SnapStart = function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOff}
	if on {
		v.SnapStart.OptimizationStatus = function.OptimizationOn
	}
	return v
}

func TestSnapStartRestoresInsteadOfInit(t *testing.T) {
	e, sd := newSnapEnv(t)
	if !e.h.SnapshotsSupported() {
		t.Fatal("a snapshotting driver: SnapshotsSupported is false")
	}
	rt := providedRuntime
	ctx := context.Background()
	v := e.version("snappy", "rev-v1", false)
	if err := e.h.PrepareVersion(ctx, v, &rt); err != nil {
		t.Fatal(err)
	}
	// The snapshot's INIT ran as Lambda's snap-start INIT.
	if snaps, _ := sd.counts(); snaps != 1 {
		t.Fatalf("%d snapshots, want 1", snaps)
	}
	var snapInit protocol.Init
	for _, in := range sd.allInits() {
		snapInit = in
	}
	if snapInit.InitType != initTypeSnapStart || envValue(snapInit.Env, "AWS_LAMBDA_INITIALIZATION_TYPE") != initTypeSnapStart {
		t.Fatalf("snapshot INIT type %q, want %q", snapInit.InitType, initTypeSnapStart)
	}
	// Idempotent: a second call takes no second snapshot.
	if err := e.h.PrepareVersion(ctx, v, &rt); err != nil {
		t.Fatal(err)
	}
	if snaps, _ := sd.counts(); snaps != 1 {
		t.Fatalf("%d snapshots after a repeated PrepareVersion, want 1", snaps)
	}

	// Invocations of the Active version restore; two environments get
	// different seeds and their own hostnames.
	on := e.version("snappy", "rev-v1", true)
	if res := mustInvoke(t, e.h, request(on, "x")); string(res.Payload) != "x" || !res.Cold {
		t.Fatalf("first invoke of the version: %q cold %v", res.Payload, res.Cold)
	}
	e.waitArrived(t, 1) // that invoke's arrival, so the wait below counts only the next two
	var wg sync.WaitGroup
	for k := 0; k < 2; k++ {
		wg.Add(1)
		go func() { defer wg.Done(); mustInvoke(t, e.h, request(on, "block")) }()
	}
	e.waitArrived(t, 2)
	e.openGate()
	wg.Wait()
	if _, restores := sd.counts(); restores < 2 {
		t.Fatalf("%d restores for concurrent invocations, want >= 2", restores)
	}
	sd.fakeDriver.mu.Lock()
	seen := map[string]bool{}
	for id, r := range sd.fakeDriver.restores {
		if len(r.Seed) < 16 || seen[string(r.Seed)] || r.Hostname != "sandbox-"+id {
			t.Errorf("restore of %s: seed %x hostname %q (seen before: %v)", id, r.Seed, r.Hostname, seen[string(r.Seed)])
		}
		seen[string(r.Seed)] = true
	}
	sd.fakeDriver.mu.Unlock()
	if starts := sd.startCount(); starts != 1 {
		t.Errorf("%d boots, want only the snapshot's", starts)
	}

	// $LATEST of the same function boots as usual.
	if res := mustInvoke(t, e.h, request(e.fn("snappy", "rev-latest"), "x")); !res.Cold {
		t.Fatal("first $LATEST invoke not cold")
	}
	if starts := sd.startCount(); starts != 2 {
		t.Errorf("%d boots after a $LATEST invoke, want 2", starts)
	}

	// Retiring the version's revision deletes its snapshot.
	dir := e.h.snaps.dirFor("rev-v1")
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("snapshot directory: %v", err)
	}
	if err := e.h.RetireRevisions(ctx, "snappy", []string{"rev-v1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("snapshot of a retired revision still there: %v", err)
	}
	// Without its snapshot the version still runs, with a regular INIT.
	if res := mustInvoke(t, e.h, request(on, "y")); string(res.Payload) != "y" {
		t.Fatalf("invoke of a version whose snapshot is gone: %q", res.Payload)
	}
}

func TestSnapStartRestoreFailureBoots(t *testing.T) {
	e, sd := newSnapEnv(t)
	e.openGate()
	rt := providedRuntime
	v := e.version("f", "rev-v1", false)
	if err := e.h.PrepareVersion(context.Background(), v, &rt); err != nil {
		t.Fatal(err)
	}
	for _, failRenew := range []bool{false, true} {
		sd.mu.Lock()
		sd.failRestore = !failRenew
		sd.mu.Unlock()
		sd.fakeDriver.mu.Lock()
		sd.fakeDriver.failRenew = failRenew
		sd.fakeDriver.mu.Unlock()
		before := sd.startCount()
		res := mustInvoke(t, e.h, request(e.version("f", "rev-v1", true), "z"))
		if string(res.Payload) != "z" || sd.startCount() != before+1 {
			t.Fatalf("failRenew=%v: payload %q, boots %d -> %d", failRenew, res.Payload, before, sd.startCount())
		}
		// Retire the booted instance so the next round cold-starts again.
		if err := e.h.Retire(context.Background(), "f", "none"); err != nil {
			t.Fatal(err)
		}
		if err := e.h.PrepareVersion(context.Background(), v, &rt); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSnapStartInitFailure(t *testing.T) {
	e, _ := newSnapEnv(t)
	e.openGate()
	rt := providedRuntime
	v := e.version("bad", "rev-v1", false)
	v.Environment = map[string]string{"FAKE_INIT": "error"}
	err := e.h.PrepareVersion(context.Background(), v, &rt)
	if !errors.Is(err, function.ErrInitFailed) || !strings.Contains(err.Error(), "boom in init") {
		t.Fatalf("PrepareVersion of a failing INIT: %v", err)
	}
	if _, ok := e.h.snaps.get("rev-v1"); ok {
		t.Fatal("a failed INIT left a snapshot")
	}
}

func TestSnapshotsSurviveARestartAndIncompleteOnesGo(t *testing.T) {
	dir := t.TempDir()
	s := newSnapshots(dir, 1<<30)
	done := s.dirFor("rev-done")
	if err := os.MkdirAll(done, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeSnapshotMeta(done, &snapshot{Function: "f", Revision: "rev-done", Bytes: 10}); err != nil {
		t.Fatal(err)
	}
	partial := s.dirFor("rev-partial")
	if err := os.MkdirAll(partial, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.load(); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.get("rev-done"); !ok || got != done {
		t.Fatalf("complete snapshot after load: %q %v", got, ok)
	}
	if _, err := os.Stat(partial); !os.IsNotExist(err) {
		t.Fatalf("incomplete snapshot kept: %v", err)
	}
}

func TestSnapshotBudgetEvictsLeastRecentlyUsed(t *testing.T) {
	s := newSnapshots(t.TempDir(), 100)
	s.add(&snapshot{Function: "f", Revision: "a", Bytes: 40, dir: "/a"})
	s.add(&snapshot{Function: "f", Revision: "b", Bytes: 40, dir: "/b"})
	s.get("a") // a is now the most recently used
	evicted := s.add(&snapshot{Function: "f", Revision: "c", Bytes: 40, dir: "/c"})
	if len(evicted) != 1 || evicted[0] != "/b" {
		t.Fatalf("evicted %v, want [/b]", evicted)
	}
	if _, ok := s.get("b"); ok {
		t.Fatal("evicted snapshot still indexed")
	}
}

func TestNoSnapshotsWithoutASnapshotter(t *testing.T) {
	e := newTestEnv(t, nil)
	rt := providedRuntime
	if e.h.SnapshotsSupported() {
		t.Fatal("SnapshotsSupported with a driver that cannot snapshot")
	}
	if err := e.h.PrepareVersion(context.Background(), e.version("f", "r", false), &rt); err == nil {
		t.Fatal("PrepareVersion without a snapshotting driver succeeded")
	}
}
