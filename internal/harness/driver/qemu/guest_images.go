package qemu

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/runtimes"
)

// rootBuildTimeout bounds one root image build. Building a Debian root
// (debootstrap and the interpreter's packages) takes minutes, longer than
// any one request waits, so a build runs detached from the request that
// started it: a deploy's Prepare or a cold start may give up waiting, the
// build goes on, and the next caller finds it done or joins it.
const rootBuildTimeout = 30 * time.Minute

// guestImages is the imageMaker of package guest.
type guestImages struct {
	cacheDir string
	agentBin string
	log      *slog.Logger

	// base is the parent of every build; close cancels it and waits.
	base   context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	builds map[string]*rootBuild // by runtime ID, while one runs
}

// rootBuild is one root image build that callers wait for.
type rootBuild struct {
	done chan struct{}
	path string
	err  error
}

func newGuestImages(cacheDir, agentBin string, log *slog.Logger) *guestImages {
	base, cancel := context.WithCancel(context.Background())
	return &guestImages{cacheDir: cacheDir, agentBin: agentBin, log: log, base: base, cancel: cancel, builds: map[string]*rootBuild{}}
}

// close cancels the builds in flight and waits for them (their commands
// are killed and their partial files removed by package guest).
func (g *guestImages) close() {
	g.mu.Lock()
	g.cancel()
	g.mu.Unlock()
	g.wg.Wait()
}

// Root returns rt's root image, building it if needed; see rootBuildTimeout
// for why the build outlives ctx.
func (g *guestImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	g.mu.Lock()
	if g.base.Err() != nil {
		g.mu.Unlock()
		return "", fmt.Errorf("root image of %s: driver closed: %w", rt.ID, errdefs.ErrUnavailable)
	}
	b, ok := g.builds[rt.ID]
	if !ok {
		b = &rootBuild{done: make(chan struct{})}
		g.builds[rt.ID] = b
		own := *rt
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			bctx, cancel := context.WithTimeout(g.base, rootBuildTimeout)
			b.path, b.err = guest.RootImage(bctx, g.cacheDir, &own, g.agentBin)
			cancel()
			if b.err != nil {
				g.log.Warn("building a root image failed", "runtime", own.ID, "err", b.err)
			}
			g.mu.Lock()
			delete(g.builds, own.ID)
			g.mu.Unlock()
			close(b.done)
		}()
	}
	g.mu.Unlock()
	select {
	case <-b.done:
		return b.path, b.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (g *guestImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	return guest.CodeImage(ctx, g.cacheDir, codeDir, runtimeDir, key)
}

func (g *guestImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	return guest.ScratchImage(ctx, path, sizeMB)
}
