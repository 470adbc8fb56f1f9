package server

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/invokex/invokex/internal/agentbin"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/firecracker"
	"github.com/invokex/invokex/internal/harness/driver/process"
	"github.com/invokex/invokex/internal/harness/driver/qemu"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/network"
)

// newDriver creates the sandbox driver cfg.Driver names. "auto" picks the
// strongest isolation that works on this host: Firecracker microVMs when
// KVM runs a standard guest and a firecracker binary is found, else QEMU
// microVMs when QEMU, a guest kernel and a static agent are there (KVM or,
// failing that, software emulation), else the process sandbox. The choice
// and the reason for it are logged once.
func newDriver(ctx context.Context, cfg Config, nm *network.Manager, log *slog.Logger) (driver.Driver, error) {
	agent, err := findAgent(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	dlog := cfg.Logger.With("component", "driver")
	switch cfg.Driver {
	case "process":
		return newProcessDriver(cfg, agent, nm, dlog)
	case "qemu":
		return newQEMUDriver(cfg, agent, nm, dlog)
	case "firecracker":
		return newFirecrackerDriver(cfg, agent, nm, dlog)
	case "auto":
		if why := firecrackerMissing(ctx, cfg, agent); why != "" {
			log.Info("driver auto: not firecracker", "reason", why)
		} else if d, err := newFirecrackerDriver(cfg, agent, nm, dlog); err != nil {
			log.Warn("driver auto: firecracker unusable", "err", err)
		} else {
			log.Info("driver auto: firecracker microVMs", "describe", describe(d))
			return d, nil
		}
		if why := qemuMissing(agent); why != "" {
			log.Info("driver auto: process sandbox", "reason", why)
			return newProcessDriver(cfg, agent, nm, dlog)
		}
		d, err := newQEMUDriver(cfg, agent, nm, dlog)
		if err != nil {
			log.Warn("driver auto: qemu unusable, falling back to the process sandbox", "err", err)
			return newProcessDriver(cfg, agent, nm, dlog)
		}
		log.Info("driver auto: qemu microVMs", "describe", describe(d))
		return d, nil
	default:
		return nil, fmt.Errorf("unknown driver %q (want auto, process, qemu or firecracker)", cfg.Driver)
	}
}

// findAgent resolves the agent binary: cfg.AgentBin, else package
// agentbin's choice for this executable.
func findAgent(ctx context.Context, cfg Config, log *slog.Logger) (string, error) {
	if cfg.AgentBin != "" {
		if err := agentbin.Check(ctx, cfg.AgentBin); err != nil {
			return "", fmt.Errorf("agent binary: %w", err)
		}
		return cfg.AgentBin, nil
	}
	self, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("finding own executable: %w", err)
	}
	c, err := agentbin.Find(ctx, self)
	if err != nil {
		return "", fmt.Errorf("agent binary: %w", err)
	}
	if !c.Slim {
		log.Warn("sandboxes run the whole invokex binary as their agent (more memory per instance, slower VM boots)",
			"agent", c.Path, "reason", c.Reason)
	} else {
		log.Debug("agent binary", "agent", c.Path)
	}
	return c.Path, nil
}

// qemuMissing says why auto cannot use QEMU here ("" if it can try).
func qemuMissing(agent string) string {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return "qemu-system-x86_64 not installed"
	}
	if _, ok := guest.KernelPath(guest.DefaultCacheDir()); !ok {
		return "no guest kernel in " + guest.DefaultCacheDir() + " (run `invokex guest kernel`)"
	}
	if err := guest.CheckStatic(agent); err != nil {
		return "agent binary cannot be a VM's init: " + err.Error()
	}
	return ""
}

// firecrackerMissing says why auto cannot use Firecracker here ("" if it
// can try): it needs a firecracker binary, a guest kernel, a static agent
// and a /dev/kvm that runs a standard guest (probed with QEMU where it is
// installed: some nested hosts open /dev/kvm and then refuse every guest).
func firecrackerMissing(ctx context.Context, cfg Config, agent string) string {
	if cfg.FirecrackerPath == "" {
		if _, err := exec.LookPath("firecracker"); err != nil {
			return "no firecracker binary in PATH"
		}
	}
	if _, ok := guest.KernelPath(guest.DefaultCacheDir()); !ok {
		return "no guest kernel in " + guest.DefaultCacheDir() + " (run `invokex guest kernel`)"
	}
	if err := guest.CheckStatic(agent); err != nil {
		return "agent binary cannot be a VM's init: " + err.Error()
	}
	if err := vmm.OpenKVM(); err != nil {
		return err.Error()
	}
	if q, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		if err := vmm.ProbeKVM(ctx, q); err != nil {
			return "KVM cannot run a standard guest here: " + err.Error()
		}
	}
	return ""
}

