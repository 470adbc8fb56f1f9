// Package harness runs functions on one host: it keeps pools of execution
// environments (instances) per function revision, starts them through a
// driver.Driver, speaks package protocol to the agent inside each, and
// enforces Lambda's execution model: one invocation at a time per
// instance, warm reuse, concurrency caps that throttle instead of queueing,
// scale to zero after KeepAlive, and a fresh environment after any timeout
// or crash.
//
// # Life of an invocation
//
//	Invoke ─> idle instance of the revision? ──yes──> busy ─> Invoke frame ─> Result
//	             │ no                                                          │
//	             v                                                  Reset/timeout/exit?
//	    function and host caps allow? ──no──> ErrThrottled           no │     │ yes
//	             │ yes                                                  v     v
//	    code + runtime files ─> Driver.Start ─> Init ─> InitDone      idle  stopping ─> gone
//
// Instance states and their legal transitions are drawn on State.
//
// # Cancellation
//
// Invoke returns ctx.Err() as soon as its caller gives up, but the work it
// started goes on in the background, bounded by the function's timeout and
// a safety margin: the invocation finishes (or its instance is destroyed)
// and a cold start completes (the new instance then waits idle). Nothing is
// leaked when a client disconnects.
package harness

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/runtimes"
)

// Config configures a Harness. Zero fields take the defaults documented on
// each.
type Config struct {
	// Driver starts and stops sandboxes. Required. The harness does not
	// close it.
	Driver driver.Driver
	// CacheDir holds unpacked code (CacheDir/code) and runtime support
	// files (CacheDir/runtime). Required. The harness owns its contents.
	CacheDir string
	// Code hands out deployment packages by CodeSha256. Required.
	Code CodeSource
	// KeepAlive is how long an idle instance is kept warm; default 10 min.
	KeepAlive time.Duration
	// DefaultConcurrency caps a function's concurrent invocations on this
	// host when it has no ReservedConcurrency; default 100.
	DefaultConcurrency int
	// MaxMemoryMB caps the sum of the instances' MemorySize; default the
	// host's RAM.
	MaxMemoryMB int
	// MaxInstances caps the instances on this host; default
	// MaxMemoryMB / 128 (the smallest function size).
	MaxInstances int
	// SandboxUID and SandboxGID are what function code runs as. 0 means
	// the default: 993 when the harness runs as root, else 0 (the agent's
	// own). Negative values force 0.
	SandboxUID, SandboxGID int
	// Network gives sandboxes a network to the outside (driver.Spec.Network).
	Network bool
	// Region is AWS_REGION; default us-east-1.
	Region string
	// Account is the account in the function ARNs the harness makes itself
	// (a snapshot's INIT); default 000000000000, the control plane's.
	Account string
	// SnapshotBudget caps the disk the SnapStart snapshots of this host
	// take (bytes); default 10 GiB. Over it, the least recently used
	// snapshots go.
	SnapshotBudget int64
	// Logger receives the harness's logs; default discards them.
	Logger *slog.Logger
	// Now is the clock for timestamps and keep-alive; default time.Now.
	Now func() time.Time
	// RuntimeFiles returns a runtime family's support files (mounted at
	// /var/runtime), nil for none; default runtimes.SupportFiles.
	RuntimeFiles func(runtimes.Family) fs.FS
	// Metrics, when set, receives the harness's Prometheus metrics.
	Metrics prometheus.Registerer
	// Runtime looks up a runtime of the runtimes DB by ID, for Prepare
	// (invocations carry theirs); default: the built-in catalog.
	// ErrNotFound for an unknown ID.
	Runtime func(ctx context.Context, id string) (*runtimes.Runtime, error)
}

// builtinRuntime is Config.Runtime's default.
func builtinRuntime(_ context.Context, id string) (*runtimes.Runtime, error) {
	for _, rt := range runtimes.Builtin() {
		if rt.ID == id {
			return rt, nil
		}
	}
	return nil, fmt.Errorf("runtime %q: %w", id, errdefs.ErrNotFound)
}

// defaultSandboxID is the uid and gid of function code when running as root.
const defaultSandboxID = 993

