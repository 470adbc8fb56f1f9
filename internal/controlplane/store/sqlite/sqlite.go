// Package sqlite implements store.Store on an embedded SQLite database
// (modernc.org/sqlite, pure Go), the control plane's store when InvokeX runs
// as one binary.
//
// SQLite has one writer at a time, so a Store owns exactly one write
// connection (every write goes through it, in order, and no two writes of
// this process ever contend for the database lock) and a pool of read
// connections that run in parallel with it thanks to WAL mode. Write
// transactions begin IMMEDIATE, so a second process on the same file waits on
// busy_timeout instead of failing a lock upgrade half way through.
//
// The schema is versioned with goose; migrations/ is embedded in the binary
// and applied by Open.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pressly/goose/v3"
	sqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// busyTimeout bounds how long a connection waits for a lock held by another
// process before it fails with SQLITE_BUSY.
const busyTimeout = 5 * time.Second

// Store is a store.Store on one SQLite database file. It is safe for
// concurrent use; Close releases it.
type Store struct {
	w *sql.DB // exactly one connection: SQLite's single writer
	r *sql.DB // read-only pool

	functions   *functions
	versions    *versions
	runtimes    *runtimeStore
	invocations *invocations
	queue       *queue

	stmts     []*sql.Stmt
	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

var (
	_ store.Store       = (*Store)(nil)
	_ store.Functions   = (*functions)(nil)
	_ store.Versions    = (*versions)(nil)
	_ store.Runtimes    = (*runtimeStore)(nil)
	_ store.Invocations = (*invocations)(nil)
	_ store.Queue       = (*queue)(nil)
)

// Open opens (creating if needed) the database file at path, and its parent
// directory, and migrates it to the newest schema. path must name a file:
// ":memory:" cannot work because the read pool and the writer are separate
// connections. The caller must Close the Store.
func Open(ctx context.Context, path string) (_ *Store, retErr error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") || strings.ContainsRune(path, '?') {
		return nil, errdefs.Invalid("sqlite database path %q must be a plain file path", path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("creating database directory: %w", err)
	}
	s := &Store{}
	defer func() {
		if retErr != nil {
			s.Close()
		}
	}()

	var err error
	s.w, err = sql.Open("sqlite", path+"?"+dsnParams(false))
	if err != nil {
		return nil, fmt.Errorf("opening sqlite writer %s: %w", path, err)
	}
	s.w.SetMaxOpenConns(1)
	s.w.SetMaxIdleConns(1)
	s.w.SetConnMaxLifetime(0)
	s.w.SetConnMaxIdleTime(0)

	// The writer's first connection sets journal_mode=WAL, which persists in
	// the file; check it took, since without WAL readers block the writer.
	var mode string
	if err := s.w.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return nil, fmt.Errorf("opening sqlite database %s: %w", path, err)
	}
	if !strings.EqualFold(mode, "wal") {
		return nil, fmt.Errorf("sqlite database %s: journal mode is %q, want wal", path, mode)
	}
	if err := migrate(ctx, s.w); err != nil {
		return nil, fmt.Errorf("migrating sqlite database %s: %w", path, err)
	}

	s.r, err = sql.Open("sqlite", path+"?"+dsnParams(true))
	if err != nil {
		return nil, fmt.Errorf("opening sqlite readers %s: %w", path, err)
	}
	readers := max(4, runtime.NumCPU())
	s.r.SetMaxOpenConns(readers)
	s.r.SetMaxIdleConns(readers)
	s.r.SetConnMaxLifetime(0)
	s.r.SetConnMaxIdleTime(0)

	p := &preparer{ctx: ctx, s: s}
	s.functions = newFunctions(s, p)
	s.versions = newVersions(s, p)
	s.runtimes = newRuntimes(s, p)
	s.invocations = newInvocations(s, p)
	s.queue = newQueue(s, p)
	if p.err != nil {
		return nil, fmt.Errorf("preparing statements for %s: %w", path, p.err)
	}
	return s, nil
}

// dsnParams returns the driver's query parameters for the writer or for a
// reader connection.
func dsnParams(readOnly bool) string {
	v := url.Values{}
	v.Add("_pragma", fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()))
	v.Add("_pragma", "foreign_keys(ON)")
	if readOnly {
		v.Add("_pragma", "query_only(ON)")
	} else {
		v.Add("_pragma", "journal_mode(WAL)")
		// NORMAL in WAL mode is durable against process crashes and loses
		// at most the last commits on power loss, never consistency.
		v.Add("_pragma", "synchronous(NORMAL)")
		v.Set("_txlock", "immediate")
	}
	return v.Encode()
}

