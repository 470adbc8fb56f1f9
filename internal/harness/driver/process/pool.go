package process

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// warmMemoryMB is the memory limit a warm sandbox waits under (its init
// needs a few MiB); assign sets the instance's own.
const warmMemoryMB = 128

// warmRetry is how long the pool waits after a failed start before it
// tries again.
const warmRetry = time.Second

// warmPool keeps up to size sandboxes spawned ahead of need (see
// sandbox): forked into their namespaces, moved into their cgroups, their
// init waiting for a config. A cold start then only assigns one, which
// takes the fork, the exec and the cgroup move (an RCU grace period on
// cgroup v1) off the path to the first response.
//
// The pool starts filling at the first take, in the network mode that
// take asked for (the server's, the same for every instance), and refills
// after every take. A warm sandbox holds a few MiB of memory and its
// cgroups. close destroys them; a crashed harness's are removed by
// Recover like any sandbox (each has a record). Safe for concurrent use.
type warmPool struct {
	d    *Driver
	size int
	log  *slog.Logger

	mu       sync.Mutex
	idle     []*sandbox
	spawning string // name of the sandbox being spawned, "" if none
	network  bool   // the mode of the last take
	running  bool   // fill loop started
	closed   bool

	kick chan struct{} // buffered(1): wake the fill loop
	done chan struct{} // closed when the fill loop has returned
	// ctx is cancelled by close: it stops the fill loop and a spawn in
	// flight.
	ctx    context.Context
	cancel context.CancelFunc
	// discards are the destroys take hands to goroutines (it holds mu);
	// close waits for them.
	discards sync.WaitGroup
}

func newWarmPool(d *Driver, size int) *warmPool {
	ctx, cancel := context.WithCancel(context.Background())
	return &warmPool{
		d: d, size: size, log: d.log,
		kick: make(chan struct{}, 1), done: make(chan struct{}),
		ctx: ctx, cancel: cancel,
	}
}

// take returns an idle sandbox spawned for network mode network, or nil,
// and has the pool refilled.
func (p *warmPool) take(network bool) *sandbox {
	if p == nil || p.size <= 0 {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.network = network
	if !p.running {
		p.running = true
		go p.fill()
	}
	defer p.wake()
	for len(p.idle) > 0 {
		sb := p.idle[0]
		p.idle = p.idle[1:]
		select {
		case <-sb.done:
			// Died while waiting (killed from outside): not usable.
			p.discardLater(sb, "warm sandbox exited")
			continue
		default:
		}
		if sb.network != network {
			p.discardLater(sb, "warm sandbox of another network mode")
			continue
		}
		return sb
	}
	return nil
}

func (p *warmPool) discardLater(sb *sandbox, why string) {
	p.discards.Add(1)
	go func() {
		defer p.discards.Done()
		p.discard(sb, why)
	}()
}

func (p *warmPool) wake() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// fill keeps the pool full until close.
func (p *warmPool) fill() {
	defer close(p.done)
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-p.kick:
		}
		for {
			p.mu.Lock()
			if p.closed || len(p.idle) >= p.size {
				p.mu.Unlock()
				break
			}
			name := warmName()
			p.spawning = name
			network := p.network
			p.mu.Unlock()

			sb, err := p.d.spawn(p.ctx, name, network, warmMemoryMB, nil)

			p.mu.Lock()
			p.spawning = ""
			if err == nil && !p.closed {
				p.idle = append(p.idle, sb)
				p.mu.Unlock()
				continue
			}
			closed := p.closed
			p.mu.Unlock()
			if err == nil { // closed meanwhile
				p.discard(sb, "driver closing")
				return
			}
			if closed {
				return
			}
			p.log.Warn("starting a warm sandbox", "err", err)
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(warmRetry):
			}
		}
	}
}

func (p *warmPool) discard(sb *sandbox, why string) {
	p.log.Debug("discarding warm sandbox", "sandbox", sb.name, "why", why)
	if err := sb.destroy(context.Background(), 0); err != nil {
		p.log.Warn("removing warm sandbox", "sandbox", sb.name, "err", err)
	}
}

// owns reports whether name is a sandbox of the pool (idle or being
// spawned), which Recover must leave alone.
func (p *warmPool) owns(name string) bool {
	if p == nil {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if name == p.spawning {
		return true
	}
	for _, sb := range p.idle {
		if sb.name == name {
			return true
		}
	}
	return false
}

// close stops refilling and destroys the idle sandboxes; take returns nil
// afterwards. Idempotent.
func (p *warmPool) close(ctx context.Context) error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	idle := p.idle
	p.idle = nil
	running := p.running
	p.mu.Unlock()
	p.cancel() // stops the fill loop and aborts a spawn in flight
	if running {
		<-p.done
	}
	p.discards.Wait()
	var first error
	for _, sb := range idle {
		if err := sb.destroy(ctx, 0); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// warmPrefix begins the name of a warm sandbox until it is assigned.
const warmPrefix = "warm-"

// warmName names a warm sandbox: warmPrefix and 16 hex digits, a valid
// instance ID that no harness ID ("ix-...") collides with.
func warmName() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return warmPrefix + hex.EncodeToString(b[:])
}

// WarmSandboxPIDs returns the host pids of the warm sandboxes recorded in
// a driver's StateDir: a tool that looks at the driver's processes from
// outside (the benchmark) tells them from instances by it. A sandbox in
// the middle of being spawned may be missing.
func WarmSandboxPIDs(stateDir string) ([]int, error) {
	dirs, err := filepath.Glob(filepath.Join(stateDir, warmPrefix+"*"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, dir := range dirs {
		rec, err := hostproc.ReadRecord[record](dir)
		if err != nil {
			continue // renamed, removed or not written yet
		}
		if rec.PID > 0 {
			pids = append(pids, rec.PID)
		}
	}
	return pids, nil
}
