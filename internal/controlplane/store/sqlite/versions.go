package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

// versions holds published versions. A row has every column of a function
// (functionCols, so scanFunction reads it) plus its number and the $LATEST
// revision it was published from; the function's last_version column is
// the counter that keeps numbers from being reused.
type versions struct {
	s *Store

	head, newest, bump, insert, setState, exists, del *sql.Stmt // writer
	get, list, pending                                *sql.Stmt // readers
}

func newVersions(s *Store, p *preparer) *versions {
	cols := strings.Join(functionCols, ", ")
	return &versions{
		s:      s,
		head:   p.write(`SELECT revision_id, last_version FROM functions WHERE name = ?`),
		newest: p.write(`SELECT source_revision_id, ` + cols + ` FROM versions WHERE name = ? ORDER BY number DESC LIMIT 1`),
		bump:   p.write(`UPDATE functions SET last_version = ? WHERE name = ?`),
		insert: p.write(`INSERT INTO versions (number, source_revision_id, ` + cols + `, created_at)
			VALUES (` + placeholders(len(functionCols)+3) + `)`),
		setState: p.write(`UPDATE versions SET state = ?, state_reason = ?, state_reason_code = ?, snap_start_optimization = ?
			WHERE name = ? AND number = ? AND state = ?`),
		exists: p.write(`SELECT 1 FROM versions WHERE name = ? AND number = ?`),
		del:    p.write(`DELETE FROM versions WHERE name = ? AND number = ?`),
		get:    p.read(`SELECT ` + cols + ` FROM versions WHERE name = ? AND number = ?`),
		list:   p.read(`SELECT ` + cols + ` FROM versions WHERE name = ? AND number > ? ORDER BY number LIMIT ?`),
		// The literal state lets SQLite use the partial index versions_pending.
		pending: p.read(`SELECT ` + cols + ` FROM versions WHERE state = 'Pending' ORDER BY name, number`),
	}
}

// prefixScanner scans leading columns into pre before handing the rest to
// the caller's destinations.
type prefixScanner struct {
	row rowScanner
	pre []any
}

func (p prefixScanner) Scan(dest ...any) error {
	return p.row.Scan(append(append([]any(nil), p.pre...), dest...)...)
}

// versionNumber parses a stored version's name; anything that is not a
// published version's number cannot exist.
func versionNumber(name, version string) (int64, error) {
	n, ok := function.ParseVersion(version)
	if !ok {
		return 0, fmt.Errorf("version %q of function %q: %w", version, name, errdefs.ErrNotFound)
	}
	return n, nil
}

func (v *versions) Publish(ctx context.Context, cfg *function.Config, latestRevision string) (*function.Config, bool, error) {
	if cfg == nil {
		return nil, false, errdefs.Invalid("publishing a version: no configuration")
	}
	var (
		out     *function.Config
		created bool
	)
	err := v.s.writeTx(ctx, func(tx *sql.Tx) error {
		var (
			rev  string
			last int64
		)
		err := tx.StmtContext(ctx, v.head).QueryRowContext(ctx, cfg.Name).Scan(&rev, &last)
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.ErrNotFound
		}
		if err != nil {
			return err
		}
		if rev != latestRevision {
			return fmt.Errorf("revision %q is not the current revision: %w", latestRevision, errdefs.ErrPreconditionFailed)
		}
		var source string
		prev, err := scanFunction(prefixScanner{tx.StmtContext(ctx, v.newest).QueryRowContext(ctx, cfg.Name), []any{&source}})
		switch {
		case err == nil && source == latestRevision:
			out = prev // $LATEST is unchanged since prev was published
			return nil
		case err != nil && !errors.Is(err, sql.ErrNoRows):
			return err
		}
		if last >= function.MaxVersion {
			return errdefs.Invalid("function %s has published its last possible version", cfg.Name)
		}
		next := cfg.Clone()
		next.Version = strconv.FormatInt(last+1, 10)
		next.LastModified = next.LastModified.UTC() // as a Get would return it
		args, err := functionArgs(next)
		if err != nil {
			return err
		}
		if _, err := tx.StmtContext(ctx, v.bump).ExecContext(ctx, last+1, cfg.Name); err != nil {
			return err
		}
		row := append([]any{last + 1, latestRevision}, args...)
		if _, err := tx.StmtContext(ctx, v.insert).ExecContext(ctx, append(row, time.Now().UnixNano())...); err != nil {
			return err
		}
		out, created = next, true
		return nil
	})
	if err != nil {
		return nil, false, fmt.Errorf("publishing a version of function %q: %w", cfg.Name, err)
	}
	return out, created, nil
}

