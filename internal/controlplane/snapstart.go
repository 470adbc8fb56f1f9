package controlplane

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

// VersionPreparer is implemented by hosts that can take SnapStart
// snapshots. The control plane finds it by type assertion on each
// harness.Host (as it finds harness.Preparer); the harness cannot import
// this package, so it implements the method with exactly this signature.
//
// When a version is published from a $LATEST whose SnapStart.ApplyOn is
// PublishedVersions and every host implements VersionPreparer, the version
// is stored with State Pending (StateReasonCode Creating) and PublishVersion
// returns at once; in the background the control plane calls PrepareVersion
// on every host, concurrently. When all return nil the version becomes
// Active with SnapStart.OptimizationStatus On. If any host does not
// implement it, SnapStart versions are Active at once with
// OptimizationStatus Off (and the reason is logged): they run with a
// regular INIT, like $LATEST.
//
// The contract:
//
//   - cfg is the published version: Version "N", a RevisionID of its own
//     (no $LATEST revision or other version shares it), the code digest,
//     SnapStart {PublishedVersions, Off}. rt is its runtimes DB row. Both
//     are the caller's and only read during the call: copy what you keep.
//   - Return nil only once the host can restore cfg's revision from a
//     snapshot of an execution environment that has run the function's
//     INIT (AWS_LAMBDA_INITIALIZATION_TYPE snap-start); the code is then
//     also prepared, as harness.Preparer would. From then on invocations
//     arrive as usual, through Host.Invoke, with InvokeRequest.Function
//     carrying that RevisionID and OptimizationStatus On; they should be
//     restored from the snapshot instead of running INIT. A host that has
//     lost the snapshot (say, after its own restart) must still run them,
//     with a regular INIT or a new snapshot, never fail them for it.
//   - Idempotent: the call may be repeated for a revision already prepared
//     (the control plane restarted while the version was Pending) and must
//     then return nil without taking another snapshot.
//   - ctx carries a deadline (VersionPrepareTimeout) and is cancelled when
//     the control plane closes: return promptly then, leaving nothing
//     partially created.
//   - Errors decide the version's state. ctx's error or ErrUnavailable
//     (the host is shutting down) leave it Pending, to be prepared again
//     when the control plane next starts. Anything else makes it Failed:
//     an error wrapping function.ErrInitFailed (the function's own INIT
//     failed) gets StateReasonCode FunctionError, ErrInvalidRuntime gets
//     InvalidRuntime, ErrInvalidParameter gets InvalidConfiguration, each
//     with the error's message as StateReason (errdefs.Message; it is
//     shown to the function's owner); an error of no kind is the
//     platform's: InternalError, with a generic StateReason while the
//     error itself is logged.
//   - The snapshot belongs to the revision: keep it until the revision is
//     retired (Host.Retire with another keepRevision or of all, or
//     RevisionRetirer.RetireRevisions naming it), then delete it. A
//     version deleted while it was being prepared is retired again after
//     PrepareVersion returns, so a late snapshot is not leaked.
//   - Safe for concurrent use: calls for different revisions, and Invoke
//     of other revisions, may run at the same time. A Pending or Failed
//     version is never invoked (Lambda refuses it), so no invocation of
//     cfg's revision arrives before PrepareVersion returned nil on every
//     host.
type VersionPreparer interface {
	PrepareVersion(ctx context.Context, cfg *function.Config, rt *runtimes.Runtime) error
}

// RevisionRetirer is implemented by hosts that can retire chosen revisions
// of a function and keep all the others. The control plane finds it by type
// assertion on each harness.Host and prefers it to Host.Retire, which keeps
// only one revision: when $LATEST changes, or a version is deleted, only
// the revision that went away should lose its instances (and snapshot),
// not every published version's.
//
// RetireRevisions stops the instances of function whose revision is one of
// revisions: idle ones now, busy ones when their invocation ends, and drops
// what the host prepared for those revisions (unpacked code, snapshots).
// Revisions it does not know are ignored; it is idempotent. Errors wrap
// errdefs kinds (ErrUnavailable when the host is shutting down); the
// control plane logs them and carries on, as it does for Retire.
type RevisionRetirer interface {
	RetireRevisions(ctx context.Context, function string, revisions []string) error
}

