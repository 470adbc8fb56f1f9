package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
)

var eventCols = []string{
	"request_id", "function", "payload", "client_context", "enqueued_at", "not_before",
	"attempts", "last_error", "qualifier",
}

// queue is the durable async event queue.
//
// Each event has a due_at: the time it may next be claimed. It starts as the
// event's NotBefore; Claim moves it to the lease's expiry and Retry to the
// new NotBefore. Claim thus reads the due rows in due order from one index
// and never scans leased or backing-off events, however many there are.
// "Oldest first" means earliest due first (a zero NotBefore is due at once
// and sorts first), then earliest enqueued. A control plane that wants
// retries to interleave fairly with fresh events sets NotBefore to the
// enqueue time rather than leaving it zero.
type queue struct {
	s *Store

	insert, due, lease, complete, retry, release *sql.Stmt // writer
	count                                        *sql.Stmt // readers
}

func newQueue(s *Store, p *preparer) *queue {
	cols := strings.Join(eventCols, ", ")
	return &queue{
		s: s,
		insert: p.write(`INSERT INTO events (` + cols + `, due_at)
			VALUES (` + placeholders(len(eventCols)+1) + `)`),
		due: p.write(`SELECT ` + cols + ` FROM events WHERE due_at <= ?
			ORDER BY due_at, enqueued_at, request_id LIMIT ?`),
		lease:    p.write(`UPDATE events SET attempts = attempts + 1, lease_until = ?, due_at = ? WHERE request_id = ?`),
		complete: p.write(`DELETE FROM events WHERE request_id = ?`),
		retry: p.write(`UPDATE events SET lease_until = NULL, not_before = ?, due_at = ?, last_error = ?
			WHERE request_id = ?`),
		release: p.write(`UPDATE events SET lease_until = NULL, due_at = ? WHERE lease_until IS NOT NULL`),
		count:   p.read(`SELECT COUNT(*) FROM events`),
	}
}

// Enqueue inserts the batch in one transaction through one prepared
// statement: the control plane group-commits concurrent enqueues into one
// call, so this is the queue's throughput path. A duplicate RequestID fails
// the whole batch with ErrAlreadyExists.
func (q *queue) Enqueue(ctx context.Context, evs []*store.Event) error {
	if len(evs) == 0 {
		return q.s.check()
	}
	args := make([][]any, len(evs))
	for i, ev := range evs {
		if ev == nil {
			return errdefs.Invalid("enqueueing events: event %d is nil", i)
		}
		enq, err := encTime(ev.EnqueuedAt)
		if err != nil {
			return fmt.Errorf("enqueueing event %s: enqueued at: %w", ev.RequestID, err)
		}
		nb, err := encTime(ev.NotBefore)
		if err != nil {
			return fmt.Errorf("enqueueing event %s: not before: %w", ev.RequestID, err)
		}
		args[i] = []any{ev.RequestID, ev.Function, ev.Payload, ev.ClientContext, enq, nb,
			ev.Attempts, ev.LastError, ev.Qualifier, nb}
	}
	err := q.s.writeTx(ctx, func(tx *sql.Tx) error {
		st := tx.StmtContext(ctx, q.insert)
		defer st.Close()
		for i, a := range args {
			if _, err := st.ExecContext(ctx, a...); err != nil {
				if isConstraint(err) {
					return fmt.Errorf("event %s: %w", evs[i].RequestID, errdefs.ErrAlreadyExists)
				}
				return fmt.Errorf("event %s: %w", evs[i].RequestID, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("enqueueing %d events: %w", len(evs), err)
	}
	return nil
}

// Claim selects and leases the due events in one write transaction, so two
// claimers (in this process or another on the same file) never lease the
// same event at once.
func (q *queue) Claim(ctx context.Context, now time.Time, lease time.Duration, max int) ([]*store.Event, error) {
	if max <= 0 {
		return nil, errdefs.Invalid("claiming events: max %d must be positive", max)
	}
	if lease <= 0 {
		return nil, errdefs.Invalid("claiming events: lease %s must be positive", lease)
	}
	nowN, err := encTime(now)
	if err != nil {
		return nil, fmt.Errorf("claiming events: %w", err)
	}
	until, err := encTime(now.Add(lease))
	if err != nil {
		return nil, fmt.Errorf("claiming events: lease: %w", err)
	}
	var out []*store.Event
	err = q.s.writeTx(ctx, func(tx *sql.Tx) error {
		rows, err := tx.StmtContext(ctx, q.due).QueryContext(ctx, nowN, max)
		if err != nil {
			return err
		}
		for rows.Next() {
			ev, err := scanEvent(rows)
			if err != nil {
				rows.Close()
				return err
			}
			out = append(out, ev)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		st := tx.StmtContext(ctx, q.lease)
		defer st.Close()
		for _, ev := range out {
			if _, err := st.ExecContext(ctx, until, until, ev.RequestID); err != nil {
				return fmt.Errorf("leasing event %s: %w", ev.RequestID, err)
			}
			ev.Attempts++
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("claiming events: %w", err)
	}
	return out, nil
}

func scanEvent(row rowScanner) (*store.Event, error) {
	var (
		ev      store.Event
		enq, nb int64
	)
	if err := row.Scan(&ev.RequestID, &ev.Function, &ev.Payload, &ev.ClientContext, &enq, &nb,
		&ev.Attempts, &ev.LastError, &ev.Qualifier); err != nil {
		return nil, err
	}
	ev.EnqueuedAt = decTime(enq)
	ev.NotBefore = decTime(nb)
	return &ev, nil
}

func (q *queue) Complete(ctx context.Context, requestID string) error {
	if err := q.s.check(); err != nil {
		return err
	}
	if _, err := q.complete.ExecContext(ctx, requestID); err != nil {
		return fmt.Errorf("completing event %s: %w", requestID, err)
	}
	return nil
}

// Retry releases the event whether or not its lease is still held: the
// caller that claimed it decides. ErrNotFound if the event is gone.
func (q *queue) Retry(ctx context.Context, requestID string, notBefore time.Time, lastErr string) error {
	if err := q.s.check(); err != nil {
		return err
	}
	nb, err := encTime(notBefore)
	if err != nil {
		return fmt.Errorf("retrying event %s: %w", requestID, err)
	}
	res, err := q.retry.ExecContext(ctx, nb, nb, lastErr, requestID)
	if err != nil {
		return fmt.Errorf("retrying event %s: %w", requestID, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("retrying event %s: %w", requestID, err)
	} else if n == 0 {
		return fmt.Errorf("event %s: %w", requestID, errdefs.ErrNotFound)
	}
	return nil
}

// ReleaseLeases makes every leased event due at now.
func (q *queue) ReleaseLeases(ctx context.Context, now time.Time) (int, error) {
	if err := q.s.check(); err != nil {
		return 0, err
	}
	at, err := encTime(now)
	if err != nil {
		return 0, fmt.Errorf("releasing leases: %w", err)
	}
	res, err := q.release.ExecContext(ctx, at)
	if err != nil {
		return 0, fmt.Errorf("releasing leases: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("releasing leases: %w", err)
	}
	return int(n), nil
}

func (q *queue) Len(ctx context.Context) (int, error) {
	if err := q.s.check(); err != nil {
		return 0, err
	}
	var n int
	if err := q.count.QueryRowContext(ctx).Scan(&n); err != nil {
		return 0, fmt.Errorf("counting events: %w", err)
	}
	return n, nil
}
