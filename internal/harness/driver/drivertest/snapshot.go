package drivertest

import (
	"context"
	"crypto/rand"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/network"
	"github.com/invokex/invokex/internal/harness/network/networktest"
	"github.com/invokex/invokex/internal/protocol"
)

// testSnapshot is the conformance of driver.Snapshotter (SnapStart): an
// initialised instance is saved and two instances restored from the save
// answer as the original would, each with randomness of its own once the
// harness's Restore has renewed it; a missing snapshot is ErrNotFound.
// Drivers that take no snapshots skip it.
func (s *suite) testSnapshot(t *testing.T) {
	e := s.env(t)
	sn, ok := e.d.(driver.Snapshotter)
	if !ok {
		t.Skipf("skipping: the %s driver takes no snapshots", e.d.Name())
	}
	dir := snapshotOf(t, e, sn, e.spec())
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StartTimeout)
	defer cancel()

	warm := e.opts.WarmReady != nil && e.opts.FromWarm != nil
	if warm {
		// With a sandbox of this shape started ahead of need and ready, a
		// restore must still restore: the spare has none of the
		// snapshot's state.
		stopAndCheck(t, e, e.start(t, e.spec()))
		e.awaitWarm(t)
	}
	seen := map[string]bool{}
	for k := 0; k < 2; k++ {
		rs := e.spec()
		seed := make([]byte, 32)
		_, _ = rand.Read(seed)
		sb, inst := restore(ctx, t, e, sn, rs, dir, seed)
		if warm && e.opts.FromWarm(inst) {
			t.Errorf("Restore %d took a sandbox started ahead of need", k)
		}
		var o outcome
		sb.call(map[string]any{"action": "random", "n": 16}, &o)
		if len(o.Data) != 32 || seen[o.Data] {
			t.Fatalf("restore %d drew %q (seen before: %v)", k, o.Data, seen[o.Data])
		}
		seen[o.Data] = true
		var echo struct {
			Facts struct {
				Hostname string `json:"hostname"`
			} `json:"facts"`
		}
		sb.call(map[string]any{"action": "echo"}, &echo)
		if echo.Facts.Hostname != "sandbox-"+rs.ID {
			t.Errorf("restored hostname %q, want %q", echo.Facts.Hostname, "sandbox-"+rs.ID)
		}
	}

	if _, err := sn.Restore(ctx, e.spec(), filepath.Join(t.TempDir(), "none")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Restore from no snapshot: %v, want ErrNotFound", err)
	}
}

// testSnapshotEgress: instances restored from a snapshot of an instance
// with Network reach the internet, two at once (every restore has the
// saved guest's network configuration, so each must get a network of its
// own that fits it), and still not the host.
func (s *suite) testSnapshotEgress(t *testing.T) {
	e := s.env(t)
	sn, ok := e.d.(driver.Snapshotter)
	if !ok {
		t.Skipf("skipping: the %s driver takes no snapshots", e.d.Name())
	}
	w := networktest.New(t, network.DefaultSubnet)
	port := networktest.HostServer(t)
	spec := e.spec()
	spec.Network = true
	dir := snapshotOf(t, e, sn, spec)
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StartTimeout)
	defer cancel()
	var restored []*sandbox
	for k := 0; k < 2; k++ {
		rs := e.spec()
		rs.Network = true
		sb, _ := restore(ctx, t, e, sn, rs, dir, make([]byte, 32))
		restored = append(restored, sb)
	}
	for k, sb := range restored {
		var o outcome
		sb.call(map[string]any{"action": "dial", "addr": w.PublicAddr}, &o)
		if o.Error != "" {
			t.Errorf("restored instance %d cannot reach the internet's %s: %s", k, w.PublicAddr, o.Error)
		}
		o = outcome{}
		addr := net.JoinHostPort(networktest.HostPublic, port)
		sb.call(map[string]any{"action": "dial", "addr": addr}, &o)
		if o.Error == "" {
			t.Errorf("restored instance %d reached the host's %s", k, addr)
		}
	}
}

// snapshotOf starts spec as the harness starts what it snapshots
// (ForSnapshot), runs its INIT and snapshots it into a directory of t's,
// which it returns.
func snapshotOf(t *testing.T, e *env, sn driver.Snapshotter, spec driver.Spec) string {
	t.Helper()
	spec.ForSnapshot = true
	e.start(t, spec).init()
	dir := filepath.Join(t.TempDir(), "snap")
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StartTimeout)
	defer cancel()
	if err := sn.Snapshot(ctx, spec.ID, dir); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("snapshot directory: %v", err)
	}
	return dir
}

// restore starts rs from the snapshot in dir (stopped when t ends), and
// renews it as the harness does, with seed.
func restore(ctx context.Context, t *testing.T, e *env, sn driver.Snapshotter, rs driver.Spec, dir string, seed []byte) (*sandbox, driver.Instance) {
	t.Helper()
	inst, err := sn.Restore(ctx, rs, dir)
	if err != nil {
		t.Fatalf("Restore %s: %v", rs.ID, err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), e.opts.StopTimeout)
		defer cancel()
		if err := e.d.Stop(sctx, rs.ID); err != nil {
			t.Errorf("Stop(%s): %v", rs.ID, err)
		}
	})
	sb := e.sandbox(t, rs, inst)
	if err := sb.conn.WriteFrame(protocol.TypeRestore, protocol.Restore{Seed: seed, Hostname: "sandbox-" + rs.ID}); err != nil {
		t.Fatalf("sending Restore: %v", err)
	}
	var done protocol.RestoreDone
	if err := sb.read(protocol.TypeRestoreDone).Decode(&done); err != nil || done.Error != nil {
		t.Fatalf("RestoreDone: %+v %v", done.Error, err)
	}
	return sb, inst
}
