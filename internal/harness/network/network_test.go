package network

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/network/networktest"
)

func TestSlotAddrs(t *testing.T) {
	sub := netip.MustParsePrefix("10.213.0.0/16")
	for _, c := range []struct {
		slot          int
		host, sandbox string
	}{
		{0, "10.213.0.1/30", "10.213.0.2/30"},
		{1, "10.213.0.5/30", "10.213.0.6/30"},
		{64, "10.213.1.1/30", "10.213.1.2/30"},
		{16383, "10.213.255.253/30", "10.213.255.254/30"},
	} {
		h, s := slotAddrs(sub, c.slot)
		if h.String() != c.host || s.String() != c.sandbox {
			t.Errorf("slot %d: %s %s, want %s %s", c.slot, h, s, c.host, c.sandbox)
		}
	}
	if n := slots(sub); n != 16384 {
		t.Errorf("slots(/16) = %d", n)
	}
}

func TestConfigValidate(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{Subnet: netip.MustParsePrefix("fd00::/64")}, "IPv4"},
		{Config{Subnet: netip.MustParsePrefix("10.0.0.0/29")}, "too small"},
		{Config{Subnet: netip.MustParsePrefix("169.254.0.0/16")}, "guest network"},
		{Config{Allow: []netip.Prefix{netip.MustParsePrefix("fd00::/8")}}, "IPv4"},
	} {
		err := c.cfg.withDefaults().validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one saying %q", c.cfg, err, c.want)
		}
	}
	if err := (Config{}).withDefaults().validate(); err != nil {
		t.Errorf("the default config: %v", err)
	}
}

func TestReadNameservers(t *testing.T) {
	p := t.TempDir() + "/resolv.conf"
	os.WriteFile(p, []byte("# c\nnameserver 127.0.0.53\nnameserver 10.255.255.53\nnameserver ::1\nsearch x\nnameserver 1.1.1.1\n"), 0o644)
	got := fmt.Sprint(readNameservers(p))
	if got != "[10.255.255.53 1.1.1.1]" {
		t.Errorf("readNameservers = %s", got)
	}
}

func needRoot(t *testing.T) { networktest.Skip(t) }

func testConfig() Config {
	return Config{Subnet: netip.MustParsePrefix("10.214.0.0/24")}
}

