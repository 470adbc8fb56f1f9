package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
	"github.com/invokex/invokex/internal/harness/network"
	"github.com/invokex/invokex/internal/harness/network/networktest"
)

// managedNetwork is a network manager of the test's own subnet.
func managedNetwork(t *testing.T) *network.Manager {
	t.Helper()
	networktest.Skip(t)
	nm, err := network.New(context.Background(), network.Config{Subnet: netip.MustParsePrefix("10.216.0.0/24")})
	if err != nil {
		t.Fatalf("network.New: %v", err)
	}
	t.Cleanup(func() { nm.Close() })
	return nm
}

// TestManagedNetwork: with Options.Network, a VM with Spec.Network runs in
// a namespace of its own whose tap0 the stand-in Firecracker attaches to
// as Firecracker does (mode "tap": it opens the tap by name in its own
// namespace, as its own user); the guest gets the common address; the
// namespace and its link go with the VM; snapshots of it restore, each
// restore in a namespace of its own.
func TestManagedNetwork(t *testing.T) {
	for _, jailed := range []bool{false, true} {
		t.Run(fmt.Sprintf("jailed=%v", jailed), func(t *testing.T) {
			nm := managedNetwork(t)
			var e *fakeEnv
			if jailed {
				e, _ = jailedEnv(t, func(o *Options) { o.Network = nm })
			} else {
				e = newFakeEnv(t, func(o *Options) { o.Network = nm })
			}
			sp := e.Spec("tap-net")
			sp.Network = true
			inst := startSpec(t, e, sp)
			checkManagedNIC(t, inst)
			host := inst.vnet.Link

			dir := filepath.Join(t.TempDir(), "snap")
			if err := e.d.Snapshot(context.Background(), sp.ID, dir); err != nil {
				t.Fatalf("Snapshot: %v", err)
			}
			waitDone(t, inst)
			waitLinkGone(t, host)
			if m := readMeta(t, dir); !m.Network {
				t.Errorf("vm.json %+v does not record the network", m)
			}
			var restored []*instance
			for _, id := range []string{"tap-r1", "tap-r2"} {
				rs := e.Spec(id)
				rs.Network = true
				di, err := e.d.Restore(context.Background(), rs, dir)
				if err != nil {
					t.Fatalf("Restore(%s): %v", id, err)
				}
				restored = append(restored, di.(*instance))
			}
			if a, b := restored[0].vnet, restored[1].vnet; a == nil || b == nil || a.HostName == b.HostName {
				t.Fatalf("restored vms' networks: %+v and %+v, want one each", a, b)
			}
			for _, r := range restored {
				echoes(t, r)
				if got := fcNetNS(t, r); got == selfNetNS(t) {
					t.Errorf("restored %s's firecracker runs in the harness's namespace", r.ID())
				}
				host := r.vnet.Link
				if err := e.d.Stop(context.Background(), r.ID()); err != nil {
					t.Fatal(err)
				}
				waitLinkGone(t, host)
			}
		})
	}
}

// checkManagedNIC: inst's Firecracker runs in its own namespace and was
// given tap0, the common MAC and the common guest address.
func checkManagedNIC(t *testing.T, inst *instance) {
	t.Helper()
	if inst.vnet == nil {
		t.Fatal("no network made for a vm with Spec.Network")
	}
	if got := fcNetNS(t, inst); got == selfNetNS(t) {
		t.Errorf("firecracker runs in the harness's namespace %s", got)
	}
	nic, boot := nicAndBoot(t, inst)
	if nic == nil || nic["host_dev_name"] != network.TapName || nic["guest_mac"] != network.GuestMAC() {
		t.Errorf("network interface %v, want %s with %s", nic, network.TapName, network.GuestMAC())
	}
	if args, _ := boot["boot_args"].(string); !strings.Contains(args, " ip="+network.GuestAddr.String()+"::"+network.GuestGateway.String()+":") {
		t.Errorf("boot args %q lack the guest's common address", args)
	}
}

func fcNetNS(t *testing.T, inst *instance) string {
	t.Helper()
	ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", inst.PID()))
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

func selfNetNS(t *testing.T) string {
	ns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	return ns
}

// waitLinkGone waits for the host link of a stopped VM's namespace to go
// (the kernel removes a dead namespace's links in the background).
func waitLinkGone(t *testing.T, l *network.Link) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := netlink.LinkByIndex(l.HostIndex()); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("link %s outlived its vm", l.HostName)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestManagedNetworkOptions: the driver's own networks and an operator's
// taps do not mix, and a snapshot with a network needs a driver that
// makes networks.
func TestManagedNetworkOptions(t *testing.T) {
	nm := managedNetwork(t)
	for _, o := range []Options{{TapName: "fc{slot}"}} {
		o.StateDir, o.FirecrackerPath, o.KernelPath, o.Network = t.TempDir(), vmmtest.FakeBinary(t, fakeFCName), "/etc/hostname", nm
		if _, err := newDriver(o, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("Network with TapName: %v, want ErrInvalidParameter", err)
		}
	}
	e := newFakeEnv(t, func(o *Options) { o.Network = nm })
	sp := e.Spec("tap-base")
	sp.Network = true
	startSpec(t, e, sp)
	dir := filepath.Join(t.TempDir(), "snap")
	if err := e.d.Snapshot(context.Background(), sp.ID, dir); err != nil {
		t.Fatal(err)
	}
	plain := newFakeEnv(t)
	rs := plain.Spec("tap-r")
	rs.Network = true
	if _, err := plain.d.Restore(context.Background(), rs, dir); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("Restore of a networked snapshot without Options.Network: %v, want ErrInvalidParameter", err)
	}
}
