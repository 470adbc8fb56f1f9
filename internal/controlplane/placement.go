package controlplane

import (
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
)

// Placer chooses the host that runs an invocation.
//
// Place is called once per invocation (sync, or one attempt of an Event)
// and must be safe for concurrent use. It returns the host and a done
// function that the caller must call exactly once with the error of
// Host.Invoke (nil on success, including function errors), so the placer
// can steer away from failing hosts. When no host can take the invocation
// it returns an error wrapping errdefs.ErrUnavailable.
type Placer interface {
	Place(fn *function.Config) (host harness.Host, done func(invokeErr error), err error)
}

// unhealthyFor is how long a host that reported ErrUnavailable is skipped.
const unhealthyFor = 5 * time.Second

// AffinityPlacer sends every invocation of a function to the same host
// while that host is healthy (chosen by hashing the function's name), so
// warm instances are reused instead of being spread over every host; other
// functions land on other hosts, which spreads the load. A host whose Invoke
// failed with ErrUnavailable is skipped for a few seconds, and its work
// moves to the next healthy host in order. If every host is unhealthy the
// preferred one is tried anyway: it may have recovered, and failing fast
// without asking would turn a blip into an outage.
type AffinityPlacer struct {
	hosts []harness.Host
	now   func() time.Time

	mu        sync.Mutex
	downUntil []time.Time
}

var _ Placer = (*AffinityPlacer)(nil)

// NewAffinityPlacer returns a placer over hosts (which it does not copy
// defensively: the slice must not change afterwards).
func NewAffinityPlacer(hosts []harness.Host) *AffinityPlacer {
	return &AffinityPlacer{hosts: hosts, now: time.Now, downUntil: make([]time.Time, len(hosts))}
}

// Place implements Placer.
func (p *AffinityPlacer) Place(fn *function.Config) (harness.Host, func(error), error) {
	n := len(p.hosts)
	if n == 0 {
		return nil, nil, fmt.Errorf("no harness host is configured: %w", errdefs.ErrUnavailable)
	}
	h := fnv.New32a()
	h.Write([]byte(fn.Name))
	start := int(h.Sum32() % uint32(n))
	now := p.now()
	pick := start
	p.mu.Lock()
	for i := 0; i < n; i++ {
		idx := (start + i) % n
		if !now.Before(p.downUntil[idx]) {
			pick = idx
			break
		}
	}
	p.mu.Unlock()
	done := func(err error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		switch {
		case errors.Is(err, errdefs.ErrUnavailable):
			p.downUntil[pick] = p.now().Add(unhealthyFor)
		case err == nil:
			p.downUntil[pick] = time.Time{}
		}
	}
	return p.hosts[pick], done, nil
}
