package harness

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// SnapStart on this host: published versions with SnapStart are snapshotted
// once, after their INIT, and their instances start by restoring the
// snapshot instead of booting and running INIT. The control plane asks for
// the snapshot (PrepareVersion) when a version is published; the snapshot
// lives in CacheDir/snapshots/<digest of the revision> until the revision
// is retired, or until the disk budget needs its room (the least recently
// used goes first: its version then starts with a regular INIT, as after
// a lost snapshot).

const (
	// initTypeSnapStart is AWS_LAMBDA_INITIALIZATION_TYPE during the INIT
	// a snapshot is taken after.
	initTypeSnapStart = "snap-start"
	// restoreTimeout bounds the agent's answer to Restore.
	restoreTimeout = 10 * time.Second
	// snapshotMeta names the file that marks a snapshot directory complete.
	snapshotMeta = "invokex-snapshot.json"
	// defaultSnapshotBudget is Config.SnapshotBudget's default.
	defaultSnapshotBudget = 10 << 30
)

// snapshot is one revision's snapshot on this host.
type snapshot struct {
	Function string
	Revision string
	Bytes    int64
	Created  time.Time

	dir      string
	lastUsed time.Time // guarded by snapshots.mu
}

// snapshots indexes the host's snapshots. Safe for concurrent use.
type snapshots struct {
	root   string
	budget int64

	mu    sync.Mutex
	byRev map[string]*snapshot
	// taking serialises PrepareVersion per revision.
	taking map[string]*sync.Mutex
}

func newSnapshots(root string, budget int64) *snapshots {
	return &snapshots{root: root, budget: budget, byRev: map[string]*snapshot{}, taking: map[string]*sync.Mutex{}}
}

// dirFor is the directory of revision's snapshot.
func (s *snapshots) dirFor(revision string) string {
	sum := sha256.Sum256([]byte(revision))
	return filepath.Join(s.root, hex.EncodeToString(sum[:12]))
}

// load indexes the complete snapshots under root (a harness restarted
// keeps its versions' snapshots) and removes incomplete ones.
func (s *snapshots) load() error {
	if err := os.MkdirAll(s.root, 0o700); err != nil {
		return fmt.Errorf("creating snapshot directory: %w", err)
	}
	ents, err := os.ReadDir(s.root)
	if err != nil {
		return fmt.Errorf("reading snapshot directory: %w", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range ents {
		dir := filepath.Join(s.root, e.Name())
		var sn snapshot
		b, err := os.ReadFile(filepath.Join(dir, snapshotMeta))
		if err != nil || json.Unmarshal(b, &sn) != nil || sn.Revision == "" || s.dirFor(sn.Revision) != dir {
			if err := os.RemoveAll(dir); err != nil {
				return fmt.Errorf("removing incomplete snapshot %s: %w", dir, err)
			}
			continue
		}
		sn.dir, sn.lastUsed = dir, sn.Created
		s.byRev[sn.Revision] = &sn
	}
	return nil
}

// get returns revision's snapshot directory and marks it used.
func (s *snapshots) get(revision string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn, ok := s.byRev[revision]
	if !ok {
		return "", false
	}
	sn.lastUsed = time.Now()
	return sn.dir, true
}

// lock serialises the preparation of one revision.
func (s *snapshots) lock(revision string) func() {
	s.mu.Lock()
	m, ok := s.taking[revision]
	if !ok {
		m = &sync.Mutex{}
		s.taking[revision] = m
	}
	s.mu.Unlock()
	m.Lock()
	return m.Unlock
}

// add records a complete snapshot and makes room under the budget by
// removing the least recently used others.
func (s *snapshots) add(sn *snapshot) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn.lastUsed = time.Now()
	s.byRev[sn.Revision] = sn
	var total int64
	all := make([]*snapshot, 0, len(s.byRev))
	for _, o := range s.byRev {
		total += o.Bytes
		all = append(all, o)
	}
	sort.Slice(all, func(a, b int) bool { return all[a].lastUsed.Before(all[b].lastUsed) })
	var evicted []string
	for _, o := range all {
		if total <= s.budget || o == sn {
			continue
		}
		delete(s.byRev, o.Revision)
		total -= o.Bytes
		evicted = append(evicted, o.dir)
	}
	return evicted
}

// drop forgets the snapshots of fn's revisions that retire selects and
// returns their directories, for the caller to remove.
func (s *snapshots) drop(fn string, retire func(revision string) bool) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var dirs []string
	for rev, sn := range s.byRev {
		if sn.Function == fn && retire(rev) {
			delete(s.byRev, rev)
			dirs = append(dirs, sn.dir)
		}
	}
	return dirs
}

// SnapshotsSupported reports whether this host can take SnapStart
// snapshots: whether its driver is a driver.Snapshotter. The control plane
// asks before it relies on PrepareVersion.
func (h *Harness) SnapshotsSupported() bool {
	_, ok := h.cfg.Driver.(driver.Snapshotter)
	return ok
}

