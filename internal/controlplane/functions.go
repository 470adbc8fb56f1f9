package controlplane

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/invokex/invokex/internal/codezip"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/runtimes"
)

// maxUpdateAttempts bounds the internal retries of an update that loses a
// compare-and-swap race to another writer (only without a caller revision).
const maxUpdateAttempts = 8

// Page sizes of ListFunctions (Lambda's MaxItems).
const (
	defaultListMax = 50
	maxListMax     = 10000
)

func errPrecondition() error {
	return fmt.Errorf("The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id: %w", errdefs.ErrPreconditionFailed)
}

func (s *Service) errFunctionNotFound(name string) error {
	return fmt.Errorf("Function not found: %s: %w", s.arn(name), errdefs.ErrNotFound)
}

// getFunction reads a function from the store (see cachedFunction for the
// cached read), translating a missing row into Lambda's
// message.
func (s *Service) getFunction(ctx context.Context, name string) (*function.Config, error) {
	cfg, err := s.store.Functions().Get(ctx, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, s.errFunctionNotFound(name)
	}
	if err != nil {
		return nil, fmt.Errorf("getting function %s: %w", name, err)
	}
	return cfg, nil
}

// runtimeFor returns the runtimes DB row of id, which must exist and be
// available on this host for creating or updating a function.
func (s *Service) runtimeFor(ctx context.Context, id string) (*runtimes.Runtime, error) {
	if id == "" {
		return nil, errdefs.Invalid("Runtime and Handler are mandatory parameters for functions created with deployment packages.")
	}
	rt, err := s.store.Runtimes().Get(ctx, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		all, lerr := s.store.Runtimes().List(ctx)
		if lerr != nil {
			return nil, fmt.Errorf("listing runtimes: %w", lerr)
		}
		ids := make([]string, 0, len(all))
		for _, r := range all {
			ids = append(ids, r.ID)
		}
		sort.Strings(ids)
		return nil, errdefs.Invalid("1 validation error detected: Value '%s' at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: [%s] or be a valid ARN", id, strings.Join(ids, ", "))
	}
	if err != nil {
		return nil, fmt.Errorf("getting runtime %s: %w", id, err)
	}
	if !rt.Available {
		return nil, errdefs.Invalid("The runtime parameter of %s is not supported for creating or updating functions on this host: %s", id, rt.Reason)
	}
	return rt, nil
}

// defaultHandler fills an empty handler: from the runtime's default, or
// "bootstrap" for provided runtimes, whose handler is informational.
func defaultHandler(rt *runtimes.Runtime, handler string) (string, error) {
	switch {
	case handler != "":
		return handler, nil
	case rt.DefaultHandler != "":
		return rt.DefaultHandler, nil
	case rt.Family == runtimes.FamilyProvided:
		return "bootstrap", nil
	}
	return "", errdefs.Invalid("Runtime and Handler are mandatory parameters for functions created with deployment packages.")
}

// checkCode verifies that the package can start under rt with handler.
func checkCode(rt *runtimes.Runtime, handler string, m *codezip.Manifest) error {
	err := runtimes.CheckCode(rt, handler, m.Lookup)
	if err == nil || errors.Is(err, errdefs.ErrInvalidParameter) {
		return err
	}
	return errdefs.Invalid("%s", err.Error())
}

