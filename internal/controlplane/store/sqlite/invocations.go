package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/invocation"
)

var invocationCols = []string{
	"request_id", "function", "revision_id", "version", "type", "status", "error_type",
	"error_message", "attempts", "cold", "start_at", "end_at", "init_duration", "duration",
	"max_memory_mb", "log", "log_bytes",
}

// deleteChunk bounds the rows one retention transaction removes, so that a
// large purge does not hold the write lock against enqueues for long.
const deleteChunk = 1000

// invocations holds invocation records.
type invocations struct {
	s *Store

	put, deleteBefore *sql.Stmt // writer
	get, list         *sql.Stmt // readers
}

func newInvocations(s *Store, p *preparer) *invocations {
	cols := strings.Join(invocationCols, ", ")
	return &invocations{
		s: s,
		put: p.write(`INSERT INTO invocations (` + cols + `) VALUES (` + placeholders(len(invocationCols)) + `)
			ON CONFLICT (request_id) DO UPDATE SET ` + upsertSet(invocationCols, "request_id")),
		// end_at <> zeroTime: a record without an End has not ended.
		deleteBefore: p.write(`DELETE FROM invocations WHERE rowid IN (
			SELECT rowid FROM invocations WHERE end_at < ? AND end_at <> ? LIMIT ?)`),
		get: p.read(`SELECT ` + cols + ` FROM invocations WHERE request_id = ?`),
		list: p.read(`SELECT ` + cols + ` FROM invocations WHERE function = ? AND start_at < ?
			ORDER BY start_at DESC, request_id DESC LIMIT ?`),
	}
}

func invocationArgs(r *invocation.Record) ([]any, error) {
	start, err := encTime(r.Start)
	if err != nil {
		return nil, fmt.Errorf("start: %w", err)
	}
	end, err := encTime(r.End)
	if err != nil {
		return nil, fmt.Errorf("end: %w", err)
	}
	return []any{
		r.RequestID, r.Function, r.RevisionID, r.Version, string(r.Type), string(r.Status), r.ErrorType,
		r.ErrorMessage, r.Attempts, r.Cold, start, end, int64(r.InitDuration), int64(r.Duration),
		r.MaxMemoryMB, r.Log, r.LogBytes,
	}, nil
}

func scanInvocation(row rowScanner) (*invocation.Record, error) {
	var (
		r            invocation.Record
		typ, status  string
		start, end   int64
		initDur, dur int64
	)
	if err := row.Scan(&r.RequestID, &r.Function, &r.RevisionID, &r.Version, &typ, &status, &r.ErrorType,
		&r.ErrorMessage, &r.Attempts, &r.Cold, &start, &end, &initDur, &dur,
		&r.MaxMemoryMB, &r.Log, &r.LogBytes); err != nil {
		return nil, err
	}
	r.Type = invocation.Type(typ)
	r.Status = invocation.Status(status)
	r.Start = decTime(start)
	r.End = decTime(end)
	r.InitDuration = time.Duration(initDur)
	r.Duration = time.Duration(dur)
	return &r, nil
}

// Put upserts recs in one transaction through one prepared statement.
func (iv *invocations) Put(ctx context.Context, recs []*invocation.Record) error {
	if len(recs) == 0 {
		return iv.s.check()
	}
	args := make([][]any, len(recs))
	for i, r := range recs {
		if r == nil {
			return errdefs.Invalid("putting invocation records: record %d is nil", i)
		}
		a, err := invocationArgs(r)
		if err != nil {
			return fmt.Errorf("putting invocation %s: %w", r.RequestID, err)
		}
		args[i] = a
	}
	err := iv.s.writeTx(ctx, func(tx *sql.Tx) error {
		st := tx.StmtContext(ctx, iv.put)
		defer st.Close()
		for i, a := range args {
			if _, err := st.ExecContext(ctx, a...); err != nil {
				return fmt.Errorf("invocation %s: %w", recs[i].RequestID, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("putting %d invocation records: %w", len(recs), err)
	}
	return nil
}

func (iv *invocations) Get(ctx context.Context, requestID string) (*invocation.Record, error) {
	if err := iv.s.check(); err != nil {
		return nil, err
	}
	r, err := scanInvocation(iv.get.QueryRowContext(ctx, requestID))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("invocation %s: %w", requestID, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting invocation %s: %w", requestID, err)
	}
	return r, nil
}

// ListByFunction pages back by Start; records that share a Start with the
// last one of a page are not on the next page, so callers page with the
// oldest Start they saw.
func (iv *invocations) ListByFunction(ctx context.Context, fn string, before time.Time, limit int) ([]*invocation.Record, error) {
	if limit <= 0 {
		return nil, errdefs.Invalid("listing invocations of %q: limit %d must be positive", fn, limit)
	}
	if err := iv.s.check(); err != nil {
		return nil, err
	}
	bound := int64(math.MaxInt64) // zero before: no upper bound
	if !before.IsZero() {
		var err error
		if bound, err = encTime(before); err != nil {
			return nil, fmt.Errorf("listing invocations of %q: %w", fn, err)
		}
	}
	rows, err := iv.list.QueryContext(ctx, fn, bound, limit)
	if err != nil {
		return nil, fmt.Errorf("listing invocations of %q: %w", fn, err)
	}
	defer rows.Close()
	var out []*invocation.Record
	for rows.Next() {
		r, err := scanInvocation(rows)
		if err != nil {
			return nil, fmt.Errorf("listing invocations of %q: %w", fn, err)
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing invocations of %q: %w", fn, err)
	}
	return out, nil
}

// DeleteBefore deletes in chunks, each its own transaction, so writers such
// as Enqueue interleave with a long purge. Records whose End is zero have not
// ended and are kept.
func (iv *invocations) DeleteBefore(ctx context.Context, t time.Time) (int64, error) {
	bound, err := encTime(t)
	if err != nil {
		return 0, fmt.Errorf("deleting invocations: %w", err)
	}
	var total int64
	for {
		if err := iv.s.check(); err != nil {
			return total, err
		}
		res, err := iv.deleteBefore.ExecContext(ctx, bound, int64(zeroTime), deleteChunk)
		if err != nil {
			return total, fmt.Errorf("deleting invocations ended before %s: %w", t.UTC().Format(time.RFC3339), err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, fmt.Errorf("deleting invocations ended before %s: %w", t.UTC().Format(time.RFC3339), err)
		}
		total += n
		if n < deleteChunk {
			return total, nil
		}
	}
}
