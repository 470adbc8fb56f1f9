package controlplane

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

// Published versions. A version is a copy of $LATEST's configuration and
// code reference taken at PublishVersion, with its own number and its own
// RevisionID: hosts pool instances by revision, so a version never shares
// an execution environment with $LATEST or another version, even when
// their code is the same. Versions are immutable except for their state,
// which moves from Pending to Active or Failed while SnapStart snapshots
// are taken (snapstart.go).

// Lambda's messages for versions.
const (
	msgPendingReason = "The function is being created."
	reasonCreating   = "Creating"
	msgLatestDelete  = "$LATEST version cannot be deleted without deleting the function."
)

// latestMarker is ListVersionsByFunction's marker for a page that ended
// with $LATEST: the next page starts at the first version.
const latestMarker = function.LatestVersion

func (s *Service) errVersionNotFound(name, qualifier string) error {
	return fmt.Errorf("Function not found: %s: %w", function.QualifiedARN(s.cfg.Region, s.cfg.Account, name, qualifier), errdefs.ErrNotFound)
}

// getVersion reads a published version from the store, translating a
// missing row into Lambda's message.
func (s *Service) getVersion(ctx context.Context, name, version string) (*function.Config, error) {
	cfg, err := s.store.Versions().Get(ctx, name, version)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, s.errVersionNotFound(name, version)
	}
	if err != nil {
		return nil, fmt.Errorf("getting version %s of %s: %w", version, name, err)
	}
	return cfg, nil
}

// lookup returns the configuration name runs at qualifier ("" and
// "$LATEST" are $LATEST, a number is a published version; InvokeX has no
// aliases, so anything else does not exist). It is the cache's entry:
// shared and read-only.
func (s *Service) lookup(ctx context.Context, name, qualifier string) (*cachedFunction, error) {
	switch {
	case qualifier == "":
		return s.cachedFunction(ctx, name)
	case qualifier == function.LatestVersion:
		fn, err := s.cachedFunction(ctx, name)
		if err != nil {
			return nil, err
		}
		// Invoked as NAME:$LATEST, the runtime sees that ARN, as on Lambda.
		return &cachedFunction{cfg: fn.cfg, arn: fn.arn + ":" + function.LatestVersion}, nil
	}
	if _, ok := function.ParseVersion(qualifier); !ok {
		return nil, s.errVersionNotFound(name, qualifier)
	}
	return s.cachedVersion(ctx, name, qualifier)
}

// checkRunnable refuses to run a configuration that is not Active, with
// Lambda's message: Pending is a conflict (retry later), anything else is
// not ready.
func checkRunnable(cfg *function.Config) error {
	switch cfg.State {
	case function.StateActive:
		return nil
	case function.StatePending:
		return fmt.Errorf("The operation cannot be performed at this time. The function is currently in the following state: %s: %w", cfg.State, errdefs.ErrConflict)
	}
	return fmt.Errorf("The operation cannot be performed at this time. The function is currently in the following state: %s: %w", cfg.State, errdefs.ErrNotReady)
}

// GetFunctionVersion returns $LATEST (qualifier "" or "$LATEST") or a
// published version.
func (s *Service) GetFunctionVersion(ctx context.Context, name, qualifier string) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	fn, err := s.lookup(ctx, name, qualifier)
	if err != nil {
		return nil, err
	}
	return fn.cfg.Clone(), nil
}

// PublishVersion publishes $LATEST as the next version. If $LATEST has not
// changed since the newest version was published, that version is
// returned instead, as Lambda does. The version's code is prepared on the
// hosts before it is returned, as a deploy's is; a SnapStart version is
// returned Pending and its snapshots are taken in the background.
func (s *Service) PublishVersion(ctx context.Context, name string, in *PublishInput) (*function.Config, error) {
	if err := s.running(); err != nil {
		return nil, err
	}
	if in == nil {
		in = &PublishInput{}
	}
	if len(in.Description) > function.MaxDescriptionLen {
		return nil, errdefs.Invalid("1 validation error detected: Value at 'description' failed to satisfy constraint: Member must have length less than or equal to %d", function.MaxDescriptionLen)
	}
	unlock := s.fnLocks.Lock(name)
	defer unlock()
	var (
		v       *function.Config
		created bool
	)
	for attempt := 1; ; attempt++ {
		cur, err := s.getFunction(ctx, name)
		if err != nil {
			return nil, err
		}
		if in.RevisionID != "" && cur.RevisionID != in.RevisionID {
			return nil, errPrecondition()
		}
		if in.CodeSha256 != "" && cur.CodeSha256 != in.CodeSha256 {
			return nil, errdefs.Invalid("CodeSHA256 (%s) is different from current CodeSHA256 in $LATEST (%s). Please try again with the CodeSHA256 in $LATEST.", truncate(in.CodeSha256, 64), cur.CodeSha256)
		}
		v, created, err = s.store.Versions().Publish(ctx, s.newVersion(cur, in), cur.RevisionID)
		s.cache.invalidateFunction(name)
		if err == nil {
			break
		}
		switch {
		case errors.Is(err, errdefs.ErrNotFound):
			return nil, s.errFunctionNotFound(name)
		case errors.Is(err, errdefs.ErrPreconditionFailed) && in.RevisionID != "":
			return nil, errPrecondition()
		case errors.Is(err, errdefs.ErrPreconditionFailed) && attempt < maxUpdateAttempts:
			continue // another process changed $LATEST: publish what it is now
		case errors.Is(err, errdefs.ErrPreconditionFailed):
			return nil, fmt.Errorf("The function %s is being updated concurrently; try again: %w", name, errdefs.ErrConflict)
		default:
			return nil, fmt.Errorf("publishing a version of %s: %w", name, err)
		}
	}
	if !created {
		return v, nil
	}
	if v.State == function.StatePending {
		s.prepareVersionLater(v)
	} else {
		s.prepare(ctx, v)
	}
	s.log.Info("version published", "function", name, "version", v.Version, "revision", v.RevisionID, "state", v.State)
	return v, nil
}

