package network

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Host state shared by the Managers of a host.
const (
	// runDir holds the lock and the forwarding marker; /run is cleared at
	// boot, as the kernel's forwarding setting is.
	runDir = "/run/invokex-network"
	// lockName: every live Manager holds it shared; the one that can take
	// it exclusively at Close is the last and removes the table.
	lockName = "lock"
	// forwardingMarker exists while InvokeX, not the host's owner, has
	// turned IPv4 forwarding on; the last Manager turns it off again.
	forwardingMarker = "forwarding-enabled-by-invokex"
	ipForward        = "/proc/sys/net/ipv4/ip_forward"
)

// Manager gives sandboxes links (see the package documentation). Make one
// per process with New; Close it after the last Link.
type Manager struct {
	cfg   Config
	dns   []netip.Addr
	mtu   int
	lock  *os.File
	slots int

	mu    sync.Mutex
	inUse map[int]bool
	links int
	done  bool
}

// New measures the host and sets it up: forwarding on, the table
// installed. It returns an error wrapping ErrUnavailable when the host
// cannot do this (not root, no nftables support), and a plain error for
// a bad Config or a subnet the host already uses.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: not root", ErrUnavailable)
	}
	if err := checkSubnetFree(cfg.Subnet); err != nil {
		return nil, err
	}
	m := &Manager{cfg: cfg, slots: slots(cfg.Subnet), inUse: map[int]bool{}}
	m.dns = readNameservers(cfg.ResolvConf)
	m.mtu = uplinkMTU()
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	lock, err := os.OpenFile(filepath.Join(runDir, lockName), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	// Exclusive while setting up: two harnesses starting together must not
	// both read forwarding as off and both think it theirs.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		lock.Close()
		return nil, fmt.Errorf("locking %s: %w", lock.Name(), err)
	}
	err = m.setupHost()
	// Downgrade: other Managers may now start and share the host.
	if lerr := unix.Flock(int(lock.Fd()), unix.LOCK_SH); lerr != nil && err == nil {
		err = fmt.Errorf("locking %s: %w", lock.Name(), lerr)
	}
	if err != nil {
		lock.Close()
		return nil, err
	}
	m.lock = lock
	return m, nil
}

