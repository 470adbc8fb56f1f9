package vmm

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/runtimes"
)

// blockingBuilds is a root builder whose builds wait for release (or
// their context) and count themselves.
type blockingBuilds struct {
	started atomic.Int32
	release chan struct{}
	ended   chan error // each build's end: nil, or its context's error
}

func (b *blockingBuilds) build(ctx context.Context, cacheDir string, rt *runtimes.Runtime, agentBin string) (string, error) {
	b.started.Add(1)
	select {
	case <-b.release:
		b.ended <- nil
		return cacheDir + "/" + rt.ID + ".ext4", nil
	case <-ctx.Done():
		b.ended <- ctx.Err()
		return "", ctx.Err()
	}
}

func testImages(t *testing.T, log *slog.Logger) (*GuestImages, *blockingBuilds) {
	b := &blockingBuilds{release: make(chan struct{}), ended: make(chan error, 16)}
	g := NewGuestImages("/cache", "/agent", log)
	g.build = b.build
	t.Cleanup(g.Close)
	return g, b
}

// TestRootBuildSingleFlight: callers of one runtime share one build,
// which outlives the callers that give up waiting.
func TestRootBuildSingleFlight(t *testing.T) {
	g, b := testImages(t, hostproctest.Logger(t))
	rt := &runtimes.Runtime{ID: "python3.12"}
	// Every caller gives up while the build is blocked: it was in flight
	// for each of them, so each joined it.
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
			defer cancel()
			if _, err := g.Root(ctx, rt); !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("Root with a short deadline = %v, want DeadlineExceeded", err)
			}
		}()
	}
	wg.Wait()
	if n := b.started.Load(); n != 1 {
		t.Errorf("%d builds, want 1 shared by every caller", n)
	}
	select {
	case err := <-b.ended:
		t.Fatalf("the build ended (%v) when its callers gave up", err)
	default:
	}
	close(b.release)
	if err := <-b.ended; err != nil {
		t.Errorf("the build ended with %v", err)
	}
	if p, err := g.Root(context.Background(), rt); err != nil || p != "/cache/python3.12.ext4" {
		t.Errorf("Root after the build = %q, %v", p, err)
	}
	if _, err := g.Root(context.Background(), &runtimes.Runtime{ID: "nodejs22.x"}); err != nil {
		t.Errorf("Root of another runtime: %v", err)
	}
}

// TestRootBuildClose: Close cancels the builds in flight and waits for
// them; Root fails afterwards.
func TestRootBuildClose(t *testing.T) {
	g, b := testImages(t, slog.New(slog.DiscardHandler))
	rt := &runtimes.Runtime{ID: "nodejs22.x"}
	errc := make(chan error, 1)
	go func() {
		_, err := g.Root(context.Background(), rt)
		errc <- err
	}()
	for b.started.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	g.Close()
	select {
	case err := <-b.ended:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("build ended with %v, want its context cancelled", err)
		}
	default:
		t.Fatalf("Close returned before the build ended")
	}
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("the waiting Root = %v, want the build's cancellation", err)
	}
	if _, err := g.Root(context.Background(), rt); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Root after Close = %v, want ErrUnavailable", err)
	}
	g.Close() // idempotent
}
