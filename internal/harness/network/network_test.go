package network

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
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

// world is what a test of the rules needs around a Manager: an "outside"
// network namespace standing for the internet (TEST-NET-3, and a private
// network), reachable from the host through a veth whose host end is not
// a sandbox link, with a server in it, and a server on the host.
type world struct {
	outside    netns.NsHandle
	public     string // the outside server on a public address
	private    string // the same server on a private address
	hostServer string // port of a server on all the host's addresses
}

const (
	outsideHost    = "ixtest-o"
	outsidePeer    = "ixtest-p"
	outsidePublic  = "203.0.113.2"
	outsidePrivate = "10.99.0.2"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, links and nftables rules")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
}

func newWorld(t *testing.T) *world {
	t.Helper()
	needRoot(t)
	if l, err := netlink.LinkByName(outsideHost); err == nil {
		netlink.LinkDel(l)
	}
	ns, err := newNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	la := netlink.NewLinkAttrs()
	la.Name = outsideHost
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: outsidePeer, PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(outsideHost); err == nil {
			netlink.LinkDel(l)
		}
	})
	host, _ := netlink.LinkByName(outsideHost)
	for _, a := range []string{"203.0.113.1/24", "10.99.0.1/24"} {
		addr, _ := netlink.ParseAddr(a)
		if err := netlink.AddrAdd(host, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := netlink.LinkSetUp(host); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	peer, err := h.LinkByName(outsidePeer)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{outsidePublic + "/24", outsidePrivate + "/24"} {
		addr, _ := netlink.ParseAddr(a)
		if err := h.AddrAdd(peer, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	// The outside knows the way to the sandboxes (as a LAN host could):
	// only the firewall keeps it out.
	_, sub, _ := net.ParseCIDR(testConfig().Subnet.String())
	if err := h.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Dst: sub, Gw: net.ParseIP("203.0.113.1")}); err != nil {
		t.Fatal(err)
	}
	w := &world{outside: ns}
	var ln net.Listener
	if err := inNS(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", ":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	serve(t, ln, "outside")
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	w.public, w.private = net.JoinHostPort(outsidePublic, port), net.JoinHostPort(outsidePrivate, port)
	hl, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, hl, "host")
	w.hostServer = fmt.Sprint(hl.Addr().(*net.TCPAddr).Port)
	return w
}

// serve answers each connection with name and the address it came from.
func serve(t *testing.T, ln net.Listener, name string) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			fmt.Fprintf(c, "%s %s\n", name, host)
			c.Close()
		}
	}()
}

// dialFrom connects to addr from namespace ns and returns the server's
// line, or the error.
func dialFrom(ns netns.NsHandle, addr string) (string, error) {
	var line string
	err := inNS(ns, func() error {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		return err
	})
	return strings.TrimSpace(line), err
}

func testConfig() Config {
	return Config{Subnet: netip.MustParsePrefix("10.214.0.0/24")}
}

// sandboxProcess starts a process in a network namespace of its own, as
// the process driver's init is, and returns its pid and namespace.
func sandboxProcess(t *testing.T) (int, netns.NsHandle) {
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
	return cmd.Process.Pid, ns
}

