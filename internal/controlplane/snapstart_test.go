package controlplane

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/runtimes"
)

// snapHost is a fake host that takes SnapStart snapshots (VersionPreparer)
// and retires single revisions.
type snapHost struct {
	retiringHost
	// gate, when set, holds PrepareVersion until it is closed or ctx ends.
	gate chan struct{}
	fail error
	// snapshots lists "name:version runtime" per PrepareVersion call.
	snapshots []string
}

var (
	_ VersionPreparer = (*snapHost)(nil)
	_ RevisionRetirer = (*snapHost)(nil)
)

func (h *snapHost) PrepareVersion(ctx context.Context, cfg *function.Config, rt *runtimes.Runtime) error {
	h.mu.Lock()
	h.snapshots = append(h.snapshots, cfg.Name+":"+cfg.Version+" "+rt.ID)
	gate, fail := h.gate, h.fail
	h.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return fail
}

func (h *snapHost) snapshotCalls() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.snapshots)
}

// createSnap creates a SnapStart function on e.
func (e *testEnv) createSnap(name string) *function.Config {
	e.t.Helper()
	cfg, err := e.svc.CreateFunction(context.Background(), &function.Config{Name: name, Runtime: "provided.al2023",
		SnapStart: function.SnapStart{ApplyOn: function.SnapStartPublishedVersions}}, bootstrapZip(e.t, name))
	if err != nil {
		e.t.Fatal(err)
	}
	return cfg
}

func (e *testEnv) version(name, q string) *function.Config {
	e.t.Helper()
	v, err := e.svc.GetFunctionVersion(context.Background(), name, q)
	if err != nil {
		e.t.Fatalf("getting %s:%s: %v", name, q, err)
	}
	return v
}

func TestSnapStartVersionIsPendingUntilItsSnapshotExists(t *testing.T) {
	host := &snapHost{gate: make(chan struct{})}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	ctx := context.Background()
	e.createSnap("s")

	v := e.publish("s", nil)
	if v.Version != "1" || v.State != function.StatePending || v.StateReasonCode != "Creating" ||
		v.StateReason != "The function is being created." || v.SnapStart.OptimizationStatus != function.OptimizationOff {
		t.Fatalf("published: State %s %q %q SnapStart %+v", v.State, v.StateReasonCode, v.StateReason, v.SnapStart)
	}
	const pendingMsg = "The operation cannot be performed at this time. The function is currently in the following state: Pending"
	_, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "s", Qualifier: "1"})
	wantKind(t, err, errdefs.ErrConflict, pendingMsg)
	wantKind(t, e.svc.InvokeAsync(ctx, &InvokeInput{Function: "s", Qualifier: "1"}), errdefs.ErrConflict, pendingMsg)
	_, err = e.svc.CheckInvoke(ctx, "s", "1")
	wantKind(t, err, errdefs.ErrConflict, pendingMsg)
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "s"}); err != nil {
		t.Fatalf("$LATEST of a function with a pending version: %v", err)
	}
	if again := e.publish("s", nil); again.Version != "1" || again.State != function.StatePending {
		t.Fatalf("publishing the unchanged $LATEST again: %s %s", again.Version, again.State)
	}

	close(host.gate)
	waitFor(t, "the version to become Active", func() bool { return e.version("s", "1").State == function.StateActive })
	got := e.version("s", "1")
	if got.SnapStart != (function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOn}) ||
		got.StateReason != "" || got.StateReasonCode != "" {
		t.Fatalf("active version: SnapStart %+v reason %q %q", got.SnapStart, got.StateReasonCode, got.StateReason)
	}
	if latest := e.version("s", ""); latest.SnapStart.OptimizationStatus != function.OptimizationOff {
		t.Fatalf("$LATEST shows OptimizationStatus %s", latest.SnapStart.OptimizationStatus)
	}
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: "restored", Function: "s", Qualifier: "1"}); err != nil {
		t.Fatal(err)
	}
	if req := requestIn(t, &host.fakeHost, "restored"); !req.Function.SnapStart.On() || req.Function.RevisionID != v.RevisionID {
		t.Fatalf("the host was asked to run SnapStart %+v revision %s", req.Function.SnapStart, req.Function.RevisionID)
	}
	if got := host.snapshotCalls(); !slices.Equal(got, []string{"s:1 provided.al2023"}) {
		t.Fatalf("PrepareVersion calls %q, want one for s:1", got)
	}
}