// codeDigest is Lambda's CodeSha256 of a package, which is also its blob key.
func codeDigest(zip []byte) string {
	sum := sha256.Sum256(zip)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// putCode stores the package; the caller holds the digest's code lock.
func (s *Service) putCode(ctx context.Context, digest string, zip []byte) (int64, error) {
	got, size, err := s.blobs.Put(ctx, bytes.NewReader(zip))
	if err != nil {
		return 0, fmt.Errorf("storing code: %w", err)
	}
	if got != digest {
		return 0, fmt.Errorf("storing code: blob store returned digest %s, want %s", got, digest)
	}
	return size, nil
}

// collectCode deletes the blob of digest if no function or version
// references it. The
// caller must not hold the digest's code lock. Failures are logged, not
// returned: the operation that orphaned the blob has succeeded.
func (s *Service) collectCode(ctx context.Context, digest string) {
	if digest == "" {
		return
	}
	ctx = context.WithoutCancel(ctx)
	unlock := s.codeLocks.Lock(digest)
	defer unlock()
	inUse, err := s.store.Functions().CodeInUse(ctx, digest)
	if err == nil && !inUse {
		err = s.blobs.Delete(ctx, digest)
	}
	if err != nil {
		s.log.Warn("collecting unreferenced code", "code_sha256", digest, "error", err)
	}
}

// retire asks every host to stop instances of name other than keep. A
// failure is logged: the change is committed, and a host also refuses
// stale revisions on its own since requests carry the revision.
func (s *Service) retire(ctx context.Context, name, keep string) {
	ctx = context.WithoutCancel(ctx)
	for i, h := range s.cfg.Hosts {
		if err := h.Retire(ctx, name, keep); err != nil {
			s.log.Warn("retiring instances", "function", name, "keep_revision", keep, "host", i, "error", err)
		}
	}
}

// prepareTimeout bounds how long a deploy waits for its hosts to prepare
// the new revision.
const prepareTimeout = time.Minute

// prepare asks every host that can (harness.Preparer) to get cfg's revision
// ready, so that its first invocation does not pay for fetching and
// unpacking the code: Lambda does that work while a function is Pending,
// before it is Active. It is best-effort: a failure is logged and the
// deploy stands, since an invocation prepares whatever was not. It runs to
// its end even if the caller leaves, bounded by prepareTimeout.
func (s *Service) prepare(ctx context.Context, cfg *function.Config) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), prepareTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for i, h := range s.cfg.Hosts {
		p, ok := h.(harness.Preparer)
		if !ok {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Prepare(ctx, cfg); err != nil {
				s.log.Warn("preparing revision", "function", cfg.Name, "revision", cfg.RevisionID, "host", i, "error", err)
			}
		}()
	}
	wg.Wait()
}

// CreateFunction validates cfg and the zip, stores the code and the
// function and returns the stored configuration (State Active).
func (s *Service) CreateFunction(ctx context.Context, in *function.Config, zip []byte) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	cfg := in.Clone()
	cfg.ApplyDefaults()
	cfg.Version = function.LatestVersion
	// $LATEST never restores from a snapshot; only published versions do.
	cfg.SnapStart.OptimizationStatus = function.OptimizationOff
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := s.validConcurrency(cfg.ReservedConcurrency); err != nil {
		return nil, err
	}
	rt, err := s.runtimeFor(ctx, cfg.Runtime)
	if err != nil {
		return nil, err
	}
	if cfg.Handler, err = defaultHandler(rt, cfg.Handler); err != nil {
		return nil, err
	}
	m, err := codezip.Inspect(zip, s.cfg.Limits)
	if err != nil {
		return nil, err
	}
	if err := checkCode(rt, cfg.Handler, m); err != nil {
		return nil, err
	}

	unlockFn := s.fnLocks.Lock(cfg.Name)
	defer unlockFn()
	digest := codeDigest(zip)
	unlockCode := s.codeLocks.Lock(digest)
	size, err := s.putCode(ctx, digest, zip)
	if err != nil {
		unlockCode()
		return nil, err
	}
	cfg.CodeSha256, cfg.CodeSize = digest, size
	cfg.RevisionID = uuid.NewString()
	cfg.State, cfg.StateReason, cfg.StateReasonCode = function.StateActive, "", ""
	cfg.LastUpdateStatus, cfg.LastUpdateStatusReason = function.UpdateSuccessful, ""
	cfg.LastModified = s.now().UTC()
	err = s.store.Functions().Create(ctx, cfg)
	s.cache.invalidateFunction(cfg.Name)
	unlockCode()
	if err != nil {
		s.collectCode(ctx, digest)
		if errors.Is(err, errdefs.ErrAlreadyExists) {
			return nil, fmt.Errorf("Function already exist: %s: %w", cfg.Name, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("creating function %s: %w", cfg.Name, err)
	}
	s.prepare(ctx, cfg)
	s.log.Info("function created", "function", cfg.Name, "revision", cfg.RevisionID, "runtime", cfg.Runtime)
	return cfg, nil
}

// GetFunction returns the function's configuration.
func (s *Service) GetFunction(ctx context.Context, name string) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	fn, err := s.cachedFunction(ctx, name)
	if err != nil {
		return nil, err
	}
	return fn.cfg.Clone(), nil
}

