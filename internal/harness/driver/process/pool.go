package process

import (
	"context"
	"path/filepath"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/pool"
)

// warmMemoryMB is the memory limit a warm sandbox waits under (its init
// needs a few MiB); assign sets the instance's own.
const warmMemoryMB = 128

// warmPrefix begins the name of a warm sandbox until it is assigned.
const warmPrefix = "warm-"

// warmShape is what a warm sandbox shares with the instance it becomes:
// its network mode and the size of its /tmp image (0 without one).
type warmShape struct {
	network bool
	tmpMB   int
}

// newWarmPool keeps up to size sandboxes spawned ahead of need (see
// sandbox): forked into their namespaces, moved into their cgroups, their
// /tmp mounted, their init waiting for a config. A cold start then only
// assigns one, which takes the fork, the exec, the cgroup move (an RCU
// grace period on cgroup v1) and the /tmp mount off the path to the
// first response.
//
// The pool starts filling at the first take, in the shape that take asked
// for (the network mode is the server's, the same for every instance; the
// /tmp size is the function's), keeps sandboxes for the shapes taken last
// and refills after every take. A warm sandbox holds a few MiB of memory,
// its cgroups and its /tmp image. Close destroys them; a crashed harness's
// are removed by Recover like any sandbox (each has a record).
func newWarmPool(d *Driver, size int) *pool.Pool[warmShape, *sandbox] {
	return pool.New[warmShape](pool.Config[*sandbox]{
		Size:   size,
		Prefix: warmPrefix,
		Kind:   "warm sandbox",
		Name:   func(sb *sandbox) string { return sb.name },
		Destroy: func(ctx context.Context, sb *sandbox) error {
			return sb.destroy(ctx, 0)
		},
		// Killed from outside while it waited: not usable.
		Usable: func(sb *sandbox) bool {
			select {
			case <-sb.done:
				return false
			default:
				return true
			}
		},
		Log: d.log,
	})
}

// takeWarm returns a warm sandbox spawned for network mode network and a
// /tmp of tmpMB, or nil, and has the pool refilled.
func (d *Driver) takeWarm(network bool, tmpMB int) *sandbox {
	if d.tmp == nil {
		tmpMB = 0 // /tmp is a tmpfs made at assignment, whatever its size
	}
	shape := warmShape{network: network, tmpMB: tmpMB}
	sb, _ := d.warm.Take(shape, func(ctx context.Context, name string) (*sandbox, error) {
		return d.spawn(ctx, name, shape.network, warmMemoryMB, shape.tmpMB, nil)
	})
	return sb
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
