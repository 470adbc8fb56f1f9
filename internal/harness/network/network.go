// Package network gives sandboxes the network of a Lambda function outside
// a VPC: connections out to the internet, nothing in, and no way to the
// host (its addresses, the InvokeX API, its other services), to the host's
// private networks or cloud metadata service, or to other sandboxes.
//
// Every sandbox with a network has a network namespace of its own, joined
// to the host by a veth pair: the host end is named LinkPrefix + slot and
// has the first address of the slot's /30 in Config.Subnet, the end in the
// namespace the second. The host forwards and masquerades the subnet's
// traffic and enforces the rules above with one nftables table per subnet,
// "invokex-<subnet>" (family inet), which the Manager puts back if a
// firewall reload removes it.
//
//   - A process sandbox's own namespace (its init was cloned with
//     CLONE_NEWNET) gets the veth as eth0: Manager.Attach.
//   - A VM gets a namespace made for it holding the veth and a tap, tap0,
//     its NIC's backend; the namespace masquerades the guest's traffic to
//     the veth's address, so every guest (and every restore of a
//     snapshot) has the same address, GuestAddr: Manager.NewVMNet.
//
// # Cleanup
//
// A link lives as long as its namespace: when the last process in it
// exits (for a VM, when QEMU or Firecracker exits, holding the tap), the
// kernel deletes the namespace and with it the veth pair and the tap. A
// crashed harness therefore leaves nothing once its sandboxes are gone,
// and the drivers' Recover kills those. Link.Close deletes the link in the
// background (the kernel takes tens of milliseconds); Manager.Close waits
// for that. A subnet's table is removed by its last Manager to close.
//
// # Concurrency
//
// Several Managers (harnesses, test processes) may share a host: a slot is
// claimed by creating its host link, which the kernel lets only one do. A
// Manager's methods are safe for concurrent use.
package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
)

// LinkPrefix begins the name of every host link of a sandbox.
const LinkPrefix = "invx"

// DefaultMaxFlows is Config.MaxFlows's default: four times what
// Lambda's 1,024 descriptors allow a function in TCP connections, and
// room for UDP flows, while 64 sandboxes at their cap fill no more than a
// host's default conntrack table (262,144 entries).
const DefaultMaxFlows = 4096

// DefaultSubnet is Config.Subnet's default: 16,384 sandboxes.
var DefaultSubnet = netip.MustParsePrefix("10.213.0.0/16")

// A VM's guest side, the same in every VM's namespace.
var (
	// GuestAddr is the guest's address, GuestGateway its gateway (tap0's
	// address), GuestPrefixLen the length of their network.
	GuestAddr      = netip.MustParseAddr("169.254.213.2")
	GuestGateway   = netip.MustParseAddr("169.254.213.1")
	GuestPrefixLen = 30
)

// KernelIP is the value of the guest kernel's ip= parameter for a VM on
// its namespace's tap (CONFIG_IP_PNP: eth0 configured before init runs),
// with dns its name servers (KernelDNS; "" for none).
func KernelIP(dns string) string {
	mask := net.IP(net.CIDRMask(GuestPrefixLen, 32)).String()
	// client:server:gateway:netmask:hostname:device:autoconf:dns0:dns1
	return GuestAddr.String() + "::" + GuestGateway.String() + ":" + mask + "::eth0:off:" + dns
}

// KernelDNS is dns as the kernel's ip= takes it (dns0:dns1, at most
// two), "" if none.
func KernelDNS(dns []netip.Addr) string {
	var out []string
	for _, a := range dns[:min(len(dns), 2)] {
		out = append(out, a.String())
	}
	return strings.Join(out, ":")
}

// TapName is the tap in a VM's namespace.
const TapName = "tap0"

