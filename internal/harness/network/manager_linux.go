package network

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"

	"github.com/invokex/invokex/internal/harness/driver/pool"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Host state shared by the Managers of a host, in runDir (/run is
// cleared at boot, as the kernel's forwarding setting and tables are).
//
// Locks: setupLock serializes setting up and tearing down. Every live
// Manager holds usersLock shared, and its table's lock (tableLock) shared:
// a Manager that can take one exclusively at Close is the last of the
// host, or of its subnet, and undoes what they set up.
const (
	runDir    = "/run/invokex-network"
	setupLock = "setup.lock"
	usersLock = "users.lock"
	ipForward = "/proc/sys/net/ipv4/ip_forward"
	// forwardingMarker exists while InvokeX, not the host's owner, has
	// turned IPv4 forwarding on; the last Manager turns it off again.
	forwardingMarker = "forwarding-enabled-by-invokex"
)

// tableLock and tableConfig are a table's files in runDir.
func tableLock(subnet netip.Prefix) string   { return tableName(subnet) + ".lock" }
func tableConfig(subnet netip.Prefix) string { return tableName(subnet) + ".json" }

// Manager gives sandboxes links (see the package documentation). Make one
// per process with New; Close it after the last Link.
type Manager struct {
	cfg   Config
	dns   []netip.Addr
	mtu   int
	rules rules
	users *os.File // usersLock, held shared
	table *os.File // tableLock, held shared
	slots int

	// life is held shared by every link being made and exclusively by
	// Close, so that Close never removes the table under a new link.
	life sync.RWMutex
	done bool // under life

	mu    sync.Mutex
	inUse map[int]bool
	// deleting counts links Close is deleting in the background;
	// deleteErrs are their failures, for Manager.Close.
	deleting   sync.WaitGroup
	deleteErrs []error

	// spares are VM networks made ahead of need (Config.SpareVMNets).
	spares *pool.Pool[struct{}, *VMNet]
	// watchStop ends watch; watchDone is closed when it has.
	watchStop, watchDone chan struct{}
}

func (m *Manager) deleteFailed(err error) {
	m.mu.Lock()
	m.deleteErrs = append(m.deleteErrs, err)
	m.mu.Unlock()
}

// ErrConflict: another InvokeX on this host uses the same sandbox subnet
// with other rules (Allow, name servers), or an overlapping one.
var ErrConflict = errors.New("sandbox subnet in use with other rules")

// lockWait bounds the wait for another Manager's setup or teardown.
const lockWait = 30 * time.Second

// New measures the host and sets it up: the subnet's table installed,
// then forwarding on. It returns an error wrapping ErrUnavailable when the
// host cannot do this (not root, no nftables support), ErrConflict when
// another InvokeX uses the subnet with other rules or an overlapping
// subnet, and a plain error for a bad Config or a subnet the host already
// routes. On error the host is as it was.
func New(ctx context.Context, cfg Config) (*Manager, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("%w: not root", ErrUnavailable)
	}
	m := &Manager{cfg: cfg, slots: slots(cfg.Subnet), inUse: map[int]bool{}}
	spares := cfg.SpareVMNets
	if spares == 0 {
		spares = 1
	}
	m.spares = pool.New[struct{}](pool.Config[*VMNet]{
		Size: spares, Prefix: "vmnet-", Kind: "spare vm network",
		Name:    func(v *VMNet) string { return v.HostName },
		Destroy: func(_ context.Context, v *VMNet) error { return v.Close() },
	})
	m.dns = readNameservers(cfg.ResolvConf)
	if len(m.dns) == 0 && cfg.ResolvConf == defaultResolvConf {
		// systemd-resolved's stub (127.0.0.53) is the host's own; the
		// servers it forwards to are listed here.
		m.dns = readNameservers(resolvedConf)
	}
	m.dns = withoutHostAddrs(m.dns)
	m.mtu = uplinkMTU()
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	ctx, cancel := context.WithTimeout(ctx, lockWait)
	defer cancel()
	setup, err := lockFile(ctx, setupLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer setup.Close()
	if err := checkSubnetFree(cfg.Subnet); err != nil {
		return nil, err
	}
	if err := m.setupHost(ctx); err != nil {
		if m.users != nil {
			m.users.Close()
		}
		if m.table != nil {
			m.table.Close()
		}
		return nil, err
	}
	m.watchStop, m.watchDone = make(chan struct{}), make(chan struct{})
	go m.watch()
	return m, nil
}

// watchEvery is how often a Manager checks that its table is still
// installed (a firewall reload that flushes the ruleset removes it).
const watchEvery = time.Second

// watch puts the table back whenever it finds it gone, until Close.
func (m *Manager) watch() {
	defer close(m.watchDone)
	t := time.NewTicker(watchEvery)
	defer t.Stop()
	for {
		select {
		case <-m.watchStop:
			return
		case <-t.C:
			_ = m.Check() // an error now is an error at the next link
		}
	}
}

// Check makes sure the subnet's table is installed, putting it back if
// something removed it; the Manager also checks every watchEvery. Callers
// check before handing out a link made ahead of need.
func (m *Manager) Check() error {
	m.life.RLock()
	defer m.life.RUnlock()
	if m.done {
		return fmt.Errorf("sandbox network: manager closed")
	}
	if err := m.ensureTable(); err != nil {
		return fmt.Errorf("sandbox network: restoring the host's rules: %w", err)
	}
	return nil
}

// lockFile opens runDir/name and flocks it with how, waiting until ctx
// is done at most.
func lockFile(ctx context.Context, name string, how int) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(runDir, name), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("locking %s (another InvokeX is setting up or tearing down its sandbox network): %w", f.Name(), context.Cause(ctx))
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// first reports whether no other Manager holds f, then holds it shared.
// Converting a flock is not atomic (a failed upgrade may drop the shared
// lock for a moment): callers hold setupLock, so no other Manager looks
// meanwhile.
func first(f *os.File) (bool, error) {
	alone := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH); err != nil {
		return false, fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	return alone, nil
}

// tableState is what runDir records of a subnet's table: a second Manager
// must ask for the same rules, and no other subnet may overlap it.
type tableState struct {
	Subnet   netip.Prefix
	Allow    []netip.Prefix
	DNS      []netip.Addr
	MaxFlows int
}

// setupHost installs the subnet's table, then turns forwarding on (noting
// when InvokeX did). Called under setupLock.
func (m *Manager) setupHost(ctx context.Context) error {
	var err error
	if m.users, err = lockFile(ctx, usersLock, unix.LOCK_SH); err != nil {
		return err
	}
	if err := checkOverlaps(ctx, m.cfg.Subnet); err != nil {
		return err
	}
	if m.table, err = lockFile(ctx, tableLock(m.cfg.Subnet), unix.LOCK_SH); err != nil {
		return err
	}
	r := rules{subnet: m.cfg.Subnet, allow: m.cfg.Allow, dns: m.dns, blocked: blockedRanges, maxFlows: max(m.cfg.MaxFlows, 0)}
	want, _ := json.Marshal(tableState{Subnet: r.subnet, Allow: r.allow, DNS: r.dns, MaxFlows: r.maxFlows})
	conf := filepath.Join(runDir, tableConfig(m.cfg.Subnet))
	alone, err := first(m.table)
	if err != nil {
		return err
	}
	if !alone {
		if have, err := os.ReadFile(conf); err == nil && string(have) != string(want) {
			return fmt.Errorf("%w: another InvokeX on this host uses sandbox subnet %s with %s, this one asks for %s (give it another --sandbox-subnet)",
				ErrConflict, m.cfg.Subnet, have, want)
		}
	}

	marker := filepath.Join(runDir, forwardingMarker)
	b, err := os.ReadFile(ipForward)
	if err != nil {
		return fmt.Errorf("%w: reading %s: %v", ErrUnavailable, ipForward, err)
	}
	off := strings.TrimSpace(string(b)) != "1"
	_, merr := os.Stat(marker)
	r.dropOtherForwarding = off || merr == nil
	// The table first: forwarding never runs without it. Installing again
	// while another Manager uses the table replaces it with the same
	// rules in one transaction.
	if err := install(r); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	m.rules = r
	if err := os.WriteFile(conf, want, 0o600); err != nil {
		return m.undoSetup(alone, fmt.Errorf("%w: %v", ErrUnavailable, err))
	}
	if off {
		if err := os.WriteFile(marker, nil, 0o600); err != nil {
			return m.undoSetup(alone, fmt.Errorf("%w: %v", ErrUnavailable, err))
		}
		if err := os.WriteFile(ipForward, []byte("1"), 0); err != nil {
			os.Remove(marker)
			return m.undoSetup(alone, fmt.Errorf("%w: turning on IPv4 forwarding: %v", ErrUnavailable, err))
		}
	}
	return nil
}

// undoSetup removes the table a failed New installed, if no other
// Manager uses it, and returns err.
func (m *Manager) undoSetup(alone bool, err error) error {
	if alone {
		if uerr := uninstall(m.cfg.Subnet); uerr != nil {
			err = errors.Join(err, uerr)
		}
		os.Remove(filepath.Join(runDir, tableConfig(m.cfg.Subnet)))
	}
	return err
}

// checkOverlaps refuses a subnet that overlaps another live Manager's
// (two links holding the same /30 would get each other's traffic).
// Records of Managers that are gone are removed. Called under setupLock.
func checkOverlaps(ctx context.Context, subnet netip.Prefix) error {
	files, _ := filepath.Glob(filepath.Join(runDir, tablePrefix+"-*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var st tableState
		if json.Unmarshal(b, &st) != nil || !st.Subnet.IsValid() || st.Subnet == subnet || !st.Subnet.Overlaps(subnet) {
			continue
		}
		lock, err := lockFile(ctx, tableLock(st.Subnet), unix.LOCK_SH)
		if err != nil {
			return err
		}
		alone := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
		lock.Close()
		if alone {
			os.Remove(f) // its Managers are gone (they crashed)
			continue
		}
		return fmt.Errorf("%w: sandbox subnet %s overlaps %s, which another InvokeX on this host uses", ErrConflict, subnet, st.Subnet)
	}
	return nil
}

// ensureTable puts the subnet's table back if something removed it (a
// firewall reload that flushes the ruleset): without it sandboxes would
// reach the host.
func (m *Manager) ensureTable() error {
	ok, err := Installed(m.cfg.Subnet)
	if err != nil || ok {
		return err
	}
	return install(m.rules)
}

// Installed reports whether the host has the nftables table of subnet's
// sandboxes.
func Installed(subnet netip.Prefix) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("opening nftables: %w", err)
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("listing nftables tables: %w", err)
	}
	for _, t := range tables {
		if t.Name == tableName(subnet.Masked()) {
			return true, nil
		}
	}
	return false, nil
}

