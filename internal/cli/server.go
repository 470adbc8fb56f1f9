package cli

import (
	"github.com/invokex/invokex/internal/harness/network"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/server"
)

// serverFlags are shared by `server` and `up`.
type serverFlags struct {
	listen         string
	dataDir        string
	driver         string
	keepAlive      time.Duration
	concurrency    int
	sandboxNetwork bool
	asyncWorkers   int
	firecracker    string
	jailer         string
	warm           int
	tcgCacheMB     int
	sandboxSubnet  string
	sandboxAllow   []string
}

func (f *serverFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.listen, "listen", "127.0.0.1:9000", "address of the HTTP API")
	cmd.Flags().StringVar(&f.dataDir, "data-dir", defaultDataDir(), "directory for the database, code and sandbox state (env INVOKEX_DATA_DIR)")
	cmd.Flags().StringVar(&f.driver, "driver", "auto", "sandbox driver: auto (the strongest isolation that works here: firecracker microVMs where KVM and firecracker are, else qemu microVMs where QEMU and a guest kernel are, else process), process, qemu or firecracker (VMs need `invokex guest kernel`)")
	cmd.Flags().DurationVar(&f.keepAlive, "keep-alive", 10*time.Minute, "stop instances idle this long (scale to zero)")
	cmd.Flags().IntVar(&f.concurrency, "default-concurrency", 100, "concurrent executions per function without reserved concurrency")
	cmd.Flags().BoolVar(&f.sandboxNetwork, "sandbox-network", false, "give functions a network as Lambda's (outside a VPC): the internet, but not this host, its private networks or other sandboxes (root; default: loopback only)")
	cmd.Flags().StringVar(&f.sandboxSubnet, "sandbox-subnet", "", "with --sandbox-network: IPv4 network of the sandboxes' links, a /30 each (default "+network.DefaultSubnet.String()+")")
	cmd.Flags().StringSliceVar(&f.sandboxAllow, "sandbox-allow", nil, "with --sandbox-network: private networks functions may reach anyway (CIDR, repeatable)")
	cmd.Flags().IntVar(&f.warm, "warm-sandboxes", 0, "sandboxes the driver keeps started ahead of need, so cold starts skip the start: warm sandboxes (process driver, default 2) or spare VMs booted for the shape asked for last (qemu, firecracker; default 1, each costs what an idle VM does); -1 for none")
	cmd.Flags().IntVar(&f.tcgCacheMB, "tcg-cache-mb", 0, "qemu driver under software emulation (no KVM): MiB of translated code each VM may keep, host memory of every VM as it fills; smaller empties it sooner and translates again (default 24; VMs restored from a spare template get twice as much)")
	cmd.Flags().IntVar(&f.asyncWorkers, "async-workers", 8, "workers running Event invocations")
	cmd.Flags().StringVar(&f.firecracker, "firecracker", "", "firecracker binary of the firecracker driver (default: from PATH); see docs/firecracker.md")
	cmd.Flags().StringVar(&f.jailer, "jailer", "", "start every Firecracker VM through this jailer binary (chroot, cgroups, a user per VM; needs root)")
}

func (f *serverFlags) config(g *globals) server.Config {
	return server.Config{
		Listen:             f.listen,
		DataDir:            f.dataDir,
		Driver:             f.driver,
		KeepAlive:          f.keepAlive,
		DefaultConcurrency: f.concurrency,
		SandboxNetwork:     f.sandboxNetwork,
		SandboxSubnet:      f.sandboxSubnet,
		SandboxAllow:       f.sandboxAllow,
		AsyncWorkers:       f.asyncWorkers,
		FirecrackerPath:    f.firecracker,
		JailerPath:         f.jailer,
		WarmSandboxes:      f.warm,
		TCGCacheMB:         f.tcgCacheMB,
		Logger:             g.logger(),
	}
}

// defaultDataDir is $INVOKEX_DATA_DIR, else /var/lib/invokex for root, else
// ~/.local/share/invokex.
func defaultDataDir() string {
	if d := os.Getenv("INVOKEX_DATA_DIR"); d != "" {
		return d
	}
	if os.Geteuid() == 0 {
		return "/var/lib/invokex"
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "invokex")
	}
	return ".invokex"
}

func newServerCmd(g *globals) *cobra.Command {
	var f serverFlags
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run the all-in-one server (frontend, control plane, harness) until interrupted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return server.Run(cmd.Context(), f.config(g))
		},
	}
	f.register(cmd)
	return cmd
}