// Harness is the per-host Host. Create it with New, call Start once, and
// Close it when done. All methods are safe for concurrent use.
type Harness struct {
	cfg      Config
	log      *slog.Logger
	now      func() time.Time
	code     *codeCache
	runtimes *runtimeCache
	snaps    *snapshots
	metrics  *metrics
	// initTimeout is INIT's limit: Lambda's, stretched when the driver's
	// guests are emulated (see emulatedInitFactor).
	initTimeout time.Duration

	// bgCtx is the parent of all background work (cold starts, running
	// invocations); Close cancels it once in-flight work had its chance.
	bgCtx    context.Context
	cancelBg context.CancelFunc

	mu      sync.Mutex
	pools   map[string]*pool
	started bool // Start was called
	running bool // Start succeeded
	closing bool
	// inflight counts Invoke calls and their background work.
	inflight sync.WaitGroup
	// live counts instances that are not gone.
	live       sync.WaitGroup
	stopReaper chan struct{}
	reaperDone chan struct{}
	closeOnce  sync.Once
	closeErr   error

	capMu         sync.Mutex
	hostInstances int
	hostMemoryMB  int

	stats counters
}

var _ Host = (*Harness)(nil)

type counters struct {
	invocations   atomic.Uint64
	coldStarts    atomic.Uint64
	throttles     atomic.Uint64
	initErrors    atomic.Uint64
	resets        atomic.Uint64
	timeouts      atomic.Uint64
	exits         atomic.Uint64
	evictions     atomic.Uint64
	stops         atomic.Uint64
	driverStartNs atomic.Int64
	initNs        atomic.Int64
}

// New validates cfg, fills its defaults and returns a Harness that is not
// started yet.
func New(cfg Config) (*Harness, error) {
	if cfg.Driver == nil {
		return nil, errdefs.Invalid("harness: a driver is required")
	}
	if cfg.CacheDir == "" {
		return nil, errdefs.Invalid("harness: a cache directory is required")
	}
	if cfg.Code == nil {
		return nil, errdefs.Invalid("harness: a code source is required")
	}
	if cfg.KeepAlive < 0 || cfg.DefaultConcurrency < 0 || cfg.MaxMemoryMB < 0 || cfg.MaxInstances < 0 {
		return nil, errdefs.Invalid("harness: limits must not be negative")
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 10 * time.Minute
	}
	if cfg.DefaultConcurrency == 0 {
		cfg.DefaultConcurrency = 100
	}
	if cfg.MaxMemoryMB == 0 {
		mb, err := hostMemoryMB()
		if err != nil {
			return nil, fmt.Errorf("harness: sizing host memory: %w", err)
		}
		cfg.MaxMemoryMB = mb
	}
	if cfg.MaxInstances == 0 {
		cfg.MaxInstances = max(1, cfg.MaxMemoryMB/function.MinMemory)
	}
	cfg.SandboxUID = sandboxID(cfg.SandboxUID)
	cfg.SandboxGID = sandboxID(cfg.SandboxGID)
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.RuntimeFiles == nil {
		cfg.RuntimeFiles = runtimes.SupportFiles
	}
	if cfg.Runtime == nil {
		cfg.Runtime = builtinRuntime
	}
	if cfg.Account == "" {
		cfg.Account = "000000000000"
	}
	if cfg.SnapshotBudget <= 0 {
		cfg.SnapshotBudget = defaultSnapshotBudget
	}
	abs, err := filepath.Abs(cfg.CacheDir)
	if err != nil {
		return nil, fmt.Errorf("harness: cache directory: %w", err)
	}
	cfg.CacheDir = abs
	m, err := newMetrics(cfg.Metrics, cfg.Driver)
	if err != nil {
		return nil, fmt.Errorf("harness: registering metrics: %w", err)
	}
	log := cfg.Logger.With("driver", cfg.Driver.Name())
	h := &Harness{
		cfg:         cfg,
		log:         log,
		now:         cfg.Now,
		code:        newCodeCache(filepath.Join(abs, "code"), cfg.Code, log),
		runtimes:    newRuntimeCache(filepath.Join(abs, "runtime"), cfg.RuntimeFiles),
		snaps:       newSnapshots(filepath.Join(abs, "snapshots"), cfg.SnapshotBudget),
		metrics:     m,
		pools:       map[string]*pool{},
		initTimeout: initTimeout,
	}
	if em, ok := cfg.Driver.(driver.Emulator); ok && em.Emulated() {
		h.initTimeout = initTimeout * emulatedInitFactor
		log.Warn("guests run under software emulation: INIT may take up to "+h.initTimeout.String()+" instead of Lambda's "+initTimeout.String(),
			"init_timeout", h.initTimeout)
	}
	h.bgCtx, h.cancelBg = context.WithCancel(context.Background())
	if m != nil {
		m.bind(h)
	}
	return h, nil
}

func sandboxID(v int) int {
	switch {
	case v < 0:
		return 0
	case v == 0 && os.Geteuid() == 0:
		return defaultSandboxID
	}
	return v
}