// sandboxProcess starts a process in a network namespace of its own, as
// the process driver's init is, and returns its namespace.
func sandboxProcess(t *testing.T) netns.NsHandle {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Skipf("unshare: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// unshare execs sleep once it has its namespace.
	var ns netns.NsHandle
	for range 200 {
		self, _ := netns.Get()
		n, err := netns.GetFromPid(cmd.Process.Pid)
		if err == nil && !n.Equal(self) {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid)); strings.TrimSpace(string(b)) == "sleep" {
				self.Close()
				ns = n
				break
			}
		}
		self.Close()
		if err == nil {
			n.Close()
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !ns.IsOpen() {
		t.Fatal("the sandbox process never got its namespace")
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func TestAttach(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	hostPort := networktest.HostServer(t)
	m := newManager(t, testConfig())
	nsA, a := attached(t, m)
	nsB, b := attached(t, m)
	if a.Slot == b.Slot {
		t.Fatalf("two links in slot %d", a.Slot)
	}

	// The internet is reachable, and sees the host's address.
	line, err := networktest.Dial(nsA, w.PublicAddr)
	if err != nil || line != "outside 203.0.113.1" {
		t.Errorf("sandbox to the outside: %q, %v; want the outside server seeing the host's address", line, err)
	}
	// Nothing of the host is.
	hostTargets := []string{
		net.JoinHostPort(a.HostAddr.Addr().String(), hostPort),
		net.JoinHostPort("203.0.113.1", hostPort),
	}
	if ip := networktest.HostIPv4(); ip != "" {
		hostTargets = append(hostTargets, net.JoinHostPort(ip, hostPort))
	}
	for _, addr := range hostTargets {
		if line, err := networktest.Dial(nsA, addr); err == nil {
			t.Errorf("sandbox reached the host at %s: %q", addr, line)
		}
	}
	// Nor private networks, nor other sandboxes.
	if line, err := networktest.Dial(nsA, w.PrivateAddr); err == nil {
		t.Errorf("sandbox reached the private %s: %q", w.PrivateAddr, line)
	}
	var lnB net.Listener
	if err := networktest.InNS(nsB, func() error {
		var err error
		lnB, err = net.Listen("tcp", ":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	networktest.Serve(t, lnB, "sandbox-b")
	addrB := net.JoinHostPort(b.SandboxAddr.Addr().String(), fmt.Sprint(lnB.Addr().(*net.TCPAddr).Port))
	if line, err := networktest.Dial(nsA, addrB); err == nil {
		t.Errorf("sandbox A reached sandbox B at %s: %q", addrB, line)
	}
	// Nothing from outside gets in.
	if line, err := networktest.Dial(w.NS, addrB); err == nil {
		t.Errorf("the outside reached sandbox B at %s: %q", addrB, line)
	}

	// Closing removes the link (in the background) and cuts it off.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, a, "still exists 10 s after Close")
	if _, err := networktest.Dial(nsA, w.PublicAddr); err == nil {
		t.Errorf("a closed link still reaches the outside")
	}
}

func TestAllow(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	cfg := Config{Subnet: netip.MustParsePrefix("10.215.0.0/24")}
	cfg.Allow = []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}
	m := newManager(t, cfg)
	ns, _ := attached(t, m)
	if line, err := networktest.Dial(ns, w.PrivateAddr); err != nil || !strings.HasPrefix(line, "outside ") {
		t.Errorf("an allowed private destination: %q, %v", line, err)
	}
}

func TestLinkGoesWithTheSandbox(t *testing.T) {
	needRoot(t)
	m := newManager(t, testConfig())
	cmd := exec.Command("unshare", "--net", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Skipf("unshare: %v", err)
	}
	defer cmd.Process.Kill()
	var l *Link
	for range 100 {
		self, _ := netns.Get()
		n, err := netns.GetFromPid(cmd.Process.Pid)
		same := err == nil && n.Equal(self)
		self.Close()
		if err == nil && !same {
			l, err = m.Attach(context.Background(), int(n))
			n.Close()
			if err != nil {
				t.Fatal(err)
			}
			break
		}
		n.Close()
		time.Sleep(10 * time.Millisecond)
	}
	if l == nil {
		t.Fatal("the process never got its namespace")
	}
	defer l.Close()
	cmd.Process.Kill()
	cmd.Wait()
	// The kernel deletes a dead namespace's links in the background.
	waitGone(t, l, "outlived its sandbox")
	if err := l.Close(); err != nil {
		t.Errorf("Close after the sandbox died: %v", err)
	}
}

func TestVMNet(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	hostPort := networktest.HostServer(t)
	m := newManager(t, testConfig())
	v, err := m.NewVMNet(context.Background(), TapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Tap == nil {
		t.Fatal("no tap descriptor")
	}
	ns := netns.NsHandle(v.NSFD())
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	tap, err := h.LinkByName(TapName)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tap.(*netlink.Tuntap); !ok {
		t.Errorf("%s is a %T", TapName, tap)
	}
	addrs, _ := h.AddrList(tap, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IP.String() != GuestGateway.String() {
		t.Errorf("%s has %v, want %s", TapName, addrs, GuestGateway)
	}
	// The namespace's own traffic leaves as the sandbox's would.
	if line, err := networktest.Dial(ns, w.PublicAddr); err != nil || line != "outside 203.0.113.1" {
		t.Errorf("vm namespace to the outside: %q, %v", line, err)
	}
	if line, err := networktest.Dial(ns, net.JoinHostPort(v.HostAddr.Addr().String(), hostPort)); err == nil {
		t.Errorf("vm namespace reached the host: %q", line)
	}

	// After the first, one is made ahead of need; the next takes it, and
	// a persistent tap (Firecracker's) is made of it, which outlives its
	// descriptor and goes with the namespace.
	var spare string
	deadline := time.Now().Add(10 * time.Second)
	for spare == "" {
		if idle := m.spares.Idle(); len(idle) == 1 {
			spare = idle[0].HostName
		} else if time.Now().After(deadline) {
			t.Fatalf("no spare vm network made: %v", idle)
		}
		time.Sleep(10 * time.Millisecond)
	}
	p, err := m.NewVMNet(context.Background(), TapOptions{Persistent: true, Owner: 1234, Group: 1234})
	if err != nil {
		t.Fatal(err)
	}
	if p.HostName != spare {
		t.Errorf("NewVMNet made %s instead of taking the spare %s", p.HostName, spare)
	}
	if p.Tap != nil {
		t.Errorf("a persistent tap's descriptor was kept")
	}
	hp, err := netlink.NewHandleAt(netns.NsHandle(p.NSFD()))
	if err != nil {
		t.Fatal(err)
	}
	defer hp.Close()
	pt, err := hp.LinkByName(TapName)
	if err != nil {
		t.Fatalf("the persistent tap: %v", err)
	}
	if tt, ok := pt.(*netlink.Tuntap); !ok || tt.Owner != 1234 {
		t.Errorf("the persistent tap: %#v", pt)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	waitGone(t, p.Link, "still exists 10 s after Close")
}

// waitGone waits up to 10 s for l's host end to be deleted, and fails
// with "<link> <what>" if it is not.
func waitGone(t *testing.T, l *Link, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := netlink.LinkByIndex(l.hostIndex); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s %s", l.HostName, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestManagersShareAHost: harnesses on one host share the subnet's table;
// the last to close removes it and puts forwarding back as it was.
func TestManagersShareAHost(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	othersBefore := othersAlive(t)
	forwardBefore, _ := os.ReadFile(ipForward)
	m1, err := New(context.Background(), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer m1.Close()
	m2, err := New(context.Background(), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	other := testConfig()
	other.Allow = []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}
	if m3, err := New(context.Background(), other); !errors.Is(err, ErrConflict) {
		if m3 != nil {
			m3.Close()
		}
		t.Errorf("a second Manager with other rules for the subnet: %v, want ErrConflict", err)
	}
	if err := m1.Close(); err != nil {
		t.Fatal(err)
	}
	ns := sandboxProcess(t)
	l, err := m2.Attach(context.Background(), int(ns))
	if err != nil {
		t.Fatal(err)
	}
	if line, err := networktest.Dial(ns, w.PublicAddr); err != nil || line != "outside "+networktest.HostPublic {
		t.Errorf("after the first Manager closed: %q, %v", line, err)
	}
	l.Close()
	if err := m2.Close(); err != nil {
		t.Fatal(err)
	}
	if tableExists(t, testConfig().Subnet) {
		t.Errorf("the table is left after the last Manager closed")
	}
	// Only meaningful if no other test process runs a Manager meanwhile.
	if othersBefore || othersAlive(t) {
		t.Logf("another Manager runs on this host: not checking ip_forward")
	} else if after, _ := os.ReadFile(ipForward); string(after) != string(forwardBefore) {
		t.Errorf("ip_forward %q after the last Manager closed, %q before", after, forwardBefore)
	}
}

// othersAlive reports whether some Manager (another test process's) holds
// the host's users lock. It looks under the setup lock, as Managers do, so
// that a Manager closing meanwhile does not take the probe for a user.
func othersAlive(t *testing.T) bool {
	setup, err := lockFile(context.Background(), setupLock, unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	defer setup.Close()
	f, err := os.Open(filepath.Join(runDir, usersLock))
	if err != nil {
		return false
	}
	defer f.Close()
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil
}

func tableExists(t *testing.T, subnet netip.Prefix) bool {
	t.Helper()
	ok, err := Installed(subnet)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestSpoofedSourceDropped: a sandbox that takes another address (here:
// adds one to its eth0 and connects from it) gets nowhere, even with the
// link's rp_filter off (a host whose "all" setting is loose makes it
// loose): the table checks the source against the link's route itself.
func TestSpoofedSourceDropped(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	m := newManager(t, testConfig())
	nsA, a := attached(t, m)
	_, b := attached(t, m)
	if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+a.HostName+"/rp_filter", []byte("0"), 0); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(nsA)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	// Another sandbox's address, and one outside the subnet; UDP, so that
	// what arrives is seen whether or not an answer could come back.
	send := func(from netip.Addr, payload string) {
		t.Helper()
		err := networktest.InNS(nsA, func() error {
			c, err := net.DialUDP("udp4", &net.UDPAddr{IP: from.AsSlice()}, net.UDPAddrFromAddrPort(netip.MustParseAddrPort(w.UDPAddr)))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte(payload))
			return err
		})
		if err != nil {
			t.Fatalf("sending from %s: %v", from, err)
		}
	}
	for _, forged := range []netip.Addr{b.SandboxAddr.Addr(), netip.MustParseAddr("198.51.100.77")} {
		if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(forged, 32))}); err != nil {
			t.Fatal(err)
		}
		send(forged, "forged "+forged.String())
	}
	// Then one from its own address, which arrives (masqueraded) after
	// any that went before it on the same path.
	send(a.SandboxAddr.Addr(), "honest")
	onlyHonestArrived(t, w)
	// The sandbox's own address still works.
	if line, err := networktest.Dial(nsA, w.PublicAddr); err != nil || !strings.HasPrefix(line, "outside ") {
		t.Errorf("from the sandbox's own address: %q, %v", line, err)
	}
}

// TestOverlappingSubnets: a second Manager may not take a subnet that
// overlaps a live one's (their links would hold the same addresses).
func TestOverlappingSubnets(t *testing.T) {
	needRoot(t)
	m, err := New(context.Background(), Config{Subnet: netip.MustParsePrefix("10.217.0.0/24")})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if o, err := New(context.Background(), Config{Subnet: netip.MustParsePrefix("10.217.0.0/25")}); !errors.Is(err, ErrConflict) {
		if o != nil {
			o.Close()
		}
		t.Errorf("an overlapping subnet: %v, want ErrConflict", err)
	}
	o, err := New(context.Background(), Config{Subnet: netip.MustParsePrefix("10.217.1.0/24")})
	if err != nil {
		t.Fatalf("a subnet beside it: %v", err)
	}
	o.Close()
}

// TestTableRestored: if the host's ruleset is flushed under a running
// Manager (a firewall reload), the next link puts the table back before
// it is made.
func TestTableRestored(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	hostPort := networktest.HostServer(t)
	m := newManager(t, testConfig())
	// The Manager notices by itself.
	if err := uninstall(testConfig().Subnet); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * watchEvery)
	for !tableExists(t, testConfig().Subnet) {
		if time.Now().After(deadline) {
			t.Fatalf("the table was not put back within %v", 10*watchEvery)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// And a new link checks first.
	if err := uninstall(testConfig().Subnet); err != nil {
		t.Fatal(err)
	}
	ns, l := attached(t, m)
	if !tableExists(t, testConfig().Subnet) {
		t.Fatal("the table was not restored")
	}
	if line, err := networktest.Dial(ns, w.PublicAddr); err != nil {
		t.Errorf("to the outside: %q, %v", line, err)
	}
	if line, err := networktest.Dial(ns, net.JoinHostPort(l.HostAddr.Addr().String(), hostPort)); err == nil {
		t.Errorf("reached the host: %q", line)
	}
}

// BenchmarkNewVMNet: what a VM's network adds to its start when none was
// made ahead of need, and when one was ("spare"). The links are closed
// after the timed part: deleting one takes the kernel tens of
// milliseconds, in the background.
func BenchmarkNewVMNet(b *testing.B) {
	networktest.Skip(b)
	for _, spare := range []bool{false, true} {
		b.Run(map[bool]string{false: "fresh", true: "spare"}[spare], func(b *testing.B) {
			cfg := testConfig()
			cfg.SpareVMNets = -1
			if spare {
				cfg.SpareVMNets = 1
			}
			m, err := New(context.Background(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer m.Close()
			var made []*VMNet
			defer func() {
				for _, v := range made {
					v.Close()
				}
			}()
			if spare {
				v, err := m.NewVMNet(context.Background(), TapOptions{}) // the pool learns
				if err != nil {
					b.Fatal(err)
				}
				made = append(made, v)
			}
			for b.Loop() {
				if spare {
					b.StopTimer()
					for len(m.spares.Idle()) == 0 {
						time.Sleep(time.Millisecond)
					}
					b.StartTimer()
				}
				v, err := m.NewVMNet(context.Background(), TapOptions{})
				if err != nil {
					b.Fatal(err)
				}
				made = append(made, v)
			}
		})
	}
}

// TestVMNetForwardsOnlyTheGuest: frames written to a VM network's tap, as
// a guest sends them, leave for the outside masqueraded when they come
// from GuestAddr, and not at all from another address.
func TestVMNetForwardsOnlyTheGuest(t *testing.T) {
	w := networktest.New(t, testConfig().Subnet)
	cfg := testConfig()
	cfg.SpareVMNets = -1
	m := newManager(t, cfg)
	v, err := m.NewVMNet(context.Background(), TapOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	h, err := netlink.NewHandleAt(netns.NsHandle(v.NSFD()))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	tap, err := h.LinkByName(TapName)
	if err != nil {
		t.Fatal(err)
	}
	dst := netip.MustParseAddrPort(w.UDPAddr)
	send := func(src netip.Addr, payload string) {
		t.Helper()
		frame := udpFrame(tap.Attrs().HardwareAddr, guestMAC, src, dst, payload)
		if _, err := v.Tap.Write(frame); err != nil {
			t.Fatalf("writing to the tap: %v", err)
		}
	}
	send(netip.MustParseAddr("169.254.213.3"), "forged")
	send(netip.MustParseAddr("198.51.100.9"), "forged")
	send(GuestAddr, "honest")
	onlyHonestArrived(t, w)
}

// udpFrame is an Ethernet frame carrying a UDP datagram, after the
// virtio-net header a tap opened with IFF_VNET_HDR expects (10 bytes, no
// offloads).
func udpFrame(dstMAC, srcMAC net.HardwareAddr, src netip.Addr, dst netip.AddrPort, payload string) []byte {
	b := make([]byte, 10) // struct virtio_net_hdr, zeroed
	b = append(b, dstMAC...)
	b = append(b, srcMAC...)
	b = append(b, 0x08, 0x00)
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	s4, d4 := src.As4(), dst.Addr().As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	b = append(b, ip...)
	b = append(b, udp...)
	return append(b, payload...)
}

// TestMaxFlows: a sandbox has at most MaxFlows connections out at once;
// the ones beyond are refused, so it cannot fill the host's conntrack
// table.
func TestMaxFlows(t *testing.T) {
	const maxFlows, tries = 40, 100
	w := networktest.New(t, netip.MustParsePrefix("10.218.0.0/24"))
	m := newManager(t, Config{Subnet: netip.MustParsePrefix("10.218.0.0/24"), MaxFlows: maxFlows})
	ns, _ := attached(t, m)
	err := networktest.InNS(ns, func() error {
		for i := range tries {
			// A socket of its own each: a new flow each. A write may
			// report an ICMP error (a refusal) and is not checked.
			c, err := net.Dial("udp4", w.UDPAddr)
			if err != nil {
				return err
			}
			c.Write([]byte(fmt.Sprint("flow ", i)))
			c.Close()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(w.Datagrams()) < maxFlows && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // stragglers, if the cap failed
	if got := len(w.Datagrams()); got < maxFlows/2 || got > maxFlows+1 {
		t.Errorf("%d of %d flows arrived, want about %d (the cap)", got, tries, maxFlows)
	}
}

// TestSweep: what a Manager that died without closing left (its table,
// forwarding turned on) is undone by Sweep once no Manager runs.
func TestSweep(t *testing.T) {
	needRoot(t)
	forwardBefore, _ := os.ReadFile(ipForward)
	othersBefore := othersAlive(t)
	_, staleMarker := os.Stat(filepath.Join(runDir, forwardingMarker))
	sub := netip.MustParsePrefix("10.219.0.0/24")
	m, err := New(context.Background(), Config{Subnet: sub, SpareVMNets: -1})
	if err != nil {
		t.Fatal(err)
	}
	// As if its process died: the kernel drops its locks, nothing else.
	close(m.watchStop)
	<-m.watchDone
	m.users.Close()
	m.table.Close()
	if !tableExists(t, sub) {
		t.Fatal("no table to sweep")
	}
	if err := Sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if tableExists(t, sub) {
		t.Errorf("the dead Manager's table is left after Sweep")
	}
	if othersBefore || othersAlive(t) || staleMarker == nil {
		return // forwarding was someone else's, or a dead Manager's
	}
	if after, _ := os.ReadFile(ipForward); string(after) != string(forwardBefore) {
		t.Errorf("ip_forward %q after Sweep, %q before the Manager", after, forwardBefore)
	}
}

// newManager is New(cfg), closed when t ends.
func newManager(t *testing.T, cfg Config) *Manager {
	t.Helper()
	m, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// attached is a sandbox process (sandboxProcess) attached by m, its link
// closed when t ends.
func attached(t *testing.T, m *Manager) (netns.NsHandle, *Link) {
	t.Helper()
	ns := sandboxProcess(t)
	l, err := m.Attach(context.Background(), int(ns))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return ns, l
}

// onlyHonestArrived waits for the datagram with payload "honest" at w's
// UDP sink and fails t if any other arrived (a forged source got out) or
// if it was not masqueraded to the host's address.
func onlyHonestArrived(t *testing.T, w *networktest.World) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !slices.ContainsFunc(w.Datagrams(), func(d networktest.Datagram) bool { return d.Payload == "honest" }) {
		if time.Now().After(deadline) {
			t.Fatalf("the honest datagram never arrived: %v", w.Datagrams())
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, d := range w.Datagrams() {
		if d.Payload != "honest" {
			t.Errorf("a datagram with a forged source arrived: %+v", d)
		} else if d.From != networktest.HostPublic {
			t.Errorf("the honest datagram arrived from %s, not masqueraded to the host's %s", d.From, networktest.HostPublic)
		}
	}
}