// VersionPrepareTimeout bounds one version's preparation on all hosts.
const VersionPrepareTimeout = 5 * time.Minute

// Lambda's StateReasonCodes for a version whose snapshot failed.
const (
	reasonFunctionError        = "FunctionError"
	reasonInvalidRuntime       = "InvalidRuntime"
	reasonInvalidConfiguration = "InvalidConfiguration"
	reasonInternalError        = "InternalError"
	msgInternalSnapshotFailure = "An internal error occurred while creating the SnapStart snapshot."
)

// retireRevision stops the instances of one revision of name on every
// host. A host that cannot retire a single revision (no RevisionRetirer) is
// asked to keep only keep, the current $LATEST revision, which also stops
// the instances of published versions: they start again, cold, when next
// invoked. keep "" retires everything on such a host.
func (s *Service) retireRevision(ctx context.Context, name, revision, keep string) {
	ctx = context.WithoutCancel(ctx)
	for i, h := range s.cfg.Hosts {
		var err error
		if r, ok := h.(RevisionRetirer); ok {
			err = r.RetireRevisions(ctx, name, []string{revision})
		} else {
			err = h.Retire(ctx, name, keep)
		}
		if err != nil {
			s.log.Warn("retiring instances", "function", name, "revision", revision, "host", i, "error", err)
		}
	}
}

// snapshotsSupported reports whether every host takes SnapStart snapshots.
func (s *Service) snapshotsSupported() bool {
	if len(s.cfg.Hosts) == 0 {
		return false
	}
	for _, h := range s.cfg.Hosts {
		if _, ok := h.(VersionPreparer); !ok {
			return false
		}
		if c, ok := h.(snapshotCapable); ok && !c.SnapshotsSupported() {
			return false
		}
	}
	return true
}

// snapshotCapable is implemented by hosts whose VersionPreparer works only
// in some configurations (the harness: when its sandbox driver can
// snapshot). A host that says false counts as one without snapshots.
type snapshotCapable interface {
	SnapshotsSupported() bool
}

// versionWork runs the background preparation of Pending versions: at most
// one per version at a time, all stopped (their versions left Pending) by
// Close.
type versionWork struct {
	mu      sync.Mutex
	ctx     context.Context
	cancel  context.CancelFunc
	closed  bool
	running map[string]bool
	wg      sync.WaitGroup
}

// start gives the work its context; until then nothing runs.
func (w *versionWork) start(ctx context.Context) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.ctx, w.cancel = context.WithCancel(ctx)
	w.running = map[string]bool{}
}

// spawn runs fn for key unless it is already running or the work stopped.
func (w *versionWork) spawn(key string, fn func(ctx context.Context)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || w.ctx == nil || w.running[key] {
		return
	}
	w.running[key] = true
	w.wg.Add(1)
	go func() {
		defer w.wg.Done()
		defer func() {
			w.mu.Lock()
			delete(w.running, key)
			w.mu.Unlock()
		}()
		fn(w.ctx)
	}()
}

// stop cancels the running preparations and waits for them.
func (w *versionWork) stop() {
	w.mu.Lock()
	w.closed = true
	if w.cancel != nil {
		w.cancel()
	}
	w.mu.Unlock()
	w.wg.Wait()
}

// prepareVersionLater prepares a Pending version in the background.
func (s *Service) prepareVersionLater(v *function.Config) {
	v = v.Clone()
	s.versionWork.spawn(v.Name+":"+v.Version, func(ctx context.Context) {
		s.prepareVersion(ctx, v)
	})
}

// resumePending prepares the versions a previous run left Pending (read by
// Start before it started anything).
func (s *Service) resumePending(vs []*function.Config) {
	for _, v := range vs {
		s.prepareVersionLater(v)
	}
	if len(vs) > 0 {
		s.log.Info("preparing versions a previous run left pending", "count", len(vs))
	}
}

