package network

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// tablePrefix begins the name of InvokeX's nftables tables on the host,
// one per sandbox subnet (family inet, so that their input and forward
// rules cover IPv4 and IPv6 alike). Rules about sandbox links in general
// are the same in every table; rules about where sandboxes may go match
// the table's subnet, so Managers with different subnets (and Allow
// lists) can share a host.
const tablePrefix = "invokex"

// tableName is the table of subnet.
func tableName(subnet netip.Prefix) string {
	return tablePrefix + "-" + strings.NewReplacer(".", "-", "/", "-").Replace(subnet.String())
}

// rules is what the host's firewall must enforce for sandbox links. It is
// the same for every harness on a host that uses the same Config, so
// installing it again is harmless.
type rules struct {
	subnet netip.Prefix
	// allow: destinations a sandbox may reach although they are in
	// blocked (Config.Allow).
	allow []netip.Prefix
	// dns: the host's resolvers, reachable on port 53 only.
	dns []netip.Addr
	// blocked: private, shared, link-local and other non-internet ranges.
	blocked []netip.Prefix
	// maxFlows caps each sandbox's connections (conntrack entries) out:
	// the host's table of them is shared, and one sandbox must not fill
	// it for everyone (Config.MaxFlows).
	maxFlows int
	// dropOtherForwarding: the host did not route before InvokeX turned
	// forwarding on, so nothing but sandbox traffic may be forwarded.
	dropOtherForwarding bool `json:"-"`
}

// blockedRanges are the destinations Lambda's functions (outside a VPC)
// cannot reach either: the host's private networks, cloud metadata
// services (169.254.169.254), carrier-grade NAT, loopback, multicast.
var blockedRanges = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("224.0.0.0/3"), // multicast and reserved, to 255.255.255.255
	// Azure's WireServer: a platform endpoint at a public address that
	// hands out host configuration, as metadata services do.
	netip.MustParsePrefix("168.63.129.16/32"),
}

// install replaces the table with r's rules in one transaction: a harness
// starting beside running sandboxes never leaves them without rules.
func install(r rules) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: tableName(r.subnet)}
	// Adding then deleting then adding makes the transaction valid whether
	// or not the table existed.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)

	accept := nftables.ChainPolicyAccept
	// Before the host's own filters (priority 0), so that sandbox traffic
	// is judged by these rules first.
	prio := nftables.ChainPriorityRef(-1)
	input := c.AddChain(&nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: prio, Policy: &accept})
	forward := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: prio, Policy: &accept})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle, Policy: &accept})

	add := func(ch *nftables.Chain, exprs ...[]expr.Any) {
		var all []expr.Any
		for _, e := range exprs {
			all = append(all, e...)
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: all})
	}
	fromSandbox := ifname(unix.NFT_META_IIFNAME, true)
	toSandbox := ifname(unix.NFT_META_OIFNAME, true)

	// A packet from a sandbox must come from the address routed to its
	// link (nft's "fib saddr . iif oif missing drop"): the rules below
	// judge sandboxes by their source address, and a forged one would
	// slip past them (or have answers delivered to another sandbox). This
	// is strict reverse-path filtering that the host's rp_filter settings
	// (the kernel takes the looser of "all" and the link's) cannot weaken.
	add(pre, fromSandbox, []expr.Any{
		&expr.Fib{Register: 1, FlagSADDR: true, FlagIIF: true, ResultOIF: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}, verdict(expr.VerdictDrop))

	// Nothing from a sandbox reaches the host itself: not its addresses,
	// not the InvokeX API, not its other services.
	add(input, fromSandbox, reject())

	// Sandboxes do not reach each other.
	add(forward, fromSandbox, toSandbox, reject())
	// Packets conntrack cannot place (a late RST, one after its entry
	// expired) are never translated: they would leave with the sandbox's
	// own address.
	add(forward, fromSandbox, ctInvalid(), verdict(expr.VerdictDrop))
	// At most maxFlows connections per sandbox ("add @flows { ip saddr
	// ct count over N }"): a sandbox sending to many destinations cannot
	// fill the host's conntrack table, which would cut the host off.
	if r.maxFlows > 0 {
		flows := &nftables.Set{Table: t, Name: "flows", KeyType: nftables.TypeIPAddr, Dynamic: true}
		if err := c.AddSet(flows, nil); err != nil {
			return fmt.Errorf("adding the flows set: %w", err)
		}
		add(forward, fromSandbox, nfproto(unix.NFPROTO_IPV4), ctState(expr.CtStateBitNEW), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offSaddr, Len: 4},
			&expr.Dynset{SrcRegKey: 1, SetName: flows.Name, SetID: flows.ID, Operation: unix.NFT_DYNSET_OP_ADD,
				Exprs: []expr.Any{&expr.Connlimit{Count: uint32(r.maxFlows), Flags: connlimitOver}}},
		}, reject())
	}
	// IPv4 only: sandboxes get no IPv6 address or route.
	add(forward, fromSandbox, nfproto(unix.NFPROTO_IPV6), reject())
	// From here on, this subnet's sandboxes (a sandbox that took another
	// address is stopped by strict rp_filter on its link).
	ours := func(then ...[]expr.Any) {
		add(forward, append([][]expr.Any{fromSandbox, nfproto(unix.NFPROTO_IPV4), saddr(r.subnet)}, then...)...)
	}
	for _, a := range r.dns {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			ours(daddr(netip.PrefixFrom(a, a.BitLen())), l4proto(proto), dport(53), verdict(expr.VerdictAccept))
		}
	}
	for _, p := range r.allow {
		ours(daddr(p), verdict(expr.VerdictAccept))
	}
	for _, p := range r.blocked {
		ours(daddr(p), reject())
	}
	ours(verdict(expr.VerdictAccept))
	// Answers come back in; nothing else does.
	add(forward, toSandbox, established(), verdict(expr.VerdictAccept))
	add(forward, toSandbox, reject())
	if r.dropOtherForwarding {
		// IPv4 only: ip_forward, which InvokeX turned on, is IPv4's.
		add(forward, nfproto(unix.NFPROTO_IPV4), ifname(unix.NFT_META_IIFNAME, false), ifname(unix.NFT_META_OIFNAME, false), verdict(expr.VerdictDrop))
	}

	// Sandbox connections leave with the host's address.
	add(post, nfproto(unix.NFPROTO_IPV4), saddr(r.subnet), ifname(unix.NFT_META_OIFNAME, false), masq)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing the %s nftables table: %w", t.Name, err)
	}
	return nil
}

