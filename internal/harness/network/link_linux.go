package network

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Attach gives the network namespace ns (a descriptor of a sandbox's,
// e.g. its init's /proc/PID/ns/net: cloned with CLONE_NEWNET) a link to
// the outside: a veth whose end in the namespace is eth0, with
// SandboxAddr, a default route through HostAddr and loopback up. The link
// goes away with the namespace. The caller keeps ns.
func (m *Manager) Attach(ctx context.Context, ns int) (*Link, error) {
	l, err := m.veth(ctx, netns.NsHandle(ns), "eth0")
	if err != nil {
		return nil, err
	}
	l.nsFD = -1
	return l, nil
}

// veth claims a slot and joins ns to the host with a veth pair whose end
// in ns is named inside and configured (address, route, up; loopback up).
func (m *Manager) veth(ctx context.Context, ns netns.NsHandle, inside string) (*Link, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	m.life.RLock()
	defer m.life.RUnlock()
	if m.done {
		return nil, fmt.Errorf("sandbox network: manager closed")
	}
	if err := m.ensureTable(); err != nil {
		return nil, fmt.Errorf("sandbox network: restoring the host's rules: %w", err)
	}
	l := &Link{m: m, DNS: m.dns, MTU: m.mtu, nsFD: -1}
	slot, err := m.claim(func(slot int) error {
		la := netlink.NewLinkAttrs()
		la.Name = linkName(slot)
		la.MTU = m.mtu
		v := &netlink.Veth{LinkAttrs: la, PeerName: inside, PeerMTU: uint32(m.mtu), PeerNamespace: netlink.NsFd(int(ns))}
		err := netlink.LinkAdd(v)
		if errors.Is(err, unix.EEXIST) {
			if _, lerr := netlink.LinkByName(la.Name); lerr != nil {
				// Not the slot's name but the namespace's end: no other
				// slot would do better.
				return fmt.Errorf("creating veth %s: the sandbox's namespace has a %s already", la.Name, inside)
			}
		}
		if err != nil {
			return fmt.Errorf("creating veth %s: %w", la.Name, err)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	l.Slot, l.HostName = slot, linkName(slot)
	l.HostAddr, l.SandboxAddr = slotAddrs(m.cfg.Subnet, slot)
	if err := l.configure(ns, inside); err != nil {
		return nil, errors.Join(err, l.closeLocked())
	}
	return l, nil
}

// configure sets up both ends of a new veth.
func (l *Link) configure(ns netns.NsHandle, inside string) error {
	host, err := netlink.LinkByName(l.HostName)
	if err != nil {
		return fmt.Errorf("finding %s: %w", l.HostName, err)
	}
	// Before the link is up: no IPv6 (no link-local address a sandbox
	// could reach the host by) and strict reverse-path filtering (packets
	// from the sandbox must come from its own address).
	l.hostIndex = host.Attrs().Index
	// Strict reverse-path filtering (the table checks it too) and ARP
	// answers only for the link's own address, not the host's others.
	for k, v := range map[string]string{"rp_filter": "1", "arp_ignore": "1"} {
		if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+l.HostName+"/"+k, []byte(v), 0); err != nil {
			return fmt.Errorf("configuring %s: %w", l.HostName, err)
		}
	}
	// A host without IPv6 has no such file, and nothing to disable.
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+l.HostName+"/disable_ipv6", []byte("1"), 0); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("configuring %s: %w", l.HostName, err)
	}
	if err := netlink.AddrAdd(host, &netlink.Addr{IPNet: ipNet(l.HostAddr)}); err != nil {
		return fmt.Errorf("addressing %s: %w", l.HostName, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("bringing up %s: %w", l.HostName, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("opening netlink in the sandbox's namespace: %w", err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return fmt.Errorf("bringing up the sandbox's loopback: %w", err)
	}
	in, err := h.LinkByName(inside)
	if err != nil {
		return fmt.Errorf("finding the sandbox's %s: %w", inside, err)
	}
	if err := h.AddrAdd(in, &netlink.Addr{IPNet: ipNet(l.SandboxAddr)}); err != nil {
		return fmt.Errorf("addressing the sandbox's %s: %w", inside, err)
	}
	if err := h.LinkSetUp(in); err != nil {
		return fmt.Errorf("bringing up the sandbox's %s: %w", inside, err)
	}
	gw := net.IP(l.HostAddr.Addr().AsSlice())
	if err := h.RouteAdd(&netlink.Route{LinkIndex: in.Attrs().Index, Gw: gw}); err != nil {
		return fmt.Errorf("routing the sandbox through %s: %w", l.HostName, err)
	}
	return nil
}

// HostIndex is the host end's interface index (names are reused by later
// links, indexes not soon).
func (l *Link) HostIndex() int { return l.hostIndex }

// Close deletes the link (the veth pair, and for a VM the namespace with
// its tap once the VMM has let go of it) and frees its slot. Idempotent.
// The deletion runs in the background (the kernel takes tens of
// milliseconds to unregister a device): a stopping sandbox does not wait
// for it. Manager.Close waits for every deletion and reports its errors.
func (l *Link) Close() error {
	if l == nil {
		return nil
	}
	l.m.life.RLock()
	defer l.m.life.RUnlock()
	return l.closeLocked()
}

// closeLocked is Close for a caller holding m.life shared.
func (l *Link) closeLocked() error {
	if !l.closed.CompareAndSwap(false, true) {
		return nil
	}
	m := l.m
	nsFD := l.nsFD
	del := func() error {
		var err error
		// By index, not name: if the namespace died and took the link
		// with it, another harness may have claimed the name since.
		if host, lerr := netlink.LinkByIndex(l.hostIndex); lerr == nil && l.hostIndex > 0 && host.Attrs().Name == l.HostName {
			if derr := netlink.LinkDel(host); derr != nil && !errors.Is(derr, unix.ENODEV) {
				err = fmt.Errorf("deleting %s: %w", l.HostName, derr)
			}
		}
		if nsFD >= 0 {
			unix.Close(nsFD)
		}
		m.release(l.Slot)
		return err
	}
	if m.done {
		// The Manager has closed (and waited for its deletions): nothing
		// would wait for this one.
		return del()
	}
	m.deleting.Add(1)
	go func() {
		defer m.deleting.Done()
		if err := del(); err != nil {
			m.deleteFailed(err)
		}
	}()
	return nil
}

// VMNet is a VM's network: its namespace's link to the host and the tap
// its NIC uses.
type VMNet struct {
	*Link
	// Tap is an open descriptor of TapName (IFF_TAP|IFF_NO_PI|
	// IFF_VNET_HDR), for a VMM that takes one (QEMU: -netdev tap,fd=).
	// Close it once the VMM has its copy; the tap lives while any copy
	// does (or, if persistent, with the namespace).
	Tap *os.File
}

// NSPath is a path to the VM's namespace while the VMNet is open, for a
// VMM started in it (setns, or the jailer's --netns).
func (v *VMNet) NSPath() string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), v.nsFD) }

// NSFD is the VM's namespace (a descriptor this process holds until
// Close).
func (v *VMNet) NSFD() int { return v.nsFD }

// TapOptions are NewVMNet's.
type TapOptions struct {
	// Persistent keeps the tap when its descriptors close, for a VMM that
	// opens it by name (Firecracker); it is deleted with the namespace.
	// Owner and Group may then use it (0: root's).
	Persistent   bool
	Owner, Group int
}

// NewVMNet makes a VM's network: a namespace holding tap0 (GuestGateway,
// the guest's gateway) and a veth to the host (veth0), IPv4 forwarding
// on and the guest's traffic masqueraded to the veth's address. It takes
// one made ahead of need if there is one (Config.SpareVMNets) and has
// another made in the background.
func (m *Manager) NewVMNet(ctx context.Context, opts TapOptions) (*VMNet, error) {
	if err := m.Check(); err != nil {
		return nil, err
	}
	v, ok := m.spares.Take(struct{}{}, func(ctx context.Context, _ string) (*VMNet, error) { return m.newVMNet(ctx) })
	if !ok {
		var err error
		if v, err = m.newVMNet(ctx); err != nil {
			return nil, err
		}
	}
	if err := v.adapt(opts); err != nil {
		return nil, errors.Join(err, v.Close())
	}
	return v, nil
}

// newVMNet makes a VM network with a non-persistent tap held open.
func (m *Manager) newVMNet(ctx context.Context) (*VMNet, error) {
	ns, err := newNS()
	if err != nil {
		return nil, err
	}
	l, err := m.veth(ctx, ns, "veth0")
	if err != nil {
		ns.Close()
		return nil, err
	}
	l.nsFD = int(ns)
	v := &VMNet{Link: l}
	if err := v.setupInside(ns); err != nil {
		return nil, errors.Join(err, v.Close())
	}
	return v, nil
}

// adapt makes v's tap what opts ask for: persistent (and its owner's)
// for a VMM that opens it by name, through the descriptor v holds.
func (v *VMNet) adapt(opts TapOptions) error {
	if !opts.Persistent {
		return nil
	}
	fd := int(v.Tap.Fd())
	for _, c := range []struct {
		req uint
		v   int
	}{{unix.TUNSETOWNER, opts.Owner}, {unix.TUNSETGROUP, opts.Group}, {unix.TUNSETPERSIST, 1}} {
		if err := unix.IoctlSetInt(fd, c.req, c.v); err != nil {
			return fmt.Errorf("configuring tap %s: %w", TapName, err)
		}
	}
	v.Tap.Close()
	v.Tap = nil
	return nil
}

// Close closes the tap descriptor if still open and the link.
func (v *VMNet) Close() error {
	if v.Tap != nil {
		v.Tap.Close()
		v.Tap = nil
	}
	return v.Link.Close()
}

func (v *VMNet) setupInside(ns netns.NsHandle) error {
	err := inNS(ns, func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0); err != nil {
			return fmt.Errorf("turning on forwarding in the vm's namespace: %w", err)
		}
		tap, err := openTap(TapName)
		if err != nil {
			return err
		}
		v.Tap = tap
		return nil
	})
	if err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("opening netlink in the vm's namespace: %w", err)
	}
	defer h.Close()
	tap, err := h.LinkByName(TapName)
	if err != nil {
		return fmt.Errorf("finding %s: %w", TapName, err)
	}
	if err := h.LinkSetMTU(tap, v.MTU); err != nil {
		return fmt.Errorf("setting %s's mtu: %w", TapName, err)
	}
	gw := netip.PrefixFrom(GuestGateway, GuestPrefixLen)
	if err := h.AddrAdd(tap, &netlink.Addr{IPNet: ipNet(gw)}); err != nil {
		return fmt.Errorf("addressing %s: %w", TapName, err)
	}
	if err := h.LinkSetUp(tap); err != nil {
		return fmt.Errorf("bringing up %s: %w", TapName, err)
	}
	return natInside(int(ns), TapName, "veth0")
}