// newVersion is the version to publish from cur ($LATEST).
func (s *Service) newVersion(cur *function.Config, in *PublishInput) *function.Config {
	v := cur.Clone()
	v.RevisionID = uuid.NewString()
	// Reserved concurrency is the function's, not a version's: it is read
	// from $LATEST whenever a version runs.
	v.ReservedConcurrency = nil
	if in.Description != "" {
		v.Description = in.Description
	}
	v.LastModified = s.now().UTC()
	v.LastUpdateStatus, v.LastUpdateStatusReason = function.UpdateSuccessful, ""
	v.SnapStart.OptimizationStatus = function.OptimizationOff
	v.State, v.StateReason, v.StateReasonCode = function.StateActive, "", ""
	if v.SnapStart.Enabled() {
		if s.snapshotsSupported() {
			v.State, v.StateReason, v.StateReasonCode = function.StatePending, msgPendingReason, reasonCreating
		} else {
			s.log.Info("SnapStart is on but no host can take snapshots: the version runs without them",
				"function", cur.Name, "revision", v.RevisionID)
		}
	}
	return v
}

// ListVersionsByFunction returns $LATEST and then the published versions
// by ascending number, up to max per page.
func (s *Service) ListVersionsByFunction(ctx context.Context, name, marker string, max int) ([]*function.Config, string, error) {
	if err := s.running(); err != nil {
		return nil, "", err
	}
	switch {
	case max <= 0:
		max = defaultListMax
	case max > maxListMax:
		max = maxListMax
	}
	latest, err := s.getFunction(ctx, name)
	if err != nil {
		return nil, "", err
	}
	var out []*function.Config
	after := marker
	switch marker {
	case "":
		out = append(out, latest)
	case latestMarker:
		after = ""
	}
	if len(out) == max {
		// The page holds only $LATEST; is there a version after it?
		vs, _, err := s.store.Versions().List(ctx, name, "", 1)
		if err != nil {
			return nil, "", fmt.Errorf("listing versions of %s: %w", name, err)
		}
		if len(vs) > 0 {
			return out, latestMarker, nil
		}
		return out, "", nil
	}
	vs, next, err := s.store.Versions().List(ctx, name, after, max-len(out))
	if err != nil {
		return nil, "", fmt.Errorf("listing versions of %s: %w", name, err)
	}
	return append(out, vs...), next, nil
}

// DeleteFunctionVersion deletes one published version, stops its
// instances and deletes its code unless something else uses it.
func (s *Service) DeleteFunctionVersion(ctx context.Context, name, version string) error {
	if err := s.running(); err != nil {
		return err
	}
	if version == function.LatestVersion {
		return errdefs.Invalid(msgLatestDelete)
	}
	if _, ok := function.ParseVersion(version); !ok {
		return s.errVersionNotFound(name, version)
	}
	unlock := s.fnLocks.Lock(name)
	v, err := s.getVersion(ctx, name, version)
	if err == nil {
		err = s.store.Versions().Delete(ctx, name, version)
		s.cache.invalidateFunction(name)
		if errors.Is(err, errdefs.ErrNotFound) {
			err = s.errVersionNotFound(name, version)
		} else if err != nil {
			err = fmt.Errorf("deleting version %s of %s: %w", version, name, err)
		}
	}
	keep := ""
	if err == nil {
		if cur, lerr := s.getFunction(ctx, name); lerr == nil {
			keep = cur.RevisionID
		}
	}
	unlock()
	if err != nil {
		return err
	}
	s.retireRevision(ctx, name, v.RevisionID, keep)
	s.collectCode(ctx, v.CodeSha256)
	s.log.Info("version deleted", "function", name, "version", version, "revision", v.RevisionID)
	return nil
}

// versionDigests returns the distinct code digests of name's versions,
// which deleting the function may leave unreferenced.
func (s *Service) versionDigests(ctx context.Context, name string) ([]string, error) {
	seen := map[string]bool{}
	var out []string
	marker := ""
	for {
		vs, next, err := s.store.Versions().List(ctx, name, marker, maxListMax)
		if err != nil {
			return nil, fmt.Errorf("listing versions of %s: %w", name, err)
		}
		for _, v := range vs {
			if !seen[v.CodeSha256] {
				seen[v.CodeSha256] = true
				out = append(out, v.CodeSha256)
			}
		}
		if next == "" {
			return out, nil
		}
		marker = next
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