// Config is a Manager's.
type Config struct {
	// Subnet holds the sandboxes' links, a /30 each (default
	// DefaultSubnet). It must not overlap a network the host uses.
	Subnet netip.Prefix
	// Allow names destinations in private or other blocked ranges that
	// sandboxes may reach anyway (a database on the host's LAN).
	Allow []netip.Prefix
	// ResolvConf is the host's resolver configuration (default
	// /etc/resolv.conf): its non-loopback name servers are the sandboxes'.
	ResolvConf string
	// MaxFlows caps the connections (conntrack entries: TCP connections,
	// UDP and ICMP flows) each sandbox has open to the outside at once;
	// further ones are refused. 0 means DefaultMaxFlows, negative no cap.
	MaxFlows int
	// SpareVMNets is how many VM networks the Manager keeps made ahead of
	// need once NewVMNet has been called (making one takes ~4 ms, on the
	// path of a snapshot restore): 0 means 1, negative none.
	SpareVMNets int
}

// Resolver configurations: the host's, and systemd-resolved's list of the
// servers its loopback stub forwards to.
const (
	defaultResolvConf = "/etc/resolv.conf"
	resolvedConf      = "/run/systemd/resolve/resolv.conf"
)

// ErrUnavailable: the host cannot give sandboxes their own network
// (not root, no nftables, no veth).
var ErrUnavailable = errors.New("isolated sandbox networking is unavailable")

// Link is one sandbox's connection to the outside. Close it when the
// sandbox is gone (or earlier, to cut it off).
type Link struct {
	// Slot numbers the link in the subnet; HostName is the host end.
	Slot     int
	HostName string
	// HostAddr and SandboxAddr are the veth's two ends (a /30).
	HostAddr, SandboxAddr netip.Prefix
	// DNS are the name servers the sandbox should use.
	DNS []netip.Addr
	// MTU is the link's, the host's route to the internet's.
	MTU int

	m         *Manager
	hostIndex int
	closed    atomic.Bool
	// nsFD holds a VM's namespace (NewVMNet) until Close; -1 for a process
	// sandbox's, which its processes hold.
	nsFD int
}

// slotAddrs are slot's /30 in subnet: the host end and the sandbox end.
func slotAddrs(subnet netip.Prefix, slot int) (host, sandbox netip.Prefix) {
	base := subnet.Masked().Addr().As4()
	n := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	n += uint32(slot) * 4
	ip := func(v uint32) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return netip.PrefixFrom(ip(n+1), 30), netip.PrefixFrom(ip(n+2), 30)
}

// slots is how many /30 subnet holds.
func slots(subnet netip.Prefix) int {
	if !subnet.Addr().Is4() || subnet.Bits() > 30 {
		return 0
	}
	return 1 << (30 - subnet.Bits())
}

// linkName is slot's host link.
func linkName(slot int) string { return LinkPrefix + strconv.Itoa(slot) }

// guestMAC is a VM's NIC's address: locally administered, the same in
// every VM (each is alone on its tap).
var guestMAC = net.HardwareAddr{0x06, 0x00, 0xa9, 0xfe, 0xd5, 0x02}

// GuestMAC is guestMAC as text, for VMM configurations.
func GuestMAC() string { return guestMAC.String() }

func (c Config) withDefaults() Config {
	if !c.Subnet.IsValid() {
		c.Subnet = DefaultSubnet
	}
	c.Subnet = c.Subnet.Masked()
	if c.ResolvConf == "" {
		c.ResolvConf = defaultResolvConf
	}
	if c.MaxFlows == 0 {
		c.MaxFlows = DefaultMaxFlows
	}
	return c
}

func (c Config) validate() error {
	if !c.Subnet.Addr().Is4() {
		return fmt.Errorf("sandbox subnet %s: an IPv4 network is needed", c.Subnet)
	}
	if slots(c.Subnet) < 4 {
		return fmt.Errorf("sandbox subnet %s: too small (a /28 holds four sandboxes; a /16 is the default)", c.Subnet)
	}
	if c.Subnet.Overlaps(netip.PrefixFrom(GuestAddr, GuestPrefixLen)) {
		return fmt.Errorf("sandbox subnet %s overlaps the VMs' guest network %s", c.Subnet, netip.PrefixFrom(GuestAddr, GuestPrefixLen).Masked())
	}
	for _, p := range c.Allow {
		if !p.Addr().Is4() {
			return fmt.Errorf("allowed destination %s: IPv4 networks only", p)
		}
	}
	return nil
}
