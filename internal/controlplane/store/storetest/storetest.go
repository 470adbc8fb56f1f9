// Package storetest is the conformance suite of store.Store: every
// implementation (SQLite now, PostgreSQL later) runs Run from its own tests,
// so they all keep the same contract.
//
// Beyond what store.go states, the suite pins down these details:
//   - times round-trip to the nanosecond and come back in UTC; the zero time
//     round-trips as the zero time;
//   - a nil and an empty map or slice are equal (no caller may rely on the
//     difference);
//   - Queue.Claim on events with equal NotBefore returns them by EnqueuedAt;
//   - Queue.Enqueue of a RequestID already queued is ErrAlreadyExists and
//     fails the whole batch; Queue.Retry of an unknown event is ErrNotFound;
//   - Invocations.DeleteBefore removes records with End strictly before t,
//     and keeps records whose End is zero (not ended);
//   - a cancelled context makes a write fail without effect;
//   - Versions.Get of a qualifier that is not a version number ($LATEST, an
//     alias name) is ErrNotFound, like a number that was never published.
package storetest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
)

// Run runs the suite. newStore must return a new, empty store for each call
// and may register its own cleanup with t.Cleanup; the suite closes every
// store it gets (Close is idempotent).
func Run(t *testing.T, newStore func(t *testing.T) store.Store) {
	open := func(t *testing.T) store.Store {
		t.Helper()
		s := newStore(t)
		t.Cleanup(func() { _ = s.Close() })
		return s
	}
	groups := []struct {
		name  string
		tests []test
	}{
		{"Functions", functionTests},
		{"Versions", versionTests},
		{"Runtimes", runtimeTests},
		{"Invocations", invocationTests},
		{"Queue", queueTests},
		{"Store", storeTests},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			for _, tc := range g.tests {
				t.Run(tc.name, func(t *testing.T) {
					tc.fn(t, open(t))
				})
			}
		})
	}
}

type test struct {
	name string
	fn   func(t *testing.T, s store.Store)
}

var storeTests = []test{
	{"CloseIdempotent", testCloseIdempotent},
}

func testCloseIdempotent(t *testing.T, s store.Store) {
	if err := s.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// base is the suite's reference time: nanosecond precision, far from the
// Unix epoch and from the zero time.
var base = time.Date(2031, 5, 6, 7, 8, 9, 123456789, time.UTC)

func ctx(t *testing.T) context.Context { return t.Context() }

// cancelled returns a context that is already cancelled.
func cancelled(t *testing.T) context.Context {
	c, cancel := context.WithCancel(t.Context())
	cancel()
	return c
}

// wantKind fails t unless err wraps kind.
func wantKind(t *testing.T, err, kind error, what string) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("%s: got error %v, want one wrapping %q", what, err, kind)
	}
}

// must fails t on err.
func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// sameTime fails t unless got is want's instant, in UTC (or both are zero).
func sameTime(t *testing.T, got, want time.Time, what string) {
	t.Helper()
	if want.IsZero() {
		if !got.IsZero() {
			t.Errorf("%s: got %v, want the zero time", what, got)
		}
		return
	}
	if !got.Equal(want) {
		t.Errorf("%s: got %v, want %v", what, got.Format(time.RFC3339Nano), want.Format(time.RFC3339Nano))
	}
	if got.Location() != time.UTC {
		t.Errorf("%s: location %v, want UTC", what, got.Location())
	}
}

func ptr[T any](v T) *T { return &v }

func sameStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func sameMap(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}