func TestSnapStartFailuresFailTheVersion(t *testing.T) {
	cases := []struct {
		name       string
		err        error
		code       string
		reason     string
		notVisible string
	}{
		{"init", fmt.Errorf("Runtime.ExitError: exit status 3: %w", function.ErrInitFailed), "FunctionError", "Runtime.ExitError: exit status 3", ""},
		{"runtime", fmt.Errorf("no interpreter: %w", errdefs.ErrInvalidRuntime), "InvalidRuntime", "no interpreter", ""},
		{"config", errdefs.Invalid("ephemeral storage too large to snapshot"), "InvalidConfiguration", "ephemeral storage too large to snapshot", ""},
		{"internal", errors.New("/var/lib/invokex/snap: disk on fire"), "InternalError", "An internal error occurred while creating the SnapStart snapshot.", "disk on fire"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			host := &snapHost{fail: c.err}
			e := newEnv(t, func(cfg *Config) { cfg.Hosts = []harness.Host{host} })
			e.createSnap("s")
			e.publish("s", nil)
			waitFor(t, "the version to fail", func() bool { return e.version("s", "1").State == function.StateFailed })
			got := e.version("s", "1")
			if got.StateReasonCode != c.code || got.StateReason != c.reason || got.SnapStart.On() {
				t.Fatalf("failed version: %q %q SnapStart %+v; want %q %q", got.StateReasonCode, got.StateReason, got.SnapStart, c.code, c.reason)
			}
			if c.notVisible != "" && strings.Contains(got.StateReason, c.notVisible) {
				t.Fatalf("StateReason shows an internal error: %q", got.StateReason)
			}
			_, _, err := e.svc.Invoke(context.Background(), &InvokeInput{Function: "s", Qualifier: "1"})
			wantKind(t, err, errdefs.ErrNotReady, "Failed")
		})
	}
}

func TestSnapStartNeedsEveryHost(t *testing.T) {
	snap := &snapHost{}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{snap, &fakeHost{}} })
	e.createSnap("s")
	v := e.publish("s", nil)
	if v.State != function.StateActive || v.SnapStart.On() {
		t.Fatalf("with a host that cannot snapshot: State %s SnapStart %+v, want Active/Off", v.State, v.SnapStart)
	}
	if got := snap.snapshotCalls(); len(got) != 0 {
		t.Fatalf("PrepareVersion called %q", got)
	}
}

func TestPendingVersionResumesAfterRestart(t *testing.T) {
	st, bl := newBackends(t)
	start := func(host harness.Host) *Service {
		t.Helper()
		svc, err := New(Config{Store: st, Blobs: bl, Hosts: []harness.Host{host},
			Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), DetectRuntimes: testRuntimes})
		if err != nil {
			t.Fatal(err)
		}
		if err := svc.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		return svc
	}
	closeSvc := func(svc *Service) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := svc.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	}
	ctx := context.Background()

	// The first run's host is going away: the version stays Pending.
	first := &snapHost{fail: fmt.Errorf("harness is shutting down: %w", errdefs.ErrUnavailable)}
	svc := start(first)
	if _, err := svc.CreateFunction(ctx, &function.Config{Name: "s", Runtime: "provided.al2023",
		SnapStart: function.SnapStart{ApplyOn: function.SnapStartPublishedVersions}}, bootstrapZip(t, "s")); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.PublishVersion(ctx, "s", nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the first snapshot attempt", func() bool { return len(first.snapshotCalls()) == 1 })
	closeSvc(svc) // waits for the attempt to settle
	v, err := st.Versions().Get(ctx, "s", "1")
	if err != nil || v.State != function.StatePending {
		t.Fatalf("after an interrupted preparation: %+v, %v; want Pending", v, err)
	}

	second := &snapHost{}
	svc = start(second)
	defer closeSvc(svc)
	waitFor(t, "the resumed version to become Active", func() bool {
		v, err := svc.GetFunctionVersion(ctx, "s", "1")
		return err == nil && v.State == function.StateActive && v.SnapStart.On()
	})
	if got := second.snapshotCalls(); !slices.Equal(got, []string{"s:1 provided.al2023"}) {
		t.Fatalf("second run's PrepareVersion calls %q", got)
	}
}

