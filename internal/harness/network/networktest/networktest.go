// Package networktest builds, for tests of sandbox networking, a stand-in
// for the internet: a network namespace reachable from the host through a
// veth (whose host end is not a sandbox link), with a TCP server on a
// public address (TEST-NET-3) and on a private one. It needs root; a
// world is host-wide, so test processes take turns (a lock in /run).
package networktest

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Addresses of the world. The host's end of the veth has HostPublic and
// HostPrivate; the outside server answers on Public and Private.
const (
	HostPublic  = "203.0.113.1"
	Public      = "203.0.113.2"
	HostPrivate = "10.99.0.1"
	Private     = "10.99.0.2"

	hostLink = "ixtest-out"
	peerLink = "ixtest-peer"
	lockPath = "/run/invokex-networktest.lock"
)

// World is the stand-in internet of one test.
type World struct {
	// NS is the outside's namespace.
	NS netns.NsHandle
	// PublicAddr and PrivateAddr are the outside server's host:port.
	PublicAddr, PrivateAddr string
	// UDPAddr is a UDP sink on the public address; Datagrams lists what
	// reached it.
	UDPAddr string

	mu        sync.Mutex
	datagrams []Datagram
}

// Datagram is one that reached the UDP sink: its source and payload.
type Datagram struct {
	From, Payload string
}

// Datagrams is what reached the UDP sink so far.
func (w *World) Datagrams() []Datagram {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]Datagram(nil), w.datagrams...)
}

// Skip skips t unless it can build a World.
func Skip(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces, links and nftables rules")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("no /dev/net/tun")
	}
}

// New builds a World, removed when t ends. sandboxes is the subnet
// sandbox links are in: the outside gets a route to it, as a host on the
// LAN could have, so that only the host's firewall keeps it out.
func New(t testing.TB, sandboxes netip.Prefix) *World {
	t.Helper()
	Skip(t)
	lock, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lock.Close() })
	if l, err := netlink.LinkByName(hostLink); err == nil {
		netlink.LinkDel(l) // a crashed test's
	}
	var ns netns.NsHandle
	if err := onThread(func() error {
		var err error
		ns, err = netns.New()
		return err
	}); err != nil {
		t.Fatalf("creating the outside's namespace: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	la := netlink.NewLinkAttrs()
	la.Name = hostLink
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: peerLink, PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostLink); err == nil {
			netlink.LinkDel(l)
		}
	})
	host, _ := netlink.LinkByName(hostLink)
	for _, a := range []string{HostPublic + "/24", HostPrivate + "/24"} {
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
	peer, err := h.LinkByName(peerLink)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{Public + "/24", Private + "/24"} {
		addr, _ := netlink.ParseAddr(a)
		if err := h.AddrAdd(peer, addr); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.LinkSetUp(peer); err != nil {
		t.Fatal(err)
	}
	_, sub, _ := net.ParseCIDR(sandboxes.String())
	if err := h.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Dst: sub, Gw: net.ParseIP(HostPublic)}); err != nil {
		t.Fatal(err)
	}
	w := &World{NS: ns}
	var ln net.Listener
	if err := InNS(ns, func() error {
		var err error
		ln, err = net.Listen("tcp", ":0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	Serve(t, ln, "outside")
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	w.PublicAddr, w.PrivateAddr = net.JoinHostPort(Public, port), net.JoinHostPort(Private, port)
	var pc net.PacketConn
	if err := InNS(ns, func() error {
		var err error
		pc, err = net.ListenPacket("udp4", net.JoinHostPort(Public, "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	w.UDPAddr = pc.LocalAddr().String()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(from.String())
			w.mu.Lock()
			w.datagrams = append(w.datagrams, Datagram{From: host, Payload: string(buf[:n])})
			w.mu.Unlock()
		}
	}()
	return w
}

// HostServer listens on all the host's addresses and returns the port.
func HostServer(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	Serve(t, ln, "host")
	return fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
}

// Serve answers each connection on ln with a line: name and the address
// the connection came from.
func Serve(t testing.TB, ln net.Listener, name string) {
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

// Dial connects to addr from namespace ns and returns the server's line.
func Dial(ns netns.NsHandle, addr string) (string, error) {
	var line string
	err := InNS(ns, func() error {
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

// InNS runs fn on a thread in ns.
func InNS(ns netns.NsHandle, fn func() error) error {
	return onThread(func() error {
		if err := netns.Set(ns); err != nil {
			return err
		}
		return fn()
	})
}

// onThread runs fn on a locked thread, which is discarded afterwards
// unless it can return to the process's network namespace. (Package
// network has the same helper; this package cannot import network, whose
// own tests import this one.)
func onThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// HostIPv4 is one of the host's non-loopback, non-link-local IPv4
// addresses, "" if none: a target no sandbox may reach (a VM's 127.0.0.1
// is its own, so the host's loopback is no common target for every
// driver).
func HostIPv4() string {
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() && !n.IP.IsLinkLocalUnicast() {
			return n.IP.String()
		}
	}
	return ""
}
