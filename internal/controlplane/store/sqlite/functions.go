package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

// functionCols are the columns of a function.Config, in the order of
// functionArgs and scanFunction.
var functionCols = []string{
	"name", "runtime", "handler", "role", "description", "timeout", "memory_size",
	"ephemeral_storage", "environment", "architectures", "tags", "code_sha256", "code_size",
	"revision_id", "version", "state", "state_reason", "state_reason_code",
	"last_update_status", "last_update_status_reason", "last_modified", "reserved_concurrency",
	"snap_start_apply_on", "snap_start_optimization",
}

// functions is the applications DB. Deleting a row deletes its versions
// through the versions table's ON DELETE CASCADE (every connection enables
// foreign keys).
type functions struct {
	s *Store

	create, update, exists, del *sql.Stmt // writer
	get, list, codeInUse        *sql.Stmt // readers
}

func newFunctions(s *Store, p *preparer) *functions {
	cols := strings.Join(functionCols, ", ")
	var set strings.Builder
	for _, c := range functionCols[1:] {
		set.WriteString(c + " = ?, ")
	}
	return &functions{
		s: s,
		create: p.write(`INSERT INTO functions (` + cols + `, created_at, updated_at)
			VALUES (` + placeholders(len(functionCols)+2) + `) ON CONFLICT (name) DO NOTHING`),
		update: p.write(`UPDATE functions SET ` + set.String() + `updated_at = ?
			WHERE name = ? AND revision_id = ?`),
		exists: p.write(`SELECT 1 FROM functions WHERE name = ?`),
		del:    p.write(`DELETE FROM functions WHERE name = ?`),
		get:    p.read(`SELECT ` + cols + ` FROM functions WHERE name = ?`),
		list:   p.read(`SELECT ` + cols + ` FROM functions WHERE name > ? ORDER BY name LIMIT ?`),
		codeInUse: p.read(`SELECT EXISTS (SELECT 1 FROM functions WHERE code_sha256 = ?)
			OR EXISTS (SELECT 1 FROM versions WHERE code_sha256 = ?)`),
	}
}

// functionArgs returns cfg's column values in functionCols order.
func functionArgs(cfg *function.Config) ([]any, error) {
	env, err := json.Marshal(cfg.Environment)
	if err != nil {
		return nil, fmt.Errorf("encoding environment: %w", err)
	}
	archs, err := json.Marshal(cfg.Architectures)
	if err != nil {
		return nil, fmt.Errorf("encoding architectures: %w", err)
	}
	tags, err := json.Marshal(cfg.Tags)
	if err != nil {
		return nil, fmt.Errorf("encoding tags: %w", err)
	}
	modified, err := encTime(cfg.LastModified)
	if err != nil {
		return nil, fmt.Errorf("last modified: %w", err)
	}
	var reserved sql.NullInt64
	if cfg.ReservedConcurrency != nil {
		reserved = sql.NullInt64{Int64: int64(*cfg.ReservedConcurrency), Valid: true}
	}
	return []any{
		cfg.Name, cfg.Runtime, cfg.Handler, cfg.Role, cfg.Description, cfg.Timeout, cfg.MemorySize,
		cfg.EphemeralStorage, string(env), string(archs), string(tags), cfg.CodeSha256, cfg.CodeSize,
		cfg.RevisionID, cfg.Version, string(cfg.State), cfg.StateReason, cfg.StateReasonCode,
		string(cfg.LastUpdateStatus), cfg.LastUpdateStatusReason, modified, reserved,
		string(cfg.SnapStart.ApplyOn), string(cfg.SnapStart.OptimizationStatus),
	}, nil
}

func scanFunction(row rowScanner) (*function.Config, error) {
	var (
		c                   function.Config
		env, archs, tags    string
		state, updateStatus string
		applyOn, optimized  string
		modified            int64
		reserved            sql.NullInt64
	)
	err := row.Scan(&c.Name, &c.Runtime, &c.Handler, &c.Role, &c.Description, &c.Timeout, &c.MemorySize,
		&c.EphemeralStorage, &env, &archs, &tags, &c.CodeSha256, &c.CodeSize,
		&c.RevisionID, &c.Version, &state, &c.StateReason, &c.StateReasonCode,
		&updateStatus, &c.LastUpdateStatusReason, &modified, &reserved,
		&applyOn, &optimized)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(env), &c.Environment); err != nil {
		return nil, fmt.Errorf("decoding environment of %q: %w", c.Name, err)
	}
	if err := json.Unmarshal([]byte(archs), &c.Architectures); err != nil {
		return nil, fmt.Errorf("decoding architectures of %q: %w", c.Name, err)
	}
	if err := json.Unmarshal([]byte(tags), &c.Tags); err != nil {
		return nil, fmt.Errorf("decoding tags of %q: %w", c.Name, err)
	}
	c.State = function.State(state)
	c.LastUpdateStatus = function.UpdateStatus(updateStatus)
	c.LastModified = decTime(modified)
	c.SnapStart = function.SnapStart{ApplyOn: function.SnapStartApplyOn(applyOn), OptimizationStatus: function.OptimizationStatus(optimized)}
	if reserved.Valid {
		v := int(reserved.Int64)
		c.ReservedConcurrency = &v
	}
	return &c, nil
}