func hostMemoryMB() (int, error) {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0, err
	}
	return int(uint64(si.Totalram) * uint64(si.Unit) >> 20), nil
}

// Start prepares the host: it clears what a previous harness left in the
// cache, calls Driver.Recover once and stops every instance it returns, and
// starts the keep-alive reaper. Invoke fails with ErrUnavailable until
// Start returned nil.
//
// Recovered instances are stopped rather than adopted: the protocol has no
// way to ask an agent where its conversation stands (a crashed harness may
// have left it mid-invocation), so the harness cannot speak to it safely.
func (h *Harness) Start(ctx context.Context) error {
	h.mu.Lock()
	if h.started || h.closing {
		h.mu.Unlock()
		return fmt.Errorf("harness: already started or closed: %w", errdefs.ErrConflict)
	}
	h.started = true
	h.mu.Unlock()

	if err := h.clearCache(); err != nil {
		return err
	}
	if err := h.snaps.load(); err != nil {
		return err
	}
	insts, err := h.cfg.Driver.Recover(ctx)
	if err != nil {
		return fmt.Errorf("recovering instances: %w", err)
	}
	var errs []error
	for _, inst := range insts {
		_ = inst.Conn().Close()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
		err := h.cfg.Driver.Stop(sctx, inst.ID())
		cancel()
		attrs := []any{"function", "", "revision", "", "instance", inst.ID(), "reason", "recovered"}
		if err != nil {
			errs = append(errs, fmt.Errorf("stopping recovered instance %s: %w", inst.ID(), err))
			h.log.Error("instance stopped", append(attrs, "error", err)...)
			continue
		}
		h.log.Info("instance stopped", attrs...)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return fmt.Errorf("harness: closed while starting: %w", errdefs.ErrUnavailable)
	}
	h.stopReaper = make(chan struct{})
	h.reaperDone = make(chan struct{})
	go h.reaper(h.stopReaper, h.reaperDone)
	h.running = true
	return nil
}

// clearCache removes unpacked code (no instance survives a restart) and
// half-written runtime directories. Complete runtime directories are
// content-addressed and kept.
func (h *Harness) clearCache() error {
	codeDir := filepath.Join(h.cfg.CacheDir, "code")
	if err := os.RemoveAll(codeDir); err != nil {
		return fmt.Errorf("clearing code cache: %w", err)
	}
	rtDir := filepath.Join(h.cfg.CacheDir, "runtime")
	tmps, _ := filepath.Glob(filepath.Join(rtDir, ".tmp-*"))
	for _, t := range tmps {
		if err := os.RemoveAll(t); err != nil {
			return fmt.Errorf("clearing runtime cache: %w", err)
		}
	}
	for _, d := range []string{codeDir, rtDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating cache: %w", err)
		}
	}
	return nil
}

// enter admits one Invoke unless the harness is not running.
func (h *Harness) enter() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closing {
		return fmt.Errorf("harness is shutting down: %w", errdefs.ErrUnavailable)
	}
	if !h.running {
		return fmt.Errorf("harness is not started: %w", errdefs.ErrUnavailable)
	}
	h.inflight.Add(1)
	return nil
}