func newFirecrackerDriver(cfg Config, agent string, nm *network.Manager, log *slog.Logger) (driver.Driver, error) {
	d, err := firecracker.New(firecracker.Options{
		StateDir:        filepath.Join(cfg.DataDir, "firecracker"),
		FirecrackerPath: cfg.FirecrackerPath,
		JailerPath:      cfg.JailerPath,
		SpareVMs:        cfg.WarmSandboxes,
		AgentBin:        agent,
		Network:         nm,
		Logger:          log,
	})
	if err != nil {
		return nil, fmt.Errorf("creating firecracker driver: %w", err)
	}
	return d, nil
}

// ProcessStateDir is the process driver's state directory in a server's
// data directory.
func ProcessStateDir(dataDir string) string { return filepath.Join(dataDir, "sandboxes") }

// QEMUStateDir is the qemu driver's state directory under dataDir.
func QEMUStateDir(dataDir string) string { return filepath.Join(dataDir, "vms") }

func newProcessDriver(cfg Config, agent string, nm *network.Manager, log *slog.Logger) (driver.Driver, error) {
	d, err := process.New(process.Options{
		StateDir:      ProcessStateDir(cfg.DataDir),
		InitCommand:   []string{agent, process.InitArg},
		WarmSandboxes: cfg.WarmSandboxes,
		Network:       nm,
		Logger:        log,
	})
	if err != nil {
		return nil, fmt.Errorf("creating process driver: %w", err)
	}
	return d, nil
}

func newQEMUDriver(cfg Config, agent string, nm *network.Manager, log *slog.Logger) (driver.Driver, error) {
	d, err := qemu.New(qemu.Options{
		StateDir:   QEMUStateDir(cfg.DataDir),
		SpareVMs:   cfg.WarmSandboxes,
		TCGCacheMB: cfg.TCGCacheMB,
		AgentBin:   agent,
		Network:    nm,
		Logger:     log,
	})
	if err != nil {
		return nil, fmt.Errorf("creating qemu driver: %w", err)
	}
	return d, nil
}

// newNetwork makes the sandboxes' network manager when cfg asks for
// networking; nil when it does not, or when not root: then sandboxes
// with a network share the host's, which is warned about.
func newNetwork(ctx context.Context, cfg Config, log *slog.Logger) (*network.Manager, error) {
	if !cfg.SandboxNetwork {
		// A server that crashed with networks up left its table and
		// forwarding; undo them if nothing else uses them.
		if err := network.Sweep(ctx); err != nil {
			log.Warn("removing a crashed server's sandbox network", "err", err)
		}
		return nil, nil
	}
	var ncfg network.Config
	if cfg.SandboxSubnet != "" {
		p, err := netip.ParsePrefix(cfg.SandboxSubnet)
		if err != nil {
			return nil, fmt.Errorf("--sandbox-subnet: %w", err)
		}
		ncfg.Subnet = p
	}
	for _, a := range cfg.SandboxAllow {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			return nil, fmt.Errorf("--sandbox-allow: %w", err)
		}
		ncfg.Allow = append(ncfg.Allow, p)
	}
	if os.Geteuid() != 0 {
		// Without root there is no isolated network to give; the rootless
		// process sandbox shares the host's.
		log.Warn("sandboxes share the host's network: functions can reach this server's API and every loopback service, including other sandboxes' Runtime APIs; use only with trusted functions", "reason", "not root")
		return nil, nil
	}
	// As root, a failure is an error: falling back would hand functions
	// the host's network on a host that was meant to isolate them.
	nm, err := network.New(ctx, ncfg)
	if err != nil {
		return nil, fmt.Errorf("sandbox network: %w", err)
	}
	log.Info("sandbox network", "describe", nm.Describe())
	return nm, nil
}

func describe(d driver.Driver) string {
	if ds, ok := d.(driver.Describer); ok {
		return strings.Join(ds.Describe(), "; ")
	}
	return d.Name()
}