// prepareVersion takes v's snapshots on every host and settles its state.
func (s *Service) prepareVersion(ctx context.Context, v *function.Config) {
	settled := v.Clone()
	settled.State, settled.StateReason, settled.StateReasonCode = function.StateActive, "", ""
	settled.SnapStart.OptimizationStatus = function.OptimizationOff
	if !s.snapshotsSupported() {
		// The hosts changed since the version was published.
		s.prepare(ctx, v)
		s.log.Info("SnapStart is on but no host can take snapshots: the version runs without them",
			"function", v.Name, "version", v.Version)
		s.settleVersion(ctx, settled)
		return
	}
	err := s.snapshot(ctx, v)
	switch {
	case err == nil:
		settled.SnapStart.OptimizationStatus = function.OptimizationOn
	case ctx.Err() != nil || errors.Is(err, errdefs.ErrUnavailable):
		s.log.Info("version left pending: preparation interrupted", "function", v.Name, "version", v.Version, "error", err)
		return
	default:
		settled.State = function.StateFailed
		settled.StateReasonCode, settled.StateReason = failureReason(err)
		s.log.Warn("version failed: SnapStart snapshot not taken", "function", v.Name, "version", v.Version,
			"revision", v.RevisionID, "reason_code", settled.StateReasonCode, "error", err)
	}
	s.settleVersion(ctx, settled)
}

// snapshot runs PrepareVersion on every host, concurrently, and returns
// the first host's error, if any (one reason is all a version shows).
func (s *Service) snapshot(ctx context.Context, v *function.Config) error {
	ctx, cancel := context.WithTimeout(ctx, VersionPrepareTimeout)
	defer cancel()
	rt, err := s.cachedRuntime(ctx, v.Runtime)
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		return fmt.Errorf("The runtime %s is unknown to this server: %w", v.Runtime, errdefs.ErrInvalidRuntime)
	case err != nil:
		return err
	case !rt.Available:
		return fmt.Errorf("The runtime %s is not available on this host: %s: %w", rt.ID, rt.Reason, errdefs.ErrInvalidRuntime)
	}
	errs := make([]error, len(s.cfg.Hosts))
	var wg sync.WaitGroup
	for i, h := range s.cfg.Hosts {
		p := h.(VersionPreparer) // snapshotsSupported checked every host
		wg.Go(func() {
			// Each host gets its own copies: it may keep them.
			c, r := v.Clone(), *rt
			errs[i] = p.PrepareVersion(ctx, c, &r)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// failureReason returns the StateReasonCode and StateReason of a version
// whose snapshot failed with err (see VersionPreparer's contract).
func failureReason(err error) (code, reason string) {
	switch {
	case errors.Is(err, function.ErrInitFailed):
		return reasonFunctionError, initFailureMessage(err)
	case errors.Is(err, errdefs.ErrInvalidRuntime):
		return reasonInvalidRuntime, errdefs.Message(err)
	case errors.Is(err, errdefs.ErrInvalidParameter):
		return reasonInvalidConfiguration, errdefs.Message(err)
	}
	return reasonInternalError, msgInternalSnapshotFailure
}

// initFailureMessage is err's text without the ": function initialization
// failed" that wrapping function.ErrInitFailed adds.
func initFailureMessage(err error) string {
	return capMessage(strings.TrimSuffix(err.Error(), ": "+function.ErrInitFailed.Error()))
}

// settleVersion moves a Pending version to settled's state. A version
// deleted meanwhile is retired again, so whatever the hosts prepared for it
// after its deletion's retirement does not outlive it.
func (s *Service) settleVersion(ctx context.Context, settled *function.Config) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), queueOpTimeout)
	defer cancel()
	unlock := s.fnLocks.Lock(settled.Name)
	err := s.store.Versions().SetState(ctx, settled, function.StatePending)
	s.cache.invalidateFunction(settled.Name)
	keep := ""
	if errors.Is(err, errdefs.ErrNotFound) {
		if cur, lerr := s.getFunction(ctx, settled.Name); lerr == nil {
			keep = cur.RevisionID
		}
	}
	unlock()
	switch {
	case err == nil:
		s.log.Info("version settled", "function", settled.Name, "version", settled.Version,
			"state", settled.State, "snap_start", settled.SnapStart.OptimizationStatus)
	case errors.Is(err, errdefs.ErrNotFound):
		s.retireRevision(ctx, settled.Name, settled.RevisionID, keep)
	default:
		// It stays Pending and is prepared again at the next start.
		s.log.Warn("recording a version's state", "function", settled.Name, "version", settled.Version, "error", err)
	}
}