func (f *functions) Create(ctx context.Context, cfg *function.Config) error {
	if cfg == nil {
		return errdefs.Invalid("creating function: no configuration")
	}
	if err := f.s.check(); err != nil {
		return err
	}
	args, err := functionArgs(cfg)
	if err != nil {
		return fmt.Errorf("creating function %q: %w", cfg.Name, err)
	}
	now := time.Now().UnixNano()
	res, err := f.create.ExecContext(ctx, append(args, now, now)...)
	if err != nil {
		return fmt.Errorf("creating function %q: %w", cfg.Name, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("creating function %q: %w", cfg.Name, err)
	} else if n == 0 {
		return fmt.Errorf("function %q: %w", cfg.Name, errdefs.ErrAlreadyExists)
	}
	return nil
}

func (f *functions) Get(ctx context.Context, name string) (*function.Config, error) {
	if err := f.s.check(); err != nil {
		return nil, err
	}
	cfg, err := scanFunction(f.get.QueryRowContext(ctx, name))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("function %q: %w", name, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting function %q: %w", name, err)
	}
	return cfg, nil
}

// List pages by name: the marker is the last name of the previous page.
func (f *functions) List(ctx context.Context, marker string, max int) ([]*function.Config, string, error) {
	if max <= 0 {
		return nil, "", errdefs.Invalid("listing functions: max items %d must be positive", max)
	}
	if err := f.s.check(); err != nil {
		return nil, "", err
	}
	// One row more than asked tells whether a next page exists, so the last
	// page ends with marker "" rather than with an empty page.
	limit := int64(max)
	if limit < math.MaxInt64 {
		limit++
	}
	rows, err := f.list.QueryContext(ctx, marker, limit)
	if err != nil {
		return nil, "", fmt.Errorf("listing functions: %w", err)
	}
	defer rows.Close()
	var out []*function.Config
	for rows.Next() {
		cfg, err := scanFunction(rows)
		if err != nil {
			return nil, "", fmt.Errorf("listing functions: %w", err)
		}
		out = append(out, cfg)
	}
	if err := rows.Err(); err != nil {
		return nil, "", fmt.Errorf("listing functions: %w", err)
	}
	if len(out) > max {
		out = out[:max]
		return out, out[max-1].Name, nil
	}
	return out, "", nil
}

func (f *functions) Update(ctx context.Context, cfg *function.Config, expectedRevision string) error {
	if cfg == nil {
		return errdefs.Invalid("updating function: no configuration")
	}
	args, err := functionArgs(cfg)
	if err != nil {
		return fmt.Errorf("updating function %q: %w", cfg.Name, err)
	}
	// SET takes every column but the name, then updated_at; WHERE takes the
	// name and the expected revision.
	args = append(args[1:], time.Now().UnixNano(), cfg.Name, expectedRevision)
	err = f.s.writeTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.StmtContext(ctx, f.update).ExecContext(ctx, args...)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		if err != nil || n > 0 {
			return err
		}
		// Nothing matched: the function is gone or its revision moved on.
		// The transaction holds the write lock, so the answer is current.
		var one int
		err = tx.StmtContext(ctx, f.exists).QueryRowContext(ctx, cfg.Name).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return errdefs.ErrNotFound
		}
		if err != nil {
			return err
		}
		return fmt.Errorf("revision %q is not the current revision: %w", expectedRevision, errdefs.ErrPreconditionFailed)
	})
	if err != nil {
		return fmt.Errorf("updating function %q: %w", cfg.Name, err)
	}
	return nil
}

func (f *functions) Delete(ctx context.Context, name string) error {
	if err := f.s.check(); err != nil {
		return err
	}
	res, err := f.del.ExecContext(ctx, name)
	if err != nil {
		return fmt.Errorf("deleting function %q: %w", name, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("deleting function %q: %w", name, err)
	} else if n == 0 {
		return fmt.Errorf("function %q: %w", name, errdefs.ErrNotFound)
	}
	return nil
}

func (f *functions) CodeInUse(ctx context.Context, codeSha256 string) (bool, error) {
	if err := f.s.check(); err != nil {
		return false, err
	}
	var used bool
	if err := f.codeInUse.QueryRowContext(ctx, codeSha256, codeSha256).Scan(&used); err != nil {
		return false, fmt.Errorf("checking use of code %s: %w", codeSha256, err)
	}
	return used, nil
}