// Close removes the subnet's table if this is its last Manager and no
// link of the subnet is left, and turns forwarding back off if it was the
// host's last Manager and InvokeX turned it on; otherwise it only lets go.
// Links still open keep working until closed.
func (m *Manager) Close() error {
	m.life.Lock()
	if m.done {
		m.life.Unlock()
		return nil
	}
	m.done = true
	m.life.Unlock()
	close(m.watchStop)
	<-m.watchDone
	perr := m.spares.Close(context.Background())
	m.deleting.Wait()
	m.mu.Lock()
	errs := m.deleteErrs
	m.mu.Unlock()
	if perr != nil {
		errs = append(errs, perr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), lockWait)
	defer cancel()
	setup, err := lockFile(ctx, setupLock, unix.LOCK_EX)
	if err != nil {
		m.table.Close()
		m.users.Close()
		return err
	}
	defer setup.Close()
	lastOfTable := unix.Flock(int(m.table.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
	if lastOfTable {
		if n, err := hostLinks(m.cfg.Subnet); err != nil {
			errs = append(errs, err)
		} else if n == 0 { // else sandboxes still run (a crashed harness's)
			if err := uninstall(m.cfg.Subnet); err != nil {
				errs = append(errs, err)
			}
			os.Remove(filepath.Join(runDir, tableConfig(m.cfg.Subnet)))
		}
	}
	m.table.Close()
	if unix.Flock(int(m.users.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
		// Forwarding back off only if InvokeX turned it on. (A tool that
		// started meanwhile and found it on, rather than turning it on
		// itself, would lose it: docs/architecture.md says so.)
		marker := filepath.Join(runDir, forwardingMarker)
		if n, err := hostLinks(netip.Prefix{}); err == nil && n == 0 {
			if _, err := os.Stat(marker); err == nil {
				if err := os.WriteFile(ipForward, []byte("0"), 0); err != nil {
					errs = append(errs, fmt.Errorf("turning IPv4 forwarding off again: %w", err))
				} else {
					os.Remove(marker)
				}
			}
		}
	}
	m.users.Close()
	return errors.Join(errs...)
}

// Describe says what sandboxes can reach, for the driver's Describe.
func (m *Manager) Describe() string {
	s := fmt.Sprintf("isolated egress (subnet %s; host, private networks and other sandboxes unreachable", m.cfg.Subnet)
	if m.rules.maxFlows > 0 {
		s += fmt.Sprintf("; at most %d connections per sandbox", m.rules.maxFlows)
	}
	if len(m.cfg.Allow) > 0 {
		s += fmt.Sprintf("; allowed: %v", m.cfg.Allow)
	}
	if len(m.dns) == 0 {
		s += "; no name server: the host's are all its own addresses, which sandboxes cannot reach"
	}
	return s + ")"
}

// DNS is the name servers sandboxes use.
func (m *Manager) DNS() []netip.Addr { return m.dns }

// claim takes a free slot by creating its host link with create; it
// returns the slot and what create made.
func (m *Manager) claim(create func(slot int) error) (int, error) {
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

// hostLinks counts the host's sandbox links, those with an address in
// subnet if it is valid.
func hostLinks(subnet netip.Prefix) (int, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return 0, fmt.Errorf("listing links: %w", err)
	}
	n := 0
	for _, l := range links {
		if !strings.HasPrefix(l.Attrs().Name, LinkPrefix) {
			continue
		}
		if !subnet.IsValid() {
			n++
			continue
		}
		addrs, _ := netlink.AddrList(l, unix.AF_INET)
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && subnet.Contains(ip) {
				n++
				break
			}
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

// withoutHostAddrs leaves out name servers that are the host's own
// addresses: sandboxes cannot reach the host.
func withoutHostAddrs(dns []netip.Addr) []netip.Addr {
	addrs, err := netlink.AddrList(nil, unix.AF_INET)
	if err != nil {
		return dns
	}
	var out []netip.Addr
	for _, d := range dns {
		own := false
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == d {
				own = true
			}
		}
		if !own {
			out = append(out, d)
		}
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

// Sweep undoes what Managers that are gone without closing (their
// process crashed, or was killed) left on the host: the tables of subnets
// no live Manager uses and whose links are gone, and, if no Manager runs
// at all, forwarding InvokeX turned on. A server that gives sandboxes no
// network calls it at start; New does the same for its own subnet.
// Without root it does nothing.
func Sweep(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return nil
	}
	if _, err := os.Stat(runDir); err != nil {
		return nil // no Manager ran since boot
	}
	ctx, cancel := context.WithTimeout(ctx, lockWait)
	defer cancel()
	setup, err := lockFile(ctx, setupLock, unix.LOCK_EX)
	if err != nil {
		return err
	}
	defer setup.Close()
	var errs []error
	files, _ := filepath.Glob(filepath.Join(runDir, tablePrefix+"-*.json"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		var st tableState
		if err != nil || json.Unmarshal(b, &st) != nil || !st.Subnet.IsValid() {
			continue
		}
		lock, err := lockFile(ctx, tableLock(st.Subnet), unix.LOCK_SH)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		alone, err := first(lock)
		lock.Close()
		if err != nil || !alone {
			continue // a live Manager's
		}
		if n, err := hostLinks(st.Subnet); err != nil || n > 0 {
			continue // its sandboxes still run
		}
		if err := uninstall(st.Subnet); err != nil {
			errs = append(errs, err)
			continue
		}
		os.Remove(f)
	}
	users, err := lockFile(ctx, usersLock, unix.LOCK_SH)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	defer users.Close()
	if alone, err := first(users); err != nil || !alone {
		return errors.Join(append(errs, err)...)
	}
	marker := filepath.Join(runDir, forwardingMarker)
	if _, err := os.Stat(marker); err == nil {
		if n, err := hostLinks(netip.Prefix{}); err == nil && n == 0 {
			if err := os.WriteFile(ipForward, []byte("0"), 0); err != nil {
				errs = append(errs, fmt.Errorf("turning IPv4 forwarding off again: %w", err))
			} else {
				os.Remove(marker)
			}
		}
	}
	return errors.Join(errs...)
}