// Invoke implements Host.
func (h *Harness) Invoke(ctx context.Context, req *InvokeRequest) (*InvokeResult, error) {
	if err := checkRequest(req); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := h.enter(); err != nil {
		return nil, err
	}
	start := h.now()
	req = normalize(req, ctx.Done() != nil)
	i, cold, err := h.acquire(req)
	if err != nil {
		h.inflight.Done()
		return nil, err
	}
	h.stats.invocations.Add(1)
	if ctx.Done() == nil {
		// A caller that cannot give up (the control plane's calls carry
		// context.WithoutCancel) waits for the end anyway: run here rather
		// than in a goroutine of its own.
		defer h.inflight.Done()
		return h.run(ctx, i, cold, req, start)
	}
	type outcome struct {
		res *InvokeResult
		err error
	}
	out := make(chan outcome, 1)
	go func() {
		defer h.inflight.Done()
		res, err := h.run(ctx, i, cold, req, start)
		out <- outcome{res, err}
	}()
	select {
	case o := <-out:
		return o.res, o.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// run does an invocation's work in the background of Invoke. ctx is only
// consulted to skip invoking on a cold-started instance whose caller left.
func (h *Harness) run(ctx context.Context, i *instance, cold bool, req *InvokeRequest, start time.Time) (*InvokeResult, error) {
	if cold {
		res, err := h.coldStart(i, req, start)
		if res != nil || err != nil {
			return res, err
		}
		p := i.pool
		p.mu.Lock()
		switch {
		case h.bgCtx.Err() != nil:
			err := p.move(i, StateStopping)
			p.mu.Unlock()
			if err == nil {
				go h.teardown(i, "harness closing", true)
			}
			return nil, fmt.Errorf("invoking %s: harness is shutting down: %w", req.Function.Name, errdefs.ErrUnavailable)
		case ctx.Err() != nil:
			// The client is gone: keep the new instance warm instead of
			// running an invocation nobody waits for.
			if !i.retire {
				i.lastUsed = h.now()
				if p.move(i, StateIdle) == nil {
					p.mu.Unlock()
					return nil, ctx.Err()
				}
			}
			// Its revision was retired meanwhile: stop it now.
			err := p.move(i, StateStopping)
			p.mu.Unlock()
			if err == nil {
				go h.teardown(i, "retired", true)
			}
			return nil, ctx.Err()
		}
		// A retired instance still serves the invocation it was started
		// for; release stops it afterwards.
		err = p.move(i, StateBusy)
		p.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	res, keep, reason, err := h.invokeOn(i, req, cold, start)
	h.release(i, keep, reason)
	return res, err
}

// checkRequest refuses requests the harness cannot place.
func checkRequest(req *InvokeRequest) error {
	if req == nil || req.Function == nil {
		return errdefs.Invalid("invoke request without a function")
	}
	if req.Function.Name == "" {
		return errdefs.Invalid("invoke request without a function name")
	}
	if req.Runtime == nil {
		return fmt.Errorf("function %s has no runtime: %w", req.Function.Name, errdefs.ErrInvalidRuntime)
	}
	if !req.Runtime.Available {
		return fmt.Errorf("runtime %s cannot run on this host (%s): %w", req.Runtime.ID, req.Runtime.Reason, errdefs.ErrInvalidRuntime)
	}
	if len(req.Runtime.Bootstrap) == 0 {
		return fmt.Errorf("runtime %s has no bootstrap command: %w", req.Runtime.ID, errdefs.ErrInvalidRuntime)
	}
	return nil
}

// normalize returns req with the configuration's zero limits set to
// Lambda's defaults. The caller's configuration and runtime are only read,
// and only during the call (InvokeRequest's contract). When the work may
// outlive the call (private: the caller can give up and Invoke returns
// early), it gets copies of them; otherwise it copies only a configuration
// that lacks a default, so the control plane's calls (stored
// configurations have their defaults, and its contexts cannot be
// cancelled) copy nothing.
func normalize(req *InvokeRequest, private bool) *InvokeRequest {
	fn := req.Function
	complete := fn.Timeout != 0 && fn.MemorySize != 0 && fn.EphemeralStorage != 0 && len(fn.Architectures) > 0 && fn.Version != ""
	if complete && !private {
		return req
	}
	r := *req
	r.Function = fn.Clone()
	r.Function.ApplyDefaults()
	if private {
		rt := *req.Runtime
		r.Runtime = &rt
	}
	return &r
}

// Close shuts the harness down: new invocations fail with ErrUnavailable,
// in-flight ones may finish until ctx is done, then every instance is
// stopped through the driver. It returns once all instances are gone.
// Calling it again waits for the first call and returns its result.
func (h *Harness) Close(ctx context.Context) error {
	h.closeOnce.Do(func() { h.closeErr = h.close(ctx) })
	return h.closeErr
}

func (h *Harness) close(ctx context.Context) error {
	h.mu.Lock()
	h.closing = true
	stopReaper, reaperDone := h.stopReaper, h.reaperDone
	h.mu.Unlock()
	if stopReaper != nil {
		close(stopReaper)
		<-reaperDone
	}

	drained := make(chan struct{})
	go func() { h.inflight.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-ctx.Done():
	}
	// Abort what is still running: cold starts and invocations watch
	// bgCtx and destroy their instances.
	h.cancelBg()

	var idle []*instance
	for _, p := range h.poolList() {
		p.mu.Lock()
		for _, i := range p.instances {
			switch i.state {
			case StateIdle:
				if p.move(i, StateStopping) == nil {
					idle = append(idle, i)
				}
			case StateStarting, StateBusy:
				i.retire = true
			}
		}
		p.mu.Unlock()
	}
	h.stopAll(context.Background(), idle, "harness closing")
	<-drained
	h.live.Wait()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("closing harness: in-flight invocations cut short: %w", err)
	}
	return nil
}