// setupHost turns forwarding on (noting when InvokeX did) and installs
// the table. Called under the exclusive lock.
func (m *Manager) setupHost() error {
	marker := filepath.Join(runDir, forwardingMarker)
	b, err := os.ReadFile(ipForward)
	if err != nil {
		return fmt.Errorf("%w: reading %s: %v", ErrUnavailable, ipForward, err)
	}
	if strings.TrimSpace(string(b)) != "1" {
		if err := os.WriteFile(marker, nil, 0o600); err != nil {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		if err := os.WriteFile(ipForward, []byte("1"), 0); err != nil {
			os.Remove(marker)
			return fmt.Errorf("%w: turning on IPv4 forwarding: %v", ErrUnavailable, err)
		}
	}
	_, ours := os.Stat(marker)
	r := rules{subnet: m.cfg.Subnet, allow: m.cfg.Allow, dns: m.dns, blocked: blockedRanges,
		dropOtherForwarding: ours == nil}
	if err := install(r); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// Close removes the host's table and turns forwarding back off if this is
// the last Manager on the host and no sandbox link is left; otherwise it
// only lets go. Links still open keep working until closed.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.done {
		m.mu.Unlock()
		return nil
	}
	m.done = true
	m.mu.Unlock()
	defer m.lock.Close()
	if unix.Flock(int(m.lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
		return nil // another Manager is alive
	}
	if n, err := hostLinks(); err != nil || n > 0 {
		return err // sandboxes still run (perhaps a crashed harness's)
	}
	var errs []error
	if err := uninstall(); err != nil {
		errs = append(errs, err)
	}
	marker := filepath.Join(runDir, forwardingMarker)
	if _, err := os.Stat(marker); err == nil {
		if err := os.WriteFile(ipForward, []byte("0"), 0); err != nil {
			errs = append(errs, fmt.Errorf("turning IPv4 forwarding off again: %w", err))
		} else {
			os.Remove(marker)
		}
	}
	return errors.Join(errs...)
}

// Describe says what sandboxes can reach, for the driver's Describe.
func (m *Manager) Describe() string {
	s := fmt.Sprintf("isolated egress (subnet %s; host, private networks and other sandboxes unreachable", m.cfg.Subnet)
	if len(m.cfg.Allow) > 0 {
		s += fmt.Sprintf("; allowed: %v", m.cfg.Allow)
	}
	if len(m.dns) == 0 {
		s += "; no name server: the host's are all loopback addresses"
	}
	return s + ")"
}

// DNS is the name servers sandboxes use.
func (m *Manager) DNS() []netip.Addr { return m.dns }

// claim takes a free slot by creating its host link with create; it
// returns the slot and what create made.
func (m *Manager) claim(create func(slot int) error) (int, error) {
	m.mu.Lock()
	if m.done {
		m.mu.Unlock()
		return 0, fmt.Errorf("network manager closed")
	}
	m.mu.Unlock()
	start := rand.IntN(m.slots)
	for i := range m.slots {
		slot := (start + i) % m.slots
		m.mu.Lock()
		taken := m.inUse[slot]
		if !taken {
			m.inUse[slot] = true
		}
		m.mu.Unlock()
		if taken {
			continue
		}
		err := create(slot)
		if err == nil {
			m.mu.Lock()
			m.links++
			m.mu.Unlock()
			return slot, nil
		}
		m.mu.Lock()
		delete(m.inUse, slot)
		m.mu.Unlock()
		if !errors.Is(err, unix.EEXIST) {
			return 0, err
		}
		// Another harness's link, or one of a sandbox that is still dying.
	}
	return 0, fmt.Errorf("no free slot in sandbox subnet %s", m.cfg.Subnet)
}

func (m *Manager) release(slot int) {
	m.mu.Lock()
	delete(m.inUse, slot)
	m.links--
	m.mu.Unlock()
}

// checkSubnetFree refuses a subnet that overlaps an address or route of
// the host, other than sandbox links'.
func checkSubnetFree(subnet netip.Prefix) error {
	routes, err := netlink.RouteList(nil, unix.AF_INET)
	if err != nil {
		return fmt.Errorf("%w: listing routes: %v", ErrUnavailable, err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue // the default route
		}
		p, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		dst := netip.PrefixFrom(p.Unmap(), ones)
		if !dst.Overlaps(subnet) || dst.Bits() == 0 {
			continue
		}
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil && strings.HasPrefix(l.Attrs().Name, LinkPrefix) {
			continue
		}
		return fmt.Errorf("sandbox subnet %s overlaps the host's route to %s: choose another (--sandbox-subnet)", subnet, dst)
	}
	return nil
}

// hostLinks counts the host's sandbox links.
func hostLinks() (int, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return 0, fmt.Errorf("listing links: %w", err)
	}
	n := 0
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, LinkPrefix) {
			n++
		}
	}
	return n, nil
}

// readNameservers are path's IPv4 name servers that a sandbox can use
// (not loopback: the sandbox's loopback is its own).
func readNameservers(path string) []netip.Addr {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []netip.Addr
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(fields[1])
		if err != nil || !a.Is4() || a.IsLoopback() {
			continue
		}
		out = append(out, a)
	}
	return out
}

// uplinkMTU is the MTU of the host's default route's device (a sandbox
// link with a larger one would have its large packets dropped), 1500 if
// unknown.
func uplinkMTU() int {
	routes, err := netlink.RouteList(nil, unix.AF_INET)
	if err == nil {
		for _, r := range routes {
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil && l.Attrs().MTU > 0 {
				return min(l.Attrs().MTU, 1500)
			}
		}
	}
	return 1500
}