// migrate applies the embedded migrations that the database lacks.
func migrate(ctx context.Context, db *sql.DB) error {
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return err
	}
	p, err := goose.NewProvider(goose.DialectSQLite3, db, sub, goose.WithDisableGlobalRegistry(true))
	if err != nil {
		return err
	}
	_, err = p.Up(ctx)
	return err
}

// Functions returns the applications DB.
func (s *Store) Functions() store.Functions { return s.functions }

// Versions returns the published function versions.
func (s *Store) Versions() store.Versions { return s.versions }

// Runtimes returns the runtimes DB.
func (s *Store) Runtimes() store.Runtimes { return s.runtimes }

// Invocations returns the invocation records.
func (s *Store) Invocations() store.Invocations { return s.invocations }

// Queue returns the async event queue.
func (s *Store) Queue() store.Queue { return s.queue }

// Close closes the database. It is idempotent; calls after the first return
// the first call's result. Methods called after Close fail with
// errdefs.ErrUnavailable.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		var errs []error
		for _, st := range s.stmts {
			errs = append(errs, st.Close())
		}
		if s.r != nil {
			errs = append(errs, s.r.Close())
		}
		if s.w != nil {
			errs = append(errs, s.w.Close())
		}
		if err := errors.Join(errs...); err != nil {
			s.closeErr = fmt.Errorf("closing sqlite store: %w", err)
		}
	})
	return s.closeErr
}

var errClosed = fmt.Errorf("sqlite store is closed: %w", errdefs.ErrUnavailable)

// check fails once the store is closed, so callers get ErrUnavailable rather
// than database/sql's untyped "database is closed".
func (s *Store) check() error {
	if s.closed.Load() {
		return errClosed
	}
	return nil
}

// writeTx runs fn in one IMMEDIATE transaction on the writer and commits it.
func (s *Store) writeTx(ctx context.Context, fn func(tx *sql.Tx) error) error {
	if err := s.check(); err != nil {
		return err
	}
	tx, err := s.w.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback() // the error that matters is fn's
		return err
	}
	return tx.Commit()
}

// preparer prepares statements, remembering the first error so that
// constructors stay linear.
type preparer struct {
	ctx context.Context
	s   *Store
	err error
}

// write prepares a statement on the writer; read on the read pool.
func (p *preparer) write(query string) *sql.Stmt { return p.prepare(p.s.w, query) }
func (p *preparer) read(query string) *sql.Stmt  { return p.prepare(p.s.r, query) }

func (p *preparer) prepare(db *sql.DB, query string) *sql.Stmt {
	if p.err != nil {
		return nil
	}
	st, err := db.PrepareContext(p.ctx, query)
	if err != nil {
		p.err = fmt.Errorf("preparing %q: %w", firstLine(query), err)
		return nil
	}
	p.s.stmts = append(p.s.stmts, st)
	return st
}

func firstLine(q string) string {
	q = strings.TrimSpace(q)
	if i := strings.IndexByte(q, '\n'); i >= 0 {
		return q[:i]
	}
	return q
}

// Times are stored as Unix nanoseconds. The zero time.Time has no Unix
// nanosecond value, so it is stored as the smallest int64: it round-trips
// exactly and still sorts before every real time, as it does in Go.
const zeroTime = math.MinInt64

var (
	minTime = time.Unix(0, math.MinInt64+1)
	maxTime = time.Unix(0, math.MaxInt64)
)

// encTime encodes t; times that int64 nanoseconds cannot hold (before 1678 or
// after 2262) are ErrInvalidParameter.
func encTime(t time.Time) (int64, error) {
	if t.IsZero() {
		return zeroTime, nil
	}
	if t.Before(minTime) || t.After(maxTime) {
		return 0, errdefs.Invalid("time %s is outside the storable range %s to %s",
			t.UTC().Format(time.RFC3339Nano), minTime.UTC().Format(time.RFC3339), maxTime.UTC().Format(time.RFC3339))
	}
	return t.UnixNano(), nil
}

// decTime decodes encTime's value as a UTC time.
func decTime(n int64) time.Time {
	if n == zeroTime {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

// isConstraint reports whether err is an SQLite constraint violation
// (duplicate primary key and the like).
func isConstraint(err error) bool {
	var se *sqlite.Error
	return errors.As(err, &se) && se.Code()&0xff == sqlite3.SQLITE_CONSTRAINT
}

// rowScanner is what *sql.Row and *sql.Rows have in common.
type rowScanner interface {
	Scan(dest ...any) error
}

// placeholders returns "?, ?, ..., ?" with n marks.
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

// upsertSet returns "c1 = excluded.c1, ..." for every column but the key.
func upsertSet(cols []string, key string) string {
	var b strings.Builder
	for _, c := range cols {
		if c == key {
			continue
		}
		if b.Len() > 0 {
			b.WriteString(", ")
		}
		b.WriteString(c + " = excluded." + c)
	}
	return b.String()
}