// ListFunctions returns up to max functions (default 50, at most 10000) by
// name after marker, and the next page's marker.
func (s *Service) ListFunctions(ctx context.Context, marker string, max int) ([]*function.Config, string, error) {
	if err := s.running(); err != nil {
		return nil, "", err
	}
	switch {
	case max <= 0:
		max = defaultListMax
	case max > maxListMax:
		max = maxListMax
	}
	fns, next, err := s.store.Functions().List(ctx, marker, max)
	if err != nil {
		return nil, "", fmt.Errorf("listing functions: %w", err)
	}
	return fns, next, nil
}

// mutate runs one optimistic read-modify-write of a function; the caller
// holds the function's process lock. It reads the store, not the cache, and
// invalidates the cached configuration after every write. change gets a copy of the current configuration and
// returns the one to store (with a new RevisionID, unless it deliberately
// keeps the old one). Losing the store's compare-and-swap to another
// process is retried when the caller gave no revisionID and reported as
// ErrPreconditionFailed when it did.
func (s *Service) mutate(ctx context.Context, name, revisionID string, change func(cur *function.Config) (*function.Config, error)) (old, updated *function.Config, err error) {
	for attempt := 1; ; attempt++ {
		cur, err := s.getFunction(ctx, name)
		if err != nil {
			return nil, nil, err
		}
		if revisionID != "" && cur.RevisionID != revisionID {
			return nil, nil, errPrecondition()
		}
		next, err := change(cur.Clone())
		if err != nil {
			return nil, nil, err
		}
		err = s.store.Functions().Update(ctx, next, cur.RevisionID)
		s.cache.invalidateFunction(name)
		switch {
		case err == nil:
			return cur, next, nil
		case errors.Is(err, errdefs.ErrNotFound):
			return nil, nil, s.errFunctionNotFound(name)
		case errors.Is(err, errdefs.ErrPreconditionFailed) && revisionID != "":
			return nil, nil, errPrecondition()
		case errors.Is(err, errdefs.ErrPreconditionFailed) && attempt < maxUpdateAttempts:
			continue
		case errors.Is(err, errdefs.ErrPreconditionFailed):
			return nil, nil, fmt.Errorf("The function %s is being updated concurrently; try again: %w", name, errdefs.ErrConflict)
		default:
			return nil, nil, fmt.Errorf("updating function %s: %w", name, err)
		}
	}
}

// stamp marks cfg as a new successful revision.
func (s *Service) stamp(cfg *function.Config) {
	cfg.RevisionID = uuid.NewString()
	cfg.LastModified = s.now().UTC()
	cfg.LastUpdateStatus, cfg.LastUpdateStatusReason = function.UpdateSuccessful, ""
}

