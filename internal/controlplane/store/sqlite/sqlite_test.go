package sqlite_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"testing/fstest"
	"time"

	"github.com/pressly/goose/v3"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/controlplane/store/sqlite"
	"github.com/invokex/invokex/internal/controlplane/store/storetest"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

func open(t testing.TB, path string) *sqlite.Store {
	t.Helper()
	s, err := sqlite.Open(context.Background(), path)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return open(t, filepath.Join(t.TempDir(), "invokex.db"))
	})
}

func TestReopenKeepsDataAndMigrationsAreIdempotent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "dir", "invokex.db") // parents are created
	ctx := t.Context()
	s := open(t, path)
	rc := 3
	cfg := &function.Config{Name: "persist", Runtime: "python3.12", RevisionID: "r1",
		LastModified: time.Unix(0, 1_700_000_000_123_456_789).UTC(), ReservedConcurrency: &rc}
	if err := s.Functions().Create(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	if err := s.Runtimes().Put(ctx, &runtimes.Runtime{ID: "python3.12", Bootstrap: []string{"a", "b"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Queue().Enqueue(ctx, []*store.Event{{RequestID: "e1", Function: "persist"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	for i := range 2 { // reopening twice runs the migrations twice more
		s = open(t, path)
		got, err := s.Functions().Get(ctx, "persist")
		if err != nil {
			t.Fatalf("reopen %d: Get: %v", i, err)
		}
		if !got.LastModified.Equal(cfg.LastModified) || got.ReservedConcurrency == nil || *got.ReservedConcurrency != 3 {
			t.Fatalf("reopen %d: got %+v", i, got)
		}
		if rt, err := s.Runtimes().Get(ctx, "python3.12"); err != nil || len(rt.Bootstrap) != 2 {
			t.Fatalf("reopen %d: runtime %+v, %v", i, rt, err)
		}
		if n, err := s.Queue().Len(ctx); err != nil || n != 1 {
			t.Fatalf("reopen %d: Len = %d, %v; want 1", i, n, err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}

	// Exactly one version row per migration: reopening applied nothing twice.
	db := rawDB(t, path)
	var applied int
	if err := db.QueryRow(`SELECT COUNT(*) FROM goose_db_version WHERE version_id > 0`).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	files, err := os.ReadDir("migrations")
	if err != nil {
		t.Fatal(err)
	}
	if applied != len(files) {
		t.Fatalf("goose recorded %d applied migrations, want %d (one per file)", applied, len(files))
	}
}

// TestUpgradeFromInitialSchema opens a database written by the first
// schema: its functions and queued events survive, read with the new
// columns' defaults, and versions can be published at once.
func TestUpgradeFromInitialSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "old.db")
	initial, err := os.ReadFile(filepath.Join("migrations", "00001_init.sql"))
	if err != nil {
		t.Fatal(err)
	}
	db := rawDB(t, path)
	p, err := goose.NewProvider(goose.DialectSQLite3, db, fstest.MapFS{"00001_init.sql": {Data: initial}}, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Up(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Rows as the first schema's store wrote them.
	if _, err := db.Exec(`INSERT INTO functions VALUES ('old', 'python3.12', 'app.handler', '', '', 3, 128, 512,
		'null', '["x86_64"]', 'null', 'c2hh', 10, 'rev-1', '$LATEST', 'Active', '', '', 'Successful', '', 0, NULL, 0, 0)`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO events VALUES ('e1', 'old', NULL, '', 0, 0, 0, '', NULL, 0)`); err != nil {
		t.Fatal(err)
	}
	db.Close()

	ctx := t.Context()
	s := open(t, path)
	got, err := s.Functions().Get(ctx, "old")
	if err != nil {
		t.Fatal(err)
	}
	if got.RevisionID != "rev-1" || got.SnapStart != (function.SnapStart{}) {
		t.Fatalf("upgraded function: %+v", got)
	}
	v := got.Clone()
	v.RevisionID = "v-rev-1"
	pub, created, err := s.Versions().Publish(ctx, v, "rev-1")
	if err != nil || !created || pub.Version != "1" {
		t.Fatalf("Publish on an upgraded database: %+v, %v, %v", pub, created, err)
	}
	evs, err := s.Queue().Claim(ctx, time.Now(), time.Minute, 10)
	if err != nil || len(evs) != 1 || evs[0].RequestID != "e1" || evs[0].Qualifier != "" {
		t.Fatalf("Claim on an upgraded database: %+v, %v", evs, err)
	}
}

// rawDB opens the file directly, bypassing the Store, to inspect it.
func rawDB(t *testing.T, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func TestWALMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wal.db")
	open(t, path)
	var mode string
	// journal_mode=WAL is persistent: a fresh connection that sets nothing
	// sees it.
	if err := rawDB(t, path).QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if mode != "wal" {
		t.Fatalf("journal_mode = %q, want wal", mode)
	}
}

func TestOpenRejectsNonFilePaths(t *testing.T) {
	for _, p := range []string{"", ":memory:", "file:x.db", "x.db?mode=ro"} {
		s, err := sqlite.Open(t.Context(), p)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", p)
			continue
		}
		if !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("Open(%q): %v, want ErrInvalidParameter", p, err)
		}
	}
}

func TestClosedStoreIsUnavailable(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "closed.db"))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := s.Functions().Get(t.Context(), "x")
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Get after Close: %v, want ErrUnavailable", err)
	}
	err = s.Queue().Enqueue(t.Context(), []*store.Event{{RequestID: "x"}})
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Enqueue after Close: %v, want ErrUnavailable", err)
	}
}

func TestInvalidArguments(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "args.db"))
	ctx := t.Context()
	checks := map[string]error{
		"List max 0":       third(s.Functions().List(ctx, "", 0)),
		"Claim max 0":      second(s.Queue().Claim(ctx, time.Now(), time.Second, 0)),
		"Claim lease 0":    second(s.Queue().Claim(ctx, time.Now(), 0, 1)),
		"ListByFunction 0": second(s.Invocations().ListByFunction(ctx, "f", time.Time{}, 0)),
		"Create nil":       s.Functions().Create(ctx, nil),
		"time out of range": s.Functions().Create(ctx, &function.Config{Name: "old",
			LastModified: time.Date(1500, 1, 1, 0, 0, 0, 0, time.UTC)}),
		"nil event": s.Queue().Enqueue(ctx, []*store.Event{nil}),
	}
	for what, err := range checks {
		if !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: %v, want ErrInvalidParameter", what, err)
		}
	}
}

func second[T any](_ T, err error) error { return err }

func third[T, U any](_ T, _ U, err error) error { return err }

// TestTwoStoresOneFile checks that two Stores (as two processes would) share
// one database: writes of one are visible to the other, and IMMEDIATE
// transactions with busy_timeout keep their claims disjoint.
func TestTwoStoresOneFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shared.db")
	a, b := open(t, path), open(t, path)
	ctx := t.Context()
	var evs []*store.Event
	for i := range 100 {
		evs = append(evs, &store.Event{RequestID: fmt.Sprintf("e%03d", i), EnqueuedAt: time.Unix(int64(i), 0)})
	}
	if err := a.Queue().Enqueue(ctx, evs); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	now := time.Unix(1000, 0)
	for {
		ga, err := a.Queue().Claim(ctx, now, time.Hour, 9)
		if err != nil {
			t.Fatal(err)
		}
		gb, err := b.Queue().Claim(ctx, now, time.Hour, 9)
		if err != nil {
			t.Fatal(err)
		}
		if len(ga)+len(gb) == 0 {
			break
		}
		for _, e := range append(ga, gb...) {
			if seen[e.RequestID] {
				t.Fatalf("%s claimed twice", e.RequestID)
			}
			seen[e.RequestID] = true
		}
	}
	if len(seen) != 100 {
		t.Fatalf("claimed %d events, want 100", len(seen))
	}
}

// BenchmarkEnqueue measures batched enqueues, the control plane's group
// commit path; events/s is reported per batch size.
func BenchmarkEnqueue(b *testing.B) {
	for _, batch := range []int{1, 16, 128, 512} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			s := open(b, filepath.Join(b.TempDir(), "bench.db"))
			payload := make([]byte, 512)
			ctx := context.Background()
			seq := 0
			b.ResetTimer()
			for b.Loop() {
				evs := make([]*store.Event, batch)
				now := time.Now()
				for i := range evs {
					seq++
					evs[i] = &store.Event{RequestID: fmt.Sprintf("req-%09d", seq), Function: "bench",
						Payload: payload, EnqueuedAt: now, NotBefore: now}
				}
				if err := s.Queue().Enqueue(ctx, evs); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(seq)/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// BenchmarkClaimComplete measures draining a backlog: claim a batch, then
// complete each event.
func BenchmarkClaimComplete(b *testing.B) {
	s := open(b, filepath.Join(b.TempDir(), "bench.db"))
	ctx := context.Background()
	const backlog = 20000
	evs := make([]*store.Event, backlog)
	for i := range evs {
		evs[i] = &store.Event{RequestID: fmt.Sprintf("req-%09d", i), Payload: make([]byte, 256),
			EnqueuedAt: time.Unix(0, int64(i))}
	}
	if err := s.Queue().Enqueue(ctx, evs); err != nil {
		b.Fatal(err)
	}
	now := time.Unix(1, 0)
	done := 0
	b.ResetTimer()
	for b.Loop() {
		got, err := s.Queue().Claim(ctx, now, time.Hour, 32)
		if err != nil {
			b.Fatal(err)
		}
		if len(got) == 0 { // backlog drained: refill outside the timer
			b.StopTimer()
			for i := range evs {
				evs[i].RequestID = fmt.Sprintf("req-%09d-%d", i, done)
			}
			if err := s.Queue().Enqueue(ctx, evs); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			continue
		}
		for _, e := range got {
			if err := s.Queue().Complete(ctx, e.RequestID); err != nil {
				b.Fatal(err)
			}
			done++
		}
	}
	b.ReportMetric(float64(done)/b.Elapsed().Seconds(), "events/s")
}