func TestAttach(t *testing.T) {
	w := newWorld(t)
	m, err := New(context.Background(), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	pidA, nsA := sandboxProcess(t)
	pidB, nsB := sandboxProcess(t)
	a, err := m.Attach(context.Background(), pidA)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := m.Attach(context.Background(), pidB)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if a.Slot == b.Slot {
		t.Fatalf("two links in slot %d", a.Slot)
	}

	// The internet is reachable, and sees the host's address.
	line, err := dialFrom(nsA, w.public)
	if err != nil || line != "outside 203.0.113.1" {
		t.Errorf("sandbox to the outside: %q, %v; want the outside server seeing the host's address", line, err)
	}
	// Nothing of the host is.
	hostTargets := []string{
		net.JoinHostPort(a.HostAddr.Addr().String(), w.hostServer),
		net.JoinHostPort("203.0.113.1", w.hostServer),
	}
	if ip := hostIPv4(); ip != "" {
		hostTargets = append(hostTargets, net.JoinHostPort(ip, w.hostServer))
	}
	for _, addr := range hostTargets {
		if line, err := dialFrom(nsA, addr); err == nil {
			t.Errorf("sandbox reached the host at %s: %q", addr, line)
		}
	}
	// Nor private networks, nor other sandboxes.
	if line, err := dialFrom(nsA, w.private); err == nil {
		t.Errorf("sandbox reached the private %s: %q", w.private, line)
	}
	var lnB net.Listener
	if err := inNS(nsB, func() error {
		var err error
		lnB, err = net.Listen("tcp", ":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	serve(t, lnB, "sandbox-b")
	addrB := net.JoinHostPort(b.SandboxAddr.Addr().String(), fmt.Sprint(lnB.Addr().(*net.TCPAddr).Port))
	if line, err := dialFrom(nsA, addrB); err == nil {
		t.Errorf("sandbox A reached sandbox B at %s: %q", addrB, line)
	}
	// Nothing from outside gets in.
	if line, err := dialFrom(w.outside, addrB); err == nil {
		t.Errorf("the outside reached sandbox B at %s: %q", addrB, line)
	}

	// Closing cuts the link off and removes it.
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(a.HostName); err == nil {
		t.Errorf("%s still exists after Close", a.HostName)
	}
	if _, err := dialFrom(nsA, w.public); err == nil {
		t.Errorf("a closed link still reaches the outside")
	}
}

func TestAllow(t *testing.T) {
	w := newWorld(t)
	cfg := testConfig()
	cfg.Allow = []netip.Prefix{netip.MustParsePrefix("10.99.0.0/24")}
	m, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	pid, ns := sandboxProcess(t)
	l, err := m.Attach(context.Background(), pid)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if line, err := dialFrom(ns, w.private); err != nil || !strings.HasPrefix(line, "outside ") {
		t.Errorf("an allowed private destination: %q, %v", line, err)
	}
}

func TestLinkGoesWithTheSandbox(t *testing.T) {
	needRoot(t)
	m, err := New(context.Background(), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
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
		n.Close()
		if err == nil && !same {
			if l, err = m.Attach(context.Background(), cmd.Process.Pid); err != nil {
				t.Fatal(err)
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if l == nil {
		t.Fatal("the process never got its namespace")
	}
	defer l.Close()
	cmd.Process.Kill()
	cmd.Wait()
	// The kernel deletes a dead namespace's links in the background.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := netlink.LinkByName(l.HostName); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s outlived its sandbox", l.HostName)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := l.Close(); err != nil {
		t.Errorf("Close after the sandbox died: %v", err)
	}
}

func TestVMNet(t *testing.T) {
	w := newWorld(t)
	m, err := New(context.Background(), testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
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
	if line, err := dialFrom(ns, w.public); err != nil || line != "outside 203.0.113.1" {
		t.Errorf("vm namespace to the outside: %q, %v", line, err)
	}
	if line, err := dialFrom(ns, net.JoinHostPort(v.HostAddr.Addr().String(), w.hostServer)); err == nil {
		t.Errorf("vm namespace reached the host: %q", line)
	}

	// A persistent tap (Firecracker's) outlives its descriptor and goes
	// with the namespace.
	p, err := m.NewVMNet(context.Background(), TapOptions{Persistent: true, Owner: 1234, Group: 1234})
	if err != nil {
		t.Fatal(err)
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
	host := p.HostName
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(host); err == nil {
		t.Errorf("%s still exists after Close", host)
	}
}

// hostIPv4 is one of the host's non-loopback IPv4 addresses, if any.
func hostIPv4() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String()
		}
	}
	return ""
}
