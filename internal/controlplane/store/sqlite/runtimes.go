package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

var runtimeCols = []string{
	"id", "family", "available", "reason", "interpreter", "bootstrap",
	"handler_format", "default_handler", "execution_env",
}

// runtimeStore is the runtimes DB.
type runtimeStore struct {
	s *Store

	put       *sql.Stmt // writer
	get, list *sql.Stmt // readers
}

func newRuntimes(s *Store, p *preparer) *runtimeStore {
	cols := strings.Join(runtimeCols, ", ")
	return &runtimeStore{
		s: s,
		put: p.write(`INSERT INTO runtimes (` + cols + `) VALUES (` + placeholders(len(runtimeCols)) + `)
			ON CONFLICT (id) DO UPDATE SET ` + upsertSet(runtimeCols, "id")),
		get:  p.read(`SELECT ` + cols + ` FROM runtimes WHERE id = ?`),
		list: p.read(`SELECT ` + cols + ` FROM runtimes ORDER BY id`),
	}
}

func scanRuntime(row rowScanner) (*runtimes.Runtime, error) {
	var (
		rt        runtimes.Runtime
		family    string
		bootstrap string
	)
	if err := row.Scan(&rt.ID, &family, &rt.Available, &rt.Reason, &rt.Interpreter, &bootstrap,
		&rt.HandlerFormat, &rt.DefaultHandler, &rt.ExecutionEnv); err != nil {
		return nil, err
	}
	rt.Family = runtimes.Family(family)
	if err := json.Unmarshal([]byte(bootstrap), &rt.Bootstrap); err != nil {
		return nil, fmt.Errorf("decoding bootstrap of runtime %q: %w", rt.ID, err)
	}
	return &rt, nil
}

func (r *runtimeStore) Put(ctx context.Context, rt *runtimes.Runtime) error {
	if rt == nil {
		return errdefs.Invalid("putting runtime: no runtime")
	}
	if err := r.s.check(); err != nil {
		return err
	}
	bootstrap, err := json.Marshal(rt.Bootstrap)
	if err != nil {
		return fmt.Errorf("encoding bootstrap of runtime %q: %w", rt.ID, err)
	}
	_, err = r.put.ExecContext(ctx, rt.ID, string(rt.Family), rt.Available, rt.Reason, rt.Interpreter,
		string(bootstrap), rt.HandlerFormat, rt.DefaultHandler, rt.ExecutionEnv)
	if err != nil {
		return fmt.Errorf("putting runtime %q: %w", rt.ID, err)
	}
	return nil
}

func (r *runtimeStore) Get(ctx context.Context, id string) (*runtimes.Runtime, error) {
	if err := r.s.check(); err != nil {
		return nil, err
	}
	rt, err := scanRuntime(r.get.QueryRowContext(ctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("runtime %q: %w", id, errdefs.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("getting runtime %q: %w", id, err)
	}
	return rt, nil
}

func (r *runtimeStore) List(ctx context.Context) ([]*runtimes.Runtime, error) {
	if err := r.s.check(); err != nil {
		return nil, err
	}
	rows, err := r.list.QueryContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing runtimes: %w", err)
	}
	defer rows.Close()
	var out []*runtimes.Runtime
	for rows.Next() {
		rt, err := scanRuntime(rows)
		if err != nil {
			return nil, fmt.Errorf("listing runtimes: %w", err)
		}
		out = append(out, rt)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("listing runtimes: %w", err)
	}
	return out, nil
}
