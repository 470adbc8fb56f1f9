package cli

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/agentbin"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/runtimes"
)

// newGuestCmd is `invokex guest`: building what microVMs boot (the guest
// kernel and the runtimes' root images) into the guest cache, ahead of a
// server that would otherwise build them on first use.
func newGuestCmd(g *globals) *cobra.Command {
	var cacheDir string
	cmd := &cobra.Command{
		Use:   "guest",
		Short: "Build the microVM guest kernel and runtime root images",
		Long: `The microVM drivers (qemu, firecracker) boot a guest kernel built from the
project's config fragment and one root image per runtime. These commands build
them into the cache (default $INVOKEX_CACHE_DIR or /var/cache/invokex); each is
built once and reused until its inputs change.`,
	}
	cmd.PersistentFlags().StringVar(&cacheDir, "cache-dir", guest.DefaultCacheDir(), "guest cache directory (env INVOKEX_CACHE_DIR)")
	cmd.AddCommand(newGuestKernelCmd(g, &cacheDir), newGuestRuntimeCmd(g, &cacheDir))
	return cmd
}

func newGuestKernelCmd(g *globals, cacheDir *string) *cobra.Command {
	var check bool
	cmd := &cobra.Command{
		Use:   "kernel",
		Short: "Build the guest kernel (minutes, once) and print its path",
		Long: `Builds vmlinux from Debian's linux-source-6.1 with the project's config
fragment, unless the cache already has it, and prints its path. $INVOKEX_KERNEL,
when set, names a prebuilt kernel to use instead. With --check nothing is built:
the command fails if the kernel is not cached.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if check {
				p, ok := guest.KernelPath(*cacheDir)
				if !ok {
					return fmt.Errorf("no guest kernel at %s: build it with `invokex guest kernel`: %w", p, errdefs.ErrNotFound)
				}
				fmt.Fprintln(g.stdout, p)
				return nil
			}
			p, err := guest.EnsureKernel(cmd.Context(), *cacheDir, g.logger())
			if err != nil {
				return err
			}
			fmt.Fprintln(g.stdout, p)
			return nil
		},
	}
	cmd.Flags().BoolVar(&check, "check", false, "only print the cached kernel's path; fail if there is none")
	return cmd
}

func newGuestRuntimeCmd(g *globals, cacheDir *string) *cobra.Command {
	var agent string
	cmd := &cobra.Command{
		Use:   "runtime",
		Short: "Build or import a runtime's root image",
	}
	cmd.PersistentFlags().StringVar(&agent, "agent", "", "static agent binary to use as the guest's /sbin/init (default: the one a server started from this binary uses: invokex-agent next to it, else this binary)")
	build := &cobra.Command{
		Use:   "build RUNTIME",
		Short: "Build RUNTIME's root image (python/nodejs: from Debian packages, minutes once) and print its path",
		Long: `provided.* runtimes get a tiny root: the agent, /etc and a CA bundle.
Interpreted runtimes get a Debian root (debootstrap minbase plus the
interpreter; needs root and the host's Debian mirror), unless a root was
imported for them. The agent binary must be static (CGO_ENABLED=0).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			rt, err := runtimeRow(cmd.Context(), *cacheDir, args[0])
			if err != nil {
				return err
			}
			if rt.Family != runtimes.FamilyProvided {
				if _, err := guest.BuildRoot(cmd.Context(), *cacheDir, rt, g.logger()); err != nil {
					return err
				}
			}
			return printRootImage(cmd.Context(), g, *cacheDir, rt, agent)
		},
	}
	imp := &cobra.Command{
		Use:   "import RUNTIME SOURCE",
		Short: "Use a directory tree, an OCI image (layout or archive) or a docker-save archive as RUNTIME's root",
		Long: `SOURCE is a root file system directory, an OCI image layout (directory or
tar), a docker-save archive, or a root file system tarball. The imported tree
replaces any built one for RUNTIME; its interpreter must be at the path the
runtimes DB has for RUNTIME. Prints the root image's path.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := runtimeRow(cmd.Context(), *cacheDir, args[0]); err != nil {
				return err
			}
			tree, err := guest.ImportRoot(cmd.Context(), *cacheDir, args[0], args[1])
			if err != nil {
				return err
			}
			fmt.Fprintf(g.stderr, "imported %s into %s\n", args[1], tree)
			// Read again: the row now describes the imported tree.
			rt, err := runtimeRow(cmd.Context(), *cacheDir, args[0])
			if err != nil {
				return err
			}
			if !rt.Available {
				return fmt.Errorf("imported %s, but: %s: %w", args[1], rt.Reason, errdefs.ErrInvalidParameter)
			}
			return printRootImage(cmd.Context(), g, *cacheDir, rt, agent)
		},
	}
	cmd.AddCommand(build, imp)
	return cmd
}

// runtimeRow returns the runtimes DB row for id as a VM driver on this
// cache sees it (the interpreter path the harness will run in the guest).
func runtimeRow(ctx context.Context, cacheDir, id string) (*runtimes.Runtime, error) {
	for _, rt := range guest.DetectRuntimes(ctx, cacheDir) {
		if rt.ID == id {
			return rt, nil
		}
	}
	return nil, errdefs.Invalid("unknown runtime %q (see `invokex runtimes`)", id)
}

func printRootImage(ctx context.Context, g *globals, cacheDir string, rt *runtimes.Runtime, agent string) error {
	if agent == "" {
		// The same agent a server started from this binary would use, so
		// the image is the one its VMs boot.
		self, err := os.Executable()
		if err != nil {
			return fmt.Errorf("locating this binary for the guest's init: %w", err)
		}
		c, err := agentbin.Find(ctx, self)
		if err != nil {
			return err
		}
		agent = c.Path
	}
	img, err := guest.RootImage(ctx, cacheDir, rt, agent)
	if err != nil {
		return err
	}
	fmt.Fprintln(g.stdout, img)
	return nil
}