func (v *versions) Get(ctx context.Context, name, version string) (*function.Config, error) {
	if err := v.s.check(); err != nil {
		return nil, err
	}
	n, err := versionNumber(name, version)
	if err != nil {
		return nil, err
	}
	cfg, err := scanFunction(v.get.QueryRowContext(ctx, name, n))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("version %s of function %q: %w", version, name, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting version %s of function %q: %w", version, name, err)
	}
	return cfg, nil
}

// List pages by number: the marker is the last number of the previous page.
func (v *versions) List(ctx context.Context, name, marker string, max int) ([]*function.Config, string, error) {
	if max <= 0 {
		return nil, "", errdefs.Invalid("listing versions: max items %d must be positive", max)
	}
	if err := v.s.check(); err != nil {
		return nil, "", err
	}
	var after int64
	if marker != "" {
		n, ok := function.ParseVersion(marker)
		if !ok {
			return nil, "", errdefs.Invalid("listing versions: marker %q is not one this store returned", truncateMarker(marker))
		}
		after = n
	}
	limit := int64(max)
	if limit < math.MaxInt64 {
		limit++ // one more tells whether a next page exists
	}
	rows, err := v.list.QueryContext(ctx, name, after, limit)
	if err != nil {
		return nil, "", fmt.Errorf("listing versions of %q: %w", name, err)
	}
	out, err := scanFunctions(rows)
	if err != nil {
		return nil, "", fmt.Errorf("listing versions of %q: %w", name, err)
	}
	if len(out) > max {
		out = out[:max]
		return out, out[max-1].Version, nil
	}
	return out, "", nil
}

func truncateMarker(m string) string {
	if len(m) > 64 {
		return m[:64] + "..."
	}
	return m
}

// scanFunctions reads every row and closes rows.
func scanFunctions(rows *sql.Rows) ([]*function.Config, error) {
	defer rows.Close()
	var out []*function.Config
	for rows.Next() {
		cfg, err := scanFunction(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, cfg)
	}
	return out, rows.Err()
}

func (v *versions) SetState(ctx context.Context, cfg *function.Config, from function.State) error {
	if cfg == nil {
		return errdefs.Invalid("setting a version's state: no configuration")
	}
	n, err := versionNumber(cfg.Name, cfg.Version)
	if err != nil {
		return err
	}
	err = v.s.writeTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.StmtContext(ctx, v.setState).ExecContext(ctx, string(cfg.State), cfg.StateReason,
			cfg.StateReasonCode, string(cfg.SnapStart.OptimizationStatus), cfg.Name, n, string(from))
		if err != nil {
			return err
		}
		if k, err := res.RowsAffected(); err != nil || k > 0 {
			return err
		}
		// Nothing matched: the version is gone or not in state from. The
		// transaction holds the write lock, so the answer is current.
		var one int
		err = tx.StmtContext(ctx, v.exists).QueryRowContext(ctx, cfg.Name, n).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.ErrNotFound
		}
		if err != nil {
			return err
		}
		return fmt.Errorf("version is not %s: %w", from, errdefs.ErrPreconditionFailed)
	})
	if err != nil {
		return fmt.Errorf("setting the state of version %s of function %q: %w", cfg.Version, cfg.Name, err)
	}
	return nil
}

func (v *versions) Delete(ctx context.Context, name, version string) error {
	if err := v.s.check(); err != nil {
		return err
	}
	n, err := versionNumber(name, version)
	if err != nil {
		return err
	}
	res, err := v.del.ExecContext(ctx, name, n)
	if err != nil {
		return fmt.Errorf("deleting version %s of function %q: %w", version, name, err)
	}
	if k, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("deleting version %s of function %q: %w", version, name, err)
	} else if k == 0 {
		return fmt.Errorf("version %s of function %q: %w", version, name, errdefs.ErrNotFound)
	}
	return nil
}

func (v *versions) ListPending(ctx context.Context) ([]*function.Config, error) {
	if err := v.s.check(); err != nil {
		return nil, err
	}
	rows, err := v.pending.QueryContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing pending versions: %w", err)
	}
	out, err := scanFunctions(rows)
	if err != nil {
		return nil, fmt.Errorf("listing pending versions: %w", err)
	}
	return out, nil
}