// UpdateFunctionCode replaces the code. If revisionID is not "" it must
// equal the current RevisionId (else ErrPreconditionFailed).
func (s *Service) UpdateFunctionCode(ctx context.Context, name string, zip []byte, revisionID string) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	m, err := codezip.Inspect(zip, s.cfg.Limits)
	if err != nil {
		return nil, err
	}
	digest := codeDigest(zip)
	var (
		size   int64
		stored bool
	)
	// Lock order everywhere: function, then code digest.
	unlockFn := s.fnLocks.Lock(name)
	defer unlockFn()
	unlockCode := s.codeLocks.Lock(digest)
	old, updated, err := s.mutate(ctx, name, revisionID, func(cfg *function.Config) (*function.Config, error) {
		rt, err := s.runtimeFor(ctx, cfg.Runtime)
		if err != nil {
			return nil, err
		}
		if err := checkCode(rt, cfg.Handler, m); err != nil {
			return nil, err
		}
		if !stored {
			if size, err = s.putCode(ctx, digest, zip); err != nil {
				return nil, err
			}
			stored = true
		}
		cfg.CodeSha256, cfg.CodeSize = digest, size
		s.stamp(cfg)
		return cfg, nil
	})
	unlockCode()
	if err != nil {
		if stored {
			s.collectCode(ctx, digest)
		}
		return nil, err
	}
	// Prepared before the old revision is retired, so that code the two
	// share stays unpacked.
	s.prepare(ctx, updated)
	s.retireRevision(ctx, name, old.RevisionID, updated.RevisionID)
	if old.CodeSha256 != digest {
		s.collectCode(ctx, old.CodeSha256)
	}
	s.log.Info("function code updated", "function", name, "revision", updated.RevisionID)
	return updated, nil
}

// UpdateFunctionConfiguration changes the fields of upd that are not nil.
func (s *Service) UpdateFunctionConfiguration(ctx context.Context, name string, upd *ConfigUpdate, revisionID string) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	if upd == nil {
		upd = &ConfigUpdate{}
	}
	unlock := s.fnLocks.Lock(name)
	defer unlock()
	old, updated, err := s.mutate(ctx, name, revisionID, func(cfg *function.Config) (*function.Config, error) {
		oldRuntime, oldHandler := cfg.Runtime, cfg.Handler
		// No ApplyDefaults here: the stored values are complete, and an
		// explicit 0 (timeout, memory) is invalid rather than "default".
		applyUpdate(cfg, upd)
		if err := cfg.Validate(); err != nil {
			return nil, err
		}
		if cfg.Runtime != oldRuntime || cfg.Handler != oldHandler {
			if err := s.recheckCode(ctx, cfg); err != nil {
				return nil, err
			}
		}
		s.stamp(cfg)
		return cfg, nil
	})
	if err != nil {
		return nil, err
	}
	s.prepare(ctx, updated)
	s.retireRevision(ctx, name, old.RevisionID, updated.RevisionID)
	s.log.Info("function configuration updated", "function", name, "revision", updated.RevisionID)
	return updated, nil
}

func applyUpdate(cfg *function.Config, upd *ConfigUpdate) {
	if upd.Runtime != nil {
		cfg.Runtime = *upd.Runtime
	}
	if upd.Handler != nil {
		cfg.Handler = *upd.Handler
	}
	if upd.Role != nil {
		cfg.Role = *upd.Role
	}
	if upd.Description != nil {
		cfg.Description = *upd.Description
	}
	if upd.Timeout != nil {
		cfg.Timeout = *upd.Timeout
	}
	if upd.MemorySize != nil {
		cfg.MemorySize = *upd.MemorySize
	}
	if upd.EphemeralStorage != nil {
		cfg.EphemeralStorage = *upd.EphemeralStorage
	}
	if upd.SnapStart != nil {
		cfg.SnapStart.ApplyOn = *upd.SnapStart
	}
	if upd.Environment != nil {
		env := make(map[string]string, len(*upd.Environment))
		for k, v := range *upd.Environment {
			env[k] = v
		}
		if len(env) == 0 {
			env = nil
		}
		cfg.Environment = env
	}
}

