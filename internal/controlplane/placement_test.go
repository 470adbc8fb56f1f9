package controlplane

import (
	"fmt"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
)

func TestAffinityPlacer(t *testing.T) {
	hosts := []*fakeHost{{}, {}, {}}
	hs := []harness.Host{hosts[0], hosts[1], hosts[2]}
	p := NewAffinityPlacer(hs)
	now := time.Unix(1000, 0)
	p.now = func() time.Time { return now }
	fn := &function.Config{Name: "f"}

	first, done, err := p.Place(fn)
	if err != nil {
		t.Fatal(err)
	}
	done(nil)
	for i := 0; i < 5; i++ {
		h, done, _ := p.Place(fn)
		done(nil)
		if h != first {
			t.Fatal("the same function moved to another healthy host")
		}
	}
	// Functions spread over hosts.
	used := map[harness.Host]bool{}
	for i := 0; i < 50; i++ {
		h, done, _ := p.Place(&function.Config{Name: fmt.Sprintf("fn-%d", i)})
		done(nil)
		used[h] = true
	}
	if len(used) < 2 {
		t.Fatalf("50 functions all landed on %d host(s)", len(used))
	}

	// An unavailable host is skipped until it has had time to recover.
	_, done, _ = p.Place(fn)
	done(errdefs.ErrUnavailable)
	second, done, _ := p.Place(fn)
	done(nil)
	if second == first {
		t.Fatal("placed on a host that just reported ErrUnavailable")
	}
	now = now.Add(unhealthyFor)
	if h, done, _ := p.Place(fn); h != first {
		t.Fatal("did not return to the preferred host after it recovered")
	} else {
		done(nil)
	}

	// All hosts down: still try the preferred one.
	for range hs {
		h, done, _ := p.Place(fn)
		_ = h
		done(errdefs.ErrUnavailable)
	}
	if h, _, err := p.Place(fn); err != nil || h == nil {
		t.Fatalf("all hosts down: %v, %v", h, err)
	}

	// A function error or throttle is not a host failure.
	p2 := NewAffinityPlacer(hs)
	a, done, _ := p2.Place(fn)
	done(errdefs.ErrThrottled)
	if b, _, _ := p2.Place(fn); b != a {
		t.Fatal("a throttle moved the function")
	}

	_, _, err = NewAffinityPlacer(nil).Place(fn)
	wantKind(t, err, errdefs.ErrUnavailable, "no harness host")
}
