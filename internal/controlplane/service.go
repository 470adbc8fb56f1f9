// Package controlplane is InvokeX's control plane: it validates and stores
// functions and their code (applications DB and blob store), keeps the
// runtimes DB in step with what this host can run, places invocations on
// harness hosts, records every invocation and runs the durable async (Event)
// queue with Lambda's retry semantics.
//
// Lifecycle: New builds a Service; Start syncs the runtimes DB and starts the
// background work (async batcher and workers, record writer, retention);
// Close stops it in order (no new work, queued enqueues committed, in-flight
// async invocations finished or interrupted, records flushed). Every method
// is safe for concurrent use. Methods other than Start and Close return
// ErrUnavailable before Start and after Close.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/invokex/invokex/internal/codezip"
	"github.com/invokex/invokex/internal/controlplane/blob"
	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/runtimes"
)

// Defaults for Config's zero fields.
const (
	DefaultRegion            = "us-east-1"
	DefaultAccount           = "000000000000"
	DefaultAsyncWorkers      = 8
	DefaultMaxEventAge       = 6 * time.Hour
	DefaultThrottleRetryBase = time.Second
	DefaultRecordRetention   = 7 * 24 * time.Hour
	// DefaultMaxReservedConcurrency caps PutFunctionConcurrency, like
	// Lambda's default account concurrency of 1,000.
	DefaultMaxReservedConcurrency = 1000
)

// DefaultRetryDelays are Lambda's waits before the first and second retry
// of an Event invocation whose function failed.
var DefaultRetryDelays = []time.Duration{time.Minute, 2 * time.Minute}