// recheckCode verifies the stored code against a changed runtime or
// handler, filling an emptied handler from the runtime's default.
func (s *Service) recheckCode(ctx context.Context, cfg *function.Config) error {
	rt, err := s.runtimeFor(ctx, cfg.Runtime)
	if err != nil {
		return err
	}
	if cfg.Handler, err = defaultHandler(rt, cfg.Handler); err != nil {
		return err
	}
	zip, err := s.readCode(ctx, cfg.CodeSha256)
	if err != nil {
		return err
	}
	m, err := codezip.Inspect(zip, s.cfg.Limits)
	if err != nil {
		return fmt.Errorf("inspecting stored code of %s: %w", cfg.Name, err)
	}
	return checkCode(rt, cfg.Handler, m)
}

func (s *Service) validConcurrency(n *int) error {
	if n != nil && (*n < 0 || *n > s.cfg.MaxReservedConcurrency) {
		return errdefs.Invalid("1 validation error detected: Value '%d' at 'reservedConcurrentExecutions' failed to satisfy constraint: Member must have value between 0 and %d", *n, s.cfg.MaxReservedConcurrency)
	}
	return nil
}

// PutFunctionConcurrency sets (n != nil) or removes (n == nil) reserved
// concurrency. Like Lambda, it does not change the RevisionId: it is a
// property of the function, not of its code or configuration, and keeping
// the revision keeps the warm instances.
func (s *Service) PutFunctionConcurrency(ctx context.Context, name string, n *int) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	if err := s.validConcurrency(n); err != nil {
		return nil, err
	}
	unlock := s.fnLocks.Lock(name)
	defer unlock()
	_, updated, err := s.mutate(ctx, name, "", func(cfg *function.Config) (*function.Config, error) {
		if n == nil {
			cfg.ReservedConcurrency = nil
		} else {
			v := *n
			cfg.ReservedConcurrency = &v
		}
		return cfg, nil
	})
	if err != nil {
		return nil, err
	}
	return updated, nil
}

// DeleteFunction removes the function and all its published versions,
// retires their instances on every host and deletes their code unless
// another function uses the same package. Events already queued for it
// fail when they run (recorded as Failed).
func (s *Service) DeleteFunction(ctx context.Context, name string) error {
	if err := s.running(); err != nil {
		return err
	}
	unlock := s.fnLocks.Lock(name)
	cur, err := s.getFunction(ctx, name)
	var digests []string
	if err == nil {
		digests, err = s.versionDigests(ctx, name)
	}
	if err == nil {
		err = s.store.Functions().Delete(ctx, name)
		s.cache.invalidateFunction(name)
		if errors.Is(err, errdefs.ErrNotFound) {
			err = s.errFunctionNotFound(name)
		} else if err != nil {
			err = fmt.Errorf("deleting function %s: %w", name, err)
		}
	}
	unlock()
	if err != nil {
		return err
	}
	s.retire(ctx, name, "")
	s.collectCode(ctx, cur.CodeSha256)
	for _, d := range digests {
		if d != cur.CodeSha256 {
			s.collectCode(ctx, d)
		}
	}
	s.log.Info("function deleted", "function", name)
	return nil
}

// FunctionCode returns the deployment package of $LATEST (qualifier "" or
// "$LATEST") or of a published version.
func (s *Service) FunctionCode(ctx context.Context, name, qualifier string) ([]byte, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	fn, err := s.lookup(ctx, name, qualifier)
	if err != nil {
		return nil, err
	}
	return s.readCode(ctx, fn.cfg.CodeSha256)
}

func (s *Service) readCode(ctx context.Context, digest string) ([]byte, error) {
	rc, err := s.blobs.Open(ctx, digest)
	if err != nil {
		// A function whose blob is gone is an internal inconsistency, not
		// the caller's missing resource.
		return nil, fmt.Errorf("opening code %s: %v", digest, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("reading code %s: %w", digest, err)
	}
	return data, nil
}

// ListRuntimes returns the runtimes DB.
func (s *Service) ListRuntimes(ctx context.Context) ([]*runtimes.Runtime, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	rts, err := s.store.Runtimes().List(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing runtimes: %w", err)
	}
	return rts, nil
}
