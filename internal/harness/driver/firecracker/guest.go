package firecracker

import (
	"context"
	"log/slog"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/runtimes"
)

func defaultCacheDir() string { return guest.DefaultCacheDir() }

func defaultKernel(cacheDir string) (string, bool) { return guest.KernelPath(cacheDir) }

// guestImages is the imageMaker of package guest: the same root, code and
// scratch images the qemu driver boots.
type guestImages struct {
	cacheDir string
	agentBin string
	log      *slog.Logger
}

func (g *guestImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	return guest.RootImage(ctx, g.cacheDir, rt, g.agentBin)
}

func (g *guestImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	return guest.CodeImage(ctx, g.cacheDir, codeDir, runtimeDir, key)
}

func (g *guestImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	return guest.ScratchImage(ctx, path, sizeMB)
}
