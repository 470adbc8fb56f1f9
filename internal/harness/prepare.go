package harness

import (
	"context"
	"fmt"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
)

var _ Preparer = (*Harness)(nil)

// Prepare implements Preparer: it registers cfg's revision with the
// function's pool, makes it the pool's latest and unpacks its code into the
// code cache, where the revision pins it like one that served an
// invocation. The pin goes when the revision is retired, or when the
// reaper finds it is no longer the latest and has no instance; so a
// prepared directory is neither leaked nor removed while the revision may
// still be invoked.
func (h *Harness) Prepare(ctx context.Context, cfg *function.Config) error {
	if cfg == nil || cfg.Name == "" || cfg.RevisionID == "" || cfg.CodeSha256 == "" {
		return errdefs.Invalid("preparing a revision: name, revision and code digest are required")
	}
	if err := h.enter(); err != nil {
		return err
	}
	defer h.inflight.Done()

	p := h.preparedRevision(cfg)
	if p == nil {
		return nil // already pinned
	}
	// Close cancels bgCtx; the caller may give up too.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(h.bgCtx, cancel)
	defer stop()

	dir, key, err := h.code.acquire(ctx, cfg.CodeSha256)
	if err != nil {
		return fmt.Errorf("preparing code of %s: %w", cfg.Name, err)
	}
	defer h.code.release(key)
	// The revision takes its own reference (unless it was retired
	// meanwhile, when the directory goes with ours).
	p.pinCode(cfg.RevisionID, key, h.code)
	return h.prepareDriver(ctx, cfg, dir)
}

// prepareDriver lets a driver that implements driver.Preparer make its
// own artifacts of the revision (a VM driver's disk images) at deploy
// time, so the first cold start does not build them.
func (h *Harness) prepareDriver(ctx context.Context, cfg *function.Config, codeDir string) error {
	dp, ok := h.cfg.Driver.(driver.Preparer)
	if !ok {
		return nil
	}
	rt, err := h.cfg.Runtime(ctx, cfg.Runtime)
	if err != nil {
		return fmt.Errorf("preparing %s: runtime %s: %w", cfg.Name, cfg.Runtime, err)
	}
	runtimeDir, err := h.runtimes.dirFor(ctx, rt.Family)
	if err != nil {
		return fmt.Errorf("preparing %s: runtime %s files: %w", cfg.Name, rt.ID, err)
	}
	return dp.Prepare(ctx, driver.Spec{
		Function:   cfg.Name,
		RevisionID: cfg.RevisionID,
		Runtime:    *rt,
		CodeDir:    codeDir,
		CodeSha256: cfg.CodeSha256,
		RuntimeDir: runtimeDir,
	})
}

// preparedRevision registers cfg's revision (as its pool's latest, for
// $LATEST) and returns the pool, or nil when the revision already pins its
// code.
func (h *Harness) preparedRevision(cfg *function.Config) *pool {
	for {
		p := h.poolFor(cfg.Name)
		p.mu.Lock()
		if p.dead {
			p.mu.Unlock()
			continue
		}
		rev := p.revisionLocked(cfg)
		pinned := rev.codeKey != ""
		p.mu.Unlock()
		if pinned {
			return nil
		}
		return p
	}
}