// uninstall deletes subnet's table; a missing table is not an error.
func uninstall(subnet netip.Prefix) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables: %w", err)
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: tableName(subnet)}
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("removing the %s nftables table: %w", t.Name, err)
	}
	return nil
}

var masq = []expr.Any{&expr.Masq{}}

// connlimitOver is NFT_CONNLIMIT_F_INV: the connlimit matches when the
// count is over its limit.
const connlimitOver = 1

// ifnameBytes is an interface name as the kernel compares it in full
// (with its terminating NUL).
func ifnameBytes(name string) []byte { return append([]byte(name), 0) }

// ifname matches the input or output interface's name on LinkPrefix
// (a prefix match, as nft's "invx*": only the prefix's bytes compared);
// with eq false, anything but.
func ifname(key expr.MetaKey, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: []byte(LinkPrefix)},
	}
}

func nfproto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func l4proto(p byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.BigEndian.AppendUint16(nil, port)},
	}
}

// IPv4 header offsets of the source and destination addresses.
const (
	offSaddr = 12
	offDaddr = 16
)

func saddr(p netip.Prefix) []expr.Any { return addrMatch(offSaddr, p, expr.CmpOpEq) }
func daddr(p netip.Prefix) []expr.Any { return addrMatch(offDaddr, p, expr.CmpOpEq) }

// addrMatch compares the IPv4 address at off, masked to p's length, with
// p. Callers match nfproto ipv4 first.
func addrMatch(off uint32, p netip.Prefix, op expr.CmpOp) []expr.Any {
	p = p.Masked()
	mask := make([]byte, 4)
	binary.BigEndian.PutUint32(mask, ^uint32(0)<<(32-p.Bits()))
	if p.Bits() == 0 {
		mask = []byte{0, 0, 0, 0}
	}
	a := p.Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: op, Register: 1, Data: a[:]},
	}
}

func established() []expr.Any { return ctState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED) }

func ctInvalid() []expr.Any { return ctState(expr.CtStateBitINVALID) }

// ctState matches a conntrack state among bits.
func ctState(bits32 uint32) []expr.Any {
	bits := binary.NativeEndian.AppendUint32(nil, bits32)
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: bits, Xor: []byte{0, 0, 0, 0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

// reject answers at once (ICMP administratively prohibited; a TCP connect
// fails with "no route to host") rather than dropping, so a function
// learns immediately instead of waiting for its timeout.
func reject() []expr.Any {
	return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}}
}

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

// natInside is the table in a VM's network namespace: the guest's traffic
// leaves the namespace with the address of its veth (so every VM, and
// every restore of a snapshot, can have the same guest address). Only
// the guest's own address is forwarded, and never a packet conntrack
// cannot place (those are not translated, so they would leave with
// whatever source the guest wrote).
func natInside(ns int, tap, out string) error {
	c, err := nftables.New(nftables.WithNetNSFd(ns))
	if err != nil {
		return fmt.Errorf("opening nftables in the vm's namespace: %w", err)
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: tablePrefix})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	drop := nftables.ChainPolicyDrop
	forward := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	name := func(key expr.MetaKey, n string) []expr.Any {
		return []expr.Any{
			&expr.Meta{Key: key, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: append([]byte(n), 0)},
		}
	}
	rule := func(ch *nftables.Chain, parts ...[]expr.Any) {
		var all []expr.Any
		for _, p := range parts {
			all = append(all, p...)
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: all})
	}
	rule(forward, ctInvalid(), verdict(expr.VerdictDrop))
	rule(forward, name(expr.MetaKeyIIFNAME, tap), name(expr.MetaKeyOIFNAME, out), nfproto(unix.NFPROTO_IPV4),
		saddr(netip.PrefixFrom(GuestAddr, 32)), verdict(expr.VerdictAccept))
	rule(forward, name(expr.MetaKeyOIFNAME, tap), established(), verdict(expr.VerdictAccept))
	rule(post, name(expr.MetaKeyOIFNAME, out), masq)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("installing nat in the vm's namespace: %w", err)
	}
	return nil
}