// Config configures a Service. Store and Blobs are required; the Service
// uses them but does not close them.
type Config struct {
	Store store.Store
	Blobs blob.Store
	// Hosts are the placement targets (today one, in-process).
	Hosts []harness.Host
	// Placer chooses among Hosts; nil means NewAffinityPlacer(Hosts).
	Placer Placer

	Region  string // default "us-east-1"
	Account string // default "000000000000"
	Logger  *slog.Logger

	// AsyncWorkers is how many Event invocations run at once.
	AsyncWorkers int
	// RetryDelays are the waits before each retry of an Event invocation
	// whose function failed; nil means Lambda's [1m, 2m], an empty non-nil
	// slice means no retries.
	RetryDelays []time.Duration
	// MaxEventAge bounds how long an Event is retried after throttles or
	// platform errors, counted from its enqueue (Lambda: 6h).
	MaxEventAge time.Duration
	// ThrottleRetryBase is the first backoff after a throttle; it doubles
	// with every further throttle, up to 5 minutes.
	ThrottleRetryBase time.Duration
	// Limits caps deployment packages; zero fields are Lambda's.
	Limits codezip.Limits
	// RecordRetention is how long invocation records are kept (default 7
	// days; negative keeps them forever).
	RecordRetention time.Duration
	// MaxReservedConcurrency caps PutFunctionConcurrency (default 1000).
	MaxReservedConcurrency int

	// DetectRuntimes probes which runtimes this host can run; nil means
	// runtimes.Detect.
	DetectRuntimes func(ctx context.Context) []*runtimes.Runtime
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

func (c *Config) applyDefaults() error {
	if c.Store == nil {
		return errors.New("controlplane: Config.Store is required")
	}
	if c.Blobs == nil {
		return errors.New("controlplane: Config.Blobs is required")
	}
	if c.Region == "" {
		c.Region = DefaultRegion
	}
	if c.Account == "" {
		c.Account = DefaultAccount
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.AsyncWorkers <= 0 {
		c.AsyncWorkers = DefaultAsyncWorkers
	}
	if c.RetryDelays == nil {
		c.RetryDelays = DefaultRetryDelays
	}
	c.RetryDelays = append([]time.Duration(nil), c.RetryDelays...)
	if c.MaxEventAge <= 0 {
		c.MaxEventAge = DefaultMaxEventAge
	}
	if c.ThrottleRetryBase <= 0 {
		c.ThrottleRetryBase = DefaultThrottleRetryBase
	}
	if c.RecordRetention == 0 {
		c.RecordRetention = DefaultRecordRetention
	}
	if c.MaxReservedConcurrency <= 0 {
		c.MaxReservedConcurrency = DefaultMaxReservedConcurrency
	}
	if c.DetectRuntimes == nil {
		c.DetectRuntimes = runtimes.Detect
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Placer == nil {
		c.Placer = NewAffinityPlacer(c.Hosts)
	}
	return nil
}

// Service is the control plane. It implements API.
type Service struct {
	cfg    Config
	log    *slog.Logger
	store  store.Store
	blobs  blob.Store
	placer Placer

	// fnLocks serialises mutations of one function in this process, so a
	// read-modify-write (and the code garbage collection that follows it)
	// is never interleaved with another; the store's revision CAS still
	// guards against other processes.
	fnLocks keyedMutex
	// codeLocks serialise, per code digest, storing a blob and referencing
	// it against checking that it is unreferenced and deleting it.
	codeLocks keyedMutex

	// cache holds configurations and runtime rows for the invoke path; see
	// configCache for the single-writer assumption it rests on.
	cache   *configCache
	records *recordWriter
	async   *asyncQueue
	// versionWork prepares Pending (SnapStart) versions in the background.
	versionWork versionWork

	state    atomic.Int32 // stateNew, stateRunning, stateClosed
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup
}

const (
	stateNew int32 = iota
	stateRunning
	stateClosed
)

var _ API = (*Service)(nil)

// New builds a Service from cfg, filling zero fields with defaults. It
// starts nothing; call Start.
func New(cfg Config) (*Service, error) {
	if err := cfg.applyDefaults(); err != nil {
		return nil, err
	}
	s := &Service{
		cfg:    cfg,
		log:    cfg.Logger,
		store:  cfg.Store,
		blobs:  cfg.Blobs,
		placer: cfg.Placer,
		cache:  newConfigCache(),
	}
	s.records = newRecordWriter(cfg.Store.Invocations(), cfg.Logger)
	s.async = newAsyncQueue(s)
	return s, nil
}

// Start syncs the runtimes DB with what this host can run and starts the
// background work. It may be called once.
func (s *Service) Start(ctx context.Context) error {
	if !s.state.CompareAndSwap(stateNew, stateRunning) {
		return fmt.Errorf("starting control plane: already started or closed: %w", errdefs.ErrConflict)
	}
	if err := s.syncRuntimes(ctx); err != nil {
		s.state.Store(stateClosed)
		return err
	}
	// The Service is its queue's only user (the same assumption as the
	// config cache), so leases still held now belong to a process that
	// crashed: their events run again at once, not when the lease expires.
	if n, err := s.store.Queue().ReleaseLeases(ctx, s.now()); err != nil {
		s.state.Store(stateClosed)
		return fmt.Errorf("releasing a previous run's event leases: %w", err)
	} else if n > 0 {
		s.log.Info("re-queued events claimed by a previous run", "count", n)
	}
	pending, err := s.store.Versions().ListPending(ctx)
	if err != nil {
		s.state.Store(stateClosed)
		return fmt.Errorf("listing versions a previous run left pending: %w", err)
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	s.bgCancel = cancel
	s.records.start()
	s.async.start(bg)
	s.versionWork.start(bg)
	s.resumePending(pending)
	if s.cfg.RecordRetention > 0 {
		s.bgWG.Add(1)
		go func() {
			defer s.bgWG.Done()
			s.retentionLoop(bg)
		}()
	}
	return nil
}

// syncRuntimes writes what this host can run into the runtimes DB. Rows
// this version no longer knows are kept (functions may name them) but
// marked unavailable.
func (s *Service) syncRuntimes(ctx context.Context) error {
	defer s.cache.invalidateAll()
	detected := s.cfg.DetectRuntimes(ctx)
	known := make(map[string]bool, len(detected))
	for _, rt := range detected {
		known[rt.ID] = true
		if err := s.store.Runtimes().Put(ctx, rt); err != nil {
			return fmt.Errorf("syncing runtime %s: %w", rt.ID, err)
		}
	}
	stored, err := s.store.Runtimes().List(ctx)
	if err != nil {
		return fmt.Errorf("listing runtimes: %w", err)
	}
	for _, rt := range stored {
		if known[rt.ID] || !rt.Available {
			continue
		}
		rt.Available, rt.Reason = false, "this version of InvokeX does not support it"
		if err := s.store.Runtimes().Put(ctx, rt); err != nil {
			return fmt.Errorf("syncing runtime %s: %w", rt.ID, err)
		}
	}
	return nil
}

// Close stops the background work: new calls fail with ErrUnavailable,
// pending async enqueues are committed, async workers finish their current
// invocation (or, when ctx ends first, have it interrupted and put back in
// the queue), versions being prepared are left Pending for the next start,
// and buffered invocation records are flushed. It does not close
// the Store, the blob store or the hosts. It returns ctx.Err() if ctx ended
// before the workers were done; the records are flushed regardless.
func (s *Service) Close(ctx context.Context) error {
	prev := s.state.Swap(stateClosed)
	if prev != stateRunning {
		return nil
	}
	err := s.async.stop(ctx)
	s.versionWork.stop()
	s.bgCancel()
	s.bgWG.Wait()
	// Records go last: the workers above write them until they stop.
	s.records.stop()
	return err
}

// running returns ErrUnavailable unless the Service is started and open.
func (s *Service) running() error {
	switch s.state.Load() {
	case stateRunning:
		return nil
	case stateNew:
		return fmt.Errorf("control plane is not started: %w", errdefs.ErrUnavailable)
	default:
		return fmt.Errorf("control plane is shutting down: %w", errdefs.ErrUnavailable)
	}
}

func (s *Service) now() time.Time { return s.cfg.Now() }

func (s *Service) arn(name string) string {
	return function.ARN(s.cfg.Region, s.cfg.Account, name)
}

// retentionLoop deletes records older than RecordRetention, hourly.
func (s *Service) retentionLoop(ctx context.Context) {
	t := time.NewTicker(time.Hour)
	defer t.Stop()
	for {
		n, err := s.store.Invocations().DeleteBefore(ctx, s.now().Add(-s.cfg.RecordRetention))
		switch {
		case err != nil && ctx.Err() == nil:
			s.log.Warn("deleting expired invocation records", "error", err)
		case n > 0:
			s.log.Info("deleted expired invocation records", "count", n)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// keyedMutex is a set of mutexes created on demand per key and dropped when
// unused.
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

// Lock locks key and returns its unlock function.
func (k *keyedMutex) Lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedEntry{}
	}
	e := k.locks[key]
	if e == nil {
		e = &keyedEntry{}
		k.locks[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}