func TestCloseLeavesAVersionBeingPreparedPending(t *testing.T) {
	host := &snapHost{gate: make(chan struct{})} // never opened
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	e.createSnap("s")
	e.publish("s", nil)
	waitFor(t, "PrepareVersion to start", func() bool { return len(host.snapshotCalls()) == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.svc.Close(ctx); err != nil {
		t.Fatal(err)
	}
	v, err := e.store.Versions().Get(context.Background(), "s", "1")
	if err != nil || v.State != function.StatePending {
		t.Fatalf("after Close: %+v, %v; want Pending", v, err)
	}
}

func TestVersionDeletedWhilePendingIsRetiredAgain(t *testing.T) {
	host := &snapHost{gate: make(chan struct{})}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	e.createSnap("s")
	v := e.publish("s", nil)
	waitFor(t, "PrepareVersion to start", func() bool { return len(host.snapshotCalls()) == 1 })
	if err := e.svc.DeleteFunctionVersion(context.Background(), "s", "1"); err != nil {
		t.Fatal(err)
	}
	want := []string{"s", v.RevisionID}
	count := func() int {
		n := 0
		for _, c := range host.revisionCalls() {
			if slices.Equal(c, want) {
				n++
			}
		}
		return n
	}
	if n := count(); n != 1 {
		t.Fatalf("deleting the version retired its revision %d times, want 1", n)
	}
	close(host.gate) // the snapshot completes after the deletion
	waitFor(t, "the late snapshot to be retired", func() bool { return count() == 2 })
}

// TestConcurrentPublishesAndInvokes checks under -race that publishing,
// settling and invoking versions share the cache safely.
func TestConcurrentPublishesAndInvokes(t *testing.T) {
	host := &snapHost{}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	ctx := context.Background()
	e.createSnap("s")
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for k := range 3 {
				if _, err := e.svc.UpdateFunctionConfiguration(ctx, "s", &ConfigUpdate{Description: ptr(fmt.Sprintf("%d-%d", i, k))}, ""); err != nil {
					t.Errorf("update: %v", err)
					return
				}
				if _, err := e.svc.PublishVersion(ctx, "s", nil); err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				_, _, _ = e.svc.Invoke(ctx, &InvokeInput{Function: "s", Qualifier: "1"})
			}
		})
	}
	wg.Wait()
	vs, _, err := e.svc.ListVersionsByFunction(ctx, "s", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	// Each publish follows an update, but another writer's update may
	// land in between, so 1 to 12 versions exist, numbered without gaps.
	if len(vs) < 2 || len(vs) > 13 {
		t.Fatalf("%d configurations listed, want $LATEST and 1 to 12 versions", len(vs))
	}
	for i, v := range vs[1:] {
		if v.Version != fmt.Sprint(i+1) {
			t.Fatalf("version %d is numbered %s: numbers must be 1..n in order", i+1, v.Version)
		}
	}
	waitFor(t, "every version to settle", func() bool {
		vs, _, err := e.svc.ListVersionsByFunction(ctx, "s", "", 100)
		if err != nil {
			return false
		}
		for _, v := range vs {
			if v.State != function.StateActive {
				return false
			}
		}
		return true
	})
}