// PrepareVersion takes the snapshot of a published version with SnapStart:
// it starts an instance of cfg's revision, runs INIT (InitType snap-start),
// and has the driver save it. It implements the control plane's
// VersionPreparer (see its contract): idempotent per revision, an INIT
// failure wraps function.ErrInitFailed, ErrUnavailable when the harness is
// shutting down.
func (h *Harness) PrepareVersion(ctx context.Context, cfg *function.Config, rt *runtimes.Runtime) error {
	sn, ok := h.cfg.Driver.(driver.Snapshotter)
	if !ok {
		return fmt.Errorf("snapshot of %s: the %s driver takes no snapshots", cfg.Name, h.cfg.Driver.Name())
	}
	if cfg == nil || rt == nil || cfg.RevisionID == "" || cfg.CodeSha256 == "" {
		return errdefs.Invalid("snapshot: a revision, its code digest and its runtime are required")
	}
	if err := h.enter(); err != nil {
		return err
	}
	defer h.inflight.Done()
	// Close cancels bgCtx; the caller may give up too.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(h.bgCtx, cancel)
	defer stop()

	unlock := h.snaps.lock(cfg.RevisionID)
	defer unlock()
	if _, ok := h.snaps.get(cfg.RevisionID); ok {
		return nil
	}
	codeDir, key, err := h.code.acquire(ctx, cfg.CodeSha256)
	if err != nil {
		return h.snapErr(ctx, fmt.Errorf("snapshot of %s: preparing code: %v", cfg.Name, err))
	}
	defer h.code.release(key)
	runtimeDir, err := h.runtimes.dirFor(ctx, rt.Family)
	if err != nil {
		return h.snapErr(ctx, fmt.Errorf("snapshot of %s: runtime %s files: %w", cfg.Name, rt.ID, err))
	}
	spec := driver.Spec{
		ID:          newInstanceID(),
		Function:    cfg.Name,
		RevisionID:  cfg.RevisionID,
		Runtime:     *rt,
		CodeDir:     codeDir,
		CodeSha256:  cfg.CodeSha256,
		RuntimeDir:  runtimeDir,
		MemoryMB:    cfg.MemorySize,
		EphemeralMB: cfg.EphemeralStorage,
		Network:     h.cfg.Network,
		ForSnapshot: true,
	}
	t0 := time.Now()
	if err := h.initForSnapshot(ctx, spec, cfg, rt); err != nil {
		return h.snapErr(ctx, err)
	}
	final := h.snaps.dirFor(cfg.RevisionID)
	tmp := final + ".tmp-" + spec.ID
	if err := sn.Snapshot(ctx, spec.ID, tmp); err != nil {
		_ = os.RemoveAll(tmp)
		return h.snapErr(ctx, fmt.Errorf("snapshot of %s: %w", cfg.Name, err))
	}
	rec := &snapshot{Function: cfg.Name, Revision: cfg.RevisionID, Bytes: diskUsage(tmp), Created: time.Now().UTC(), dir: final}
	if err := writeSnapshotMeta(tmp, rec); err != nil {
		_ = os.RemoveAll(tmp)
		return fmt.Errorf("snapshot of %s: %w", cfg.Name, err)
	}
	_ = os.RemoveAll(final) // a stale one the index did not know
	if err := os.Rename(tmp, final); err != nil {
		_ = os.RemoveAll(tmp)
		return fmt.Errorf("snapshot of %s: %w", cfg.Name, err)
	}
	for _, dir := range h.snaps.add(rec) {
		h.log.Info("snapshot evicted", "dir", dir, "reason", "disk budget")
		_ = os.RemoveAll(dir)
	}
	h.log.Info("snapshot taken", "function", cfg.Name, "revision", cfg.RevisionID, "version", cfg.Version,
		"bytes", rec.Bytes, "took", time.Since(t0))
	return nil
}

// snapErr keeps a cancelled preparation retryable: the control plane
// leaves the version Pending for ErrUnavailable and ctx errors.
func (h *Harness) snapErr(ctx context.Context, err error) error {
	if ctx.Err() != nil && !errors.Is(err, errdefs.ErrUnavailable) {
		return fmt.Errorf("%w (%w)", err, errdefs.ErrUnavailable)
	}
	return err
}

// initForSnapshot starts spec's sandbox and runs INIT in it; on success the
// sandbox is left running, idle, for Snapshot, else it is stopped.
func (h *Harness) initForSnapshot(ctx context.Context, spec driver.Spec, cfg *function.Config, rt *runtimes.Runtime) (err error) {
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	di, err := h.cfg.Driver.Start(startCtx, spec)
	cancel()
	if err != nil {
		return fmt.Errorf("snapshot of %s: starting its sandbox: %w", cfg.Name, err)
	}
	defer func() {
		if err != nil {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
			_ = h.cfg.Driver.Stop(sctx, spec.ID)
			cancel()
		}
	}()
	req := &InvokeRequest{Function: cfg, Runtime: rt, ARN: function.QualifiedARN(h.cfg.Region, h.cfg.Account, cfg.Name, cfg.Version)}
	msg := h.initMessage(req, logStreamName(h.now(), cfg.Version), initTypeSnapStart)
	f, err := roundTrip(ctx, di, protocol.TypeInit, msg, protocol.TypeInitDone, h.initTimeout+safetyMargin)
	if err != nil {
		return fmt.Errorf("snapshot of %s: INIT: %w", cfg.Name, err)
	}
	var done protocol.InitDone
	if err := f.Decode(&done); err != nil {
		return fmt.Errorf("snapshot of %s: INIT: %w: %w", cfg.Name, errProtocol, err)
	}
	if done.Error != nil {
		return fmt.Errorf("%s: %s: %w", done.Error.ErrorType, done.Error.ErrorMessage, function.ErrInitFailed)
	}
	return nil
}

