package drivertest

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/harness/network"
	"github.com/invokex/invokex/internal/harness/network/networktest"
)

// hostListener listens on ip:0 for the network tests and returns its
// address.
func hostListener(t *testing.T, ip string) string {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	networktest.Serve(t, l, "host")
	return l.Addr().String()
}

func (s *suite) testNetworkIsolated(t *testing.T) {
	targets := []string{hostListener(t, "127.0.0.1")}
	if ip := networktest.HostIPv4(); ip != "" {
		targets = append(targets, hostListener(t, ip))
	}
	e := s.env(t)
	sb := e.start(t, e.spec())
	sb.init()
	for _, addr := range targets {
		var o outcome
		sb.call(map[string]any{"action": "dial", "addr": addr}, &o)
		if o.Error == "" {
			t.Errorf("an isolated sandbox reached the host's %s", addr)
		}
	}
}

// testNetworkEgress: a sandbox with Network reaches the internet (the
// stand-in of package networktest) and nothing of the host: not its
// addresses, not its private networks. The driver must use the default
// sandbox subnet (network.DefaultSubnet).
func (s *suite) testNetworkEgress(t *testing.T) {
	w := networktest.New(t, network.DefaultSubnet)
	port := networktest.HostServer(t)
	e := s.env(t)
	sp := e.spec()
	sp.Network = true
	sb := e.start(t, sp)
	sb.init()
	dial := func(addr string) string {
		var o outcome
		sb.call(map[string]any{"action": "dial", "addr": addr}, &o)
		return o.Error
	}
	if err := dial(w.PublicAddr); err != "" {
		t.Errorf("a sandbox with Network cannot reach the internet's %s: %s", w.PublicAddr, err)
	}
	unreachable := []string{
		w.PrivateAddr,
		net.JoinHostPort(networktest.HostPublic, port),
		net.JoinHostPort(networktest.HostPrivate, port),
	}
	if ip := networktest.HostIPv4(); ip != "" {
		unreachable = append(unreachable, net.JoinHostPort(ip, port))
	}
	for _, addr := range unreachable {
		if dial(addr) == "" {
			t.Errorf("a sandbox with Network reached %s (the host, or a private network)", addr)
		}
	}
	var o outcome
	sb.call(map[string]any{"action": "read-file", "path": "/etc/resolv.conf"}, &o)
	if strings.Contains(o.Data, "nameserver 127.") {
		t.Errorf("the sandbox's resolv.conf names a loopback resolver, its own loopback:\n%s", o.Data)
	}
}

// NetworkManager is a network manager on the default subnet for a driver
// test process, as a server has one, closed when t ends; nil, with
// NetworkEgress and SnapshotEgress marked unsupported in opts, where the
// host cannot isolate sandboxes (not root). Other errors fail t.
func NetworkManager(t *testing.T, opts *Options) *network.Manager {
	t.Helper()
	nm, err := network.New(context.Background(), network.Config{})
	if errors.Is(err, network.ErrUnavailable) {
		if opts.Unsupported == nil {
			opts.Unsupported = map[string]string{}
		}
		opts.Unsupported["NetworkEgress"] = err.Error()
		opts.Unsupported["SnapshotEgress"] = err.Error()
		return nil
	}
	if err != nil {
		t.Fatalf("network.New: %v", err)
	}
	t.Cleanup(func() { nm.Close() })
	return nm
}