// openTap creates the tap name in the calling thread's namespace, with
// the flags Firecracker and QEMU attach with.
func openTap(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	f := os.NewFile(uintptr(fd), "tap:"+name)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		f.Close()
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		f.Close()
		return nil, fmt.Errorf("creating tap %s: %w", name, err)
	}
	return f, nil
}

// newNS makes a network namespace and returns a descriptor of it.
func newNS() (netns.NsHandle, error) {
	var ns netns.NsHandle
	err := onThread(func(orig netns.NsHandle) error {
		var err error
		ns, err = netns.New() // unshares this thread
		if err != nil {
			return fmt.Errorf("creating a network namespace: %w", err)
		}
		return nil
	})
	return ns, err
}

// inNS runs fn on a thread in ns (for what only the namespace's own
// threads can do: its sysctls, creating a tap in it).
func inNS(ns netns.NsHandle, fn func() error) error {
	return onThread(func(netns.NsHandle) error {
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("entering the vm's network namespace: %w", err)
		}
		return fn()
	})
}

// onThread runs fn on a locked thread of its own and puts the thread back
// in the process's network namespace afterwards; a thread that cannot go
// back is not returned to the Go scheduler (it exits with its goroutine).
func onThread(fn func(orig netns.NsHandle) error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("reading the thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		err = fn(orig)
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), 32)}
}