// roundTrip sends one frame on a sandbox that is not (yet) an instance of
// a pool and reads the answer, within wait. A failure leaves the stream
// unusable: the caller stops the sandbox.
func roundTrip(ctx context.Context, di driver.Instance, t protocol.Type, hdr any, want protocol.Type, wait time.Duration) (*protocol.Frame, error) {
	conn := protocol.NewConn(di.Conn())
	type answer struct {
		f   *protocol.Frame
		err error
	}
	ch := make(chan answer, 1)
	go func() {
		if err := conn.WriteFrame(t, hdr); err != nil {
			ch <- answer{err: fmt.Errorf("sending %s: %w", t, err)}
			return
		}
		f, err := conn.ReadFrame()
		ch <- answer{f, err}
	}()
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case a := <-ch:
		if a.err != nil {
			return nil, fmt.Errorf("waiting for %s: %w: %w", want, errAgentGone, a.err)
		}
		if a.f.Type != want {
			return nil, fmt.Errorf("got %s while waiting for %s: %w", a.f.Type, want, errProtocol)
		}
		return a.f, nil
	case <-di.Done():
		return nil, fmt.Errorf("waiting for %s: %w", want, errAgentGone)
	case <-timer.C:
		return nil, fmt.Errorf("no %s within %s: %w", want, wait, errAgentGone)
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// tryRestore starts a SnapStart version's instance from its snapshot: nil
// when the revision has none here (never taken, evicted) or the restore
// failed (logged; the caller boots the instance instead).
func (h *Harness) tryRestore(ctx context.Context, i *instance, req *InvokeRequest, spec driver.Spec) driver.Instance {
	sn, ok := h.cfg.Driver.(driver.Snapshotter)
	if !ok || !req.Function.SnapStart.On() {
		return nil
	}
	dir, ok := h.snaps.get(req.Function.RevisionID)
	if !ok {
		return nil
	}
	t0 := time.Now()
	di, err := h.restore(ctx, sn, spec, dir)
	i.driverStart = time.Since(t0)
	if err != nil {
		h.log.Warn("restore failed; booting instead", "function", i.function, "revision", i.revision,
			"instance", i.id, "error", err)
		return nil
	}
	return di
}

// restore starts spec's sandbox from dir's snapshot and makes it a new
// environment (protocol.Restore). It returns the running sandbox, or an
// error after which nothing of the attempt is left (the caller boots
// instead, as Lambda does when a restore fails).
func (h *Harness) restore(ctx context.Context, sn driver.Snapshotter, spec driver.Spec, dir string) (driver.Instance, error) {
	t0 := time.Now()
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	di, err := sn.Restore(startCtx, spec, dir)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("restoring: %w", err)
	}
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	req := protocol.Restore{
		HostUnixNano:    h.now().UnixNano(),
		Seed:            seed,
		Hostname:        "sandbox-" + spec.ID,
		RestoreDuration: time.Since(t0),
	}
	f, err := roundTrip(ctx, di, protocol.TypeRestore, req, protocol.TypeRestoreDone, restoreTimeout)
	if err == nil {
		var done protocol.RestoreDone
		if err = f.Decode(&done); err == nil && done.Error != nil {
			err = fmt.Errorf("%s: %s", done.Error.ErrorType, done.Error.ErrorMessage)
		}
	}
	if err != nil {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
		_ = h.cfg.Driver.Stop(sctx, spec.ID)
		cancel()
		return nil, fmt.Errorf("renewing the restored environment: %w", err)
	}
	return di, nil
}

// removeSnapshots deletes snapshot directories, logging failures.
func (h *Harness) removeSnapshots(dirs []string) {
	for _, dir := range dirs {
		if err := os.RemoveAll(dir); err != nil {
			h.log.Warn("removing snapshot", "dir", dir, "error", err)
		}
	}
}

func writeSnapshotMeta(dir string, sn *snapshot) error {
	b, err := json.Marshal(sn)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, snapshotMeta), b, 0o600)
}

// diskUsage is the bytes the files under dir occupy on disk (sparse files
// count what they hold, not their length).
func diskUsage(dir string) int64 {
	fileBlocks := func(fi fs.FileInfo) int64 {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			return st.Blocks * 512
		}
		return fi.Size()
	}
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			n += fileBlocks(fi)
		}
		return nil
	})
	return n
}
