package vmm

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

// Images builds the disks of a VM: GuestImages in production, fakes in
// unit tests. Implementations are safe for concurrent use and cache what
// they can. If an Images also has a Close method, Host.Close calls it
// once every instance is gone.
type Images interface {
	// Root returns the root image of rt (shared, never written).
	Root(ctx context.Context, rt *runtimes.Runtime) (string, error)
	// Code returns the image of codeDir and runtimeDir, cached by key
	// (see CodeKey).
	Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error)
	// Scratch creates an empty writable file system of sizeMB at path.
	Scratch(ctx context.Context, path string, sizeMB int) error
}

// RootBuildTimeout bounds one root image build. Building a Debian root
// (debootstrap and the interpreter's packages) takes minutes, longer than
// any one request waits, so a build runs detached from the request that
// started it: a deploy's Prepare or a cold start may give up waiting, the
// build goes on, and the next caller finds it done or joins it.
const RootBuildTimeout = 30 * time.Minute

// GuestImages is the Images of package guest. Root images are built at
// most once at a time per runtime (callers join the build in flight),
// detached from the callers (see RootBuildTimeout) and bounded by Close.
type GuestImages struct {
	cacheDir string
	agentBin string
	log      *slog.Logger
	// build makes a root image; guest.RootImage but in tests.
	build func(ctx context.Context, cacheDir string, rt *runtimes.Runtime, agentBin string) (string, error)

	// base is the parent of every build; Close cancels it and waits.
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

var _ Images = (*GuestImages)(nil)

// NewGuestImages returns the images of package guest's cache in
// cacheDir, whose roots get agentBin as their init. log receives the
// failures of detached builds, which no caller may be left to see.
func NewGuestImages(cacheDir, agentBin string, log *slog.Logger) *GuestImages {
	base, cancel := context.WithCancel(context.Background())
	return &GuestImages{
		cacheDir: cacheDir, agentBin: agentBin, log: log, build: guest.RootImage,
		base: base, cancel: cancel, builds: map[string]*rootBuild{},
	}
}

// Close cancels the builds in flight and waits for them (their commands
// are killed and their partial files removed by package guest). Root
// fails with ErrUnavailable afterwards. Idempotent.
func (g *GuestImages) Close() {
	g.mu.Lock()
	g.cancel()
	g.mu.Unlock()
	g.wg.Wait()
}

// Root returns rt's root image, building it if needed; see
// RootBuildTimeout for why the build outlives ctx.
func (g *GuestImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
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
			bctx, cancel := context.WithTimeout(g.base, RootBuildTimeout)
			b.path, b.err = g.build(bctx, g.cacheDir, &own, g.agentBin)
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

// Code returns the code image of codeDir and runtimeDir; see
// guest.CodeImage.
func (g *GuestImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	return guest.CodeImage(ctx, g.cacheDir, codeDir, runtimeDir, key)
}

// Scratch creates a scratch disk; see guest.ScratchImage.
func (g *GuestImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	return guest.ScratchImage(ctx, path, sizeMB)
}
