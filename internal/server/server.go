// Package server wires InvokeX's roles into the all-in-one server: the
// frontend, the control plane with its SQLite store and filesystem blob
// store, and one harness with its sandbox driver, all in one process and
// all talking through the interfaces they will use across hosts.
//
// Data directory layout:
//
//	DIR/invokex.db        SQLite: applications DB, runtimes DB, records, queue
//	DIR/blobs/            deployment packages by SHA-256
//	DIR/cache/            harness: unpacked code and runtime files
//	DIR/sandboxes/        driver: one directory per live instance (crash recovery)
//	DIR/LOCK              held while a server uses DIR
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/controlplane/blob/fsblob"
	"github.com/invokex/invokex/internal/controlplane/store/sqlite"
	"github.com/invokex/invokex/internal/frontend"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/runtimes"
)

// Config is the all-in-one server's configuration.
type Config struct {
	Listen  string // default 127.0.0.1:9000
	DataDir string // default ./.data? set by the CLI
	// Driver is auto, process, qemu or firecracker (see newDriver).
	Driver string
	// FirecrackerPath and JailerPath configure the firecracker driver
	// (default: firecracker from PATH, no jailer).
	FirecrackerPath, JailerPath string
	// AgentBin is the agent binary sandboxes run; default: found by
	// package agentbin (invokex-agent next to this executable, else this
	// executable).
	AgentBin string
	// KeepAlive stops instances idle this long (scale to zero).
	KeepAlive time.Duration
	// DefaultConcurrency caps a function without reserved concurrency.
	DefaultConcurrency int
	// SandboxNetwork gives sandboxes a network of their own with the
	// internet behind it (package network; off: loopback only), or, when
	// not root, the host's network.
	SandboxNetwork bool
	// SandboxSubnet ("" for network.DefaultSubnet) and SandboxAllow (CIDR
	// networks) configure it.
	SandboxSubnet string
	SandboxAllow  []string
	// WarmSandboxes is how many sandboxes the driver keeps started ahead
	// of need (process.Options.WarmSandboxes, the VM drivers' SpareVMs):
	// 0 the driver's default, negative none.
	WarmSandboxes int
	// TCGCacheMB is the qemu driver's cache of translated code under
	// software emulation (qemu.Options.TCGCacheMB); 0 its default.
	TCGCacheMB int
	// AsyncWorkers run Event invocations.
	AsyncWorkers int
	// ShutdownTimeout bounds a graceful shutdown.
	ShutdownTimeout time.Duration
	Logger          *slog.Logger
	// Ready, if set, is called with the bound address once the server serves.
	Ready func(addr string)
}

func (c *Config) defaults() {
	if c.Listen == "" {
		c.Listen = "127.0.0.1:9000"
	}
	if c.Driver == "" {
		c.Driver = "auto"
	}
	if c.KeepAlive == 0 {
		c.KeepAlive = 10 * time.Minute
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 15 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Run serves until ctx is cancelled, then shuts down within
// cfg.ShutdownTimeout: the listener stops accepting, in-flight requests
// finish, async workers stop, every sandbox is stopped and the store closed.
func Run(ctx context.Context, cfg Config) (retErr error) {
	cfg.defaults()
	log := cfg.Logger
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	unlock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return err
	}
	defer unlock()

	// Everything below is closed in reverse order on the way out, with a
	// context that survives ctx's cancellation but is bounded.
	var closers []func(context.Context) error
	// Each stage gets its own budget, so a slow one (a long invocation
	// holding the HTTP server) cannot starve the later ones (flushing
	// records, closing the store).
	defer func() {
		for i := len(closers) - 1; i >= 0; i-- {
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownTimeout)
			if err := closers[i](cctx); err != nil {
				retErr = errors.Join(retErr, err)
			}
			cancel()
		}
	}()

	st, err := sqlite.Open(ctx, filepath.Join(cfg.DataDir, "invokex.db"))
	if err != nil {
		return fmt.Errorf("opening store: %w", err)
	}
	closers = append(closers, func(context.Context) error { return st.Close() })

	blobs, err := fsblob.New(filepath.Join(cfg.DataDir, "blobs"))
	if err != nil {
		return fmt.Errorf("opening blob store: %w", err)
	}

	nm, err := newNetwork(ctx, cfg, log)
	if err != nil {
		return err
	}
	if nm != nil {
		// Closed after the driver (closers run in reverse).
		closers = append(closers, func(context.Context) error { return nm.Close() })
	}
	drv, err := newDriver(ctx, cfg, nm, log)
	if err != nil {
		return err
	}
	if c, ok := drv.(driver.Closer); ok {
		closers = append(closers, c.Close)
	}

	reg := prometheus.NewRegistry()
	h, err := harness.New(harness.Config{
		Driver:             drv,
		CacheDir:           filepath.Join(cfg.DataDir, "cache"),
		Code:               blobs,
		KeepAlive:          cfg.KeepAlive,
		DefaultConcurrency: cfg.DefaultConcurrency,
		Network:            cfg.SandboxNetwork,
		Runtime:            st.Runtimes().Get,
		Logger:             log.With("component", "harness"),
		Metrics:            reg,
	})
	if err != nil {
		return fmt.Errorf("creating harness: %w", err)
	}
	if err := h.Start(ctx); err != nil {
		return fmt.Errorf("starting harness: %w", err)
	}
	closers = append(closers, h.Close)

	var detect func(context.Context) []*runtimes.Runtime
	if rd, ok := drv.(driver.RuntimeDetector); ok {
		detect = rd.DetectRuntimes // VMs run their images' interpreters, not the host's
	}
	cp, err := controlplane.New(controlplane.Config{
		DetectRuntimes: detect,
		Store:          st,
		Blobs:          blobs,
		Hosts:          []harness.Host{h},
		Logger:         log.With("component", "controlplane"),
		AsyncWorkers:   cfg.AsyncWorkers,
	})
	if err != nil {
		return fmt.Errorf("creating control plane: %w", err)
	}
	if err := cp.Start(ctx); err != nil {
		return fmt.Errorf("starting control plane: %w", err)
	}
	closers = append(closers, cp.Close)

	fe := frontend.New(frontend.Config{
		API:     cp,
		Logger:  log.With("component", "frontend"),
		Metrics: reg,
	})
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	srv := &http.Server{Handler: fe, ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	closers = append(closers, func(ctx context.Context) error {
		if err := srv.Shutdown(ctx); err != nil {
			// In-flight requests outlived the budget: cut them off, so no
			// handler runs on into a closed control plane.
			return errors.Join(err, srv.Close())
		}
		return nil
	})

	log.Info("invokex serving", "addr", ln.Addr().String(), "data_dir", cfg.DataDir, "driver", drv.Name())
	if cfg.Ready != nil {
		cfg.Ready(ln.Addr().String())
	}
	select {
	case <-ctx.Done():
		log.Info("invokex shutting down")
		return nil
	case err := <-serveErr:
		return fmt.Errorf("serving http: %w", err)
	}
}

// lockDataDir takes an exclusive lock so two servers never share a data dir.
func lockDataDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening lock file: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("data dir %s is in use by another invokex server", dir)
	}
	return func() { f.Close() }, nil
}

// The control plane finds these on its hosts by type assertion; the
// harness cannot name the control plane's interfaces (it is imported by
// it), so the match is checked here.
var (
	_ controlplane.RevisionRetirer = (*harness.Harness)(nil)
	_ controlplane.VersionPreparer = (*harness.Harness)(nil)
)
