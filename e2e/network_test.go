package e2e

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"

	"github.com/invokex/invokex/internal/harness/network"
	"github.com/invokex/invokex/internal/harness/network/networktest"
)

// TestSandboxNetwork: with --sandbox-network a function reaches the
// internet (networktest's stand-in) and not the host: not this server's
// API, not a service on the host's addresses, not a private network. On
// the process sandbox and on each VM driver that can run here.
func TestSandboxNetwork(t *testing.T) {
	t.Run("process", func(t *testing.T) { sandboxNetwork(t, "process") })
	forVMDrivers(t, sandboxNetwork)
}

func sandboxNetwork(t *testing.T, driver string) {
	networktest.Skip(t)
	w := networktest.New(t, network.DefaultSubnet)
	hostPort := networktest.HostServer(t)
	s := startServer(t, "", "--driver", driver, "--sandbox-network")
	createProbe(t, s, "net", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(10) })
	dial := func(addr string) string {
		out := invoke(t, s, "net", map[string]any{"action": "dial", "addr": addr}, false)
		if out.FunctionError != nil {
			t.Fatalf("dial %s: %s", addr, out.Payload)
		}
		var o struct {
			Error string `json:"error"`
		}
		if err := json.Unmarshal(out.Payload, &o); err != nil {
			t.Fatalf("dial %s: %s: %v", addr, out.Payload, err)
		}
		return o.Error
	}
	if err := dial(w.PublicAddr); err != "" {
		t.Errorf("the function cannot reach the internet's %s: %s", w.PublicAddr, err)
	}
	unreachable := []string{
		// The server's API, on the host's loopback: the function's
		// loopback is its own.
		s.addr,
		w.PrivateAddr,
		net.JoinHostPort(networktest.HostPublic, hostPort),
	}
	if ip := networktest.HostIPv4(); ip != "" {
		unreachable = append(unreachable, net.JoinHostPort(ip, hostPort))
	}
	for _, addr := range unreachable {
		if err := dial(addr); err == "" {
			t.Errorf("the function reached %s (the host, or a private network)", addr)
		}
	}
	// The server says what sandboxes get.
	if log := s.log(); !strings.Contains(log, "isolated egress") {
		t.Errorf("the server's log does not describe the sandbox network:\n%.2000s", log)
	}
}

// TestSandboxNetworkAfterACrash: a server SIGKILLed with networked
// sandboxes leaves no link once they are gone, and the next server (here
// one without networks) removes its table.
func TestSandboxNetworkAfterACrash(t *testing.T) {
	networktest.Skip(t)
	dataDir := t.TempDir()
	// A subnet of its own: other tests' servers and drivers may run
	// beside this one, with links and tables of theirs.
	subnet := netip.MustParsePrefix("10.220.0.0/24")
	s := startServer(t, dataDir, "--sandbox-network", "--sandbox-subnet", subnet.String())
	createProbe(t, s, "net")
	invoke(t, s, "net", map[string]any{"action": "echo"}, false)
	if n := sandboxLinks(t, subnet); n == 0 {
		t.Fatal("no sandbox link while a networked instance is warm; the checks below would prove nothing")
	}
	s.kill()
	eventually(t, 30*time.Second, func() error {
		if p := processesUnder(dataDir); len(p) > 0 {
			return fmt.Errorf("sandbox processes outlive the crashed server: %v", p)
		}
		if n := sandboxLinks(t, subnet); n > 0 {
			return fmt.Errorf("%d sandbox links outlive the crashed server's sandboxes", n)
		}
		return nil
	})
	s2 := startServer(t, "")
	s2.stop()
	if tableOf(t, subnet) {
		t.Errorf("the crashed server's table is left after another server started")
	}
}

// sandboxLinks counts the host's sandbox links (network.LinkPrefix) in
// subnet.
func sandboxLinks(t *testing.T, subnet netip.Prefix) int {
	t.Helper()
	ifs, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, i := range ifs {
		if !strings.HasPrefix(i.Name, network.LinkPrefix) {
			continue
		}
		addrs, _ := i.Addrs()
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && subnet.Contains(p.Addr()) {
				n++
				break
			}
		}
	}
	return n
}

// tableOf reports whether the nftables table of subnet is installed.
func tableOf(t *testing.T, subnet netip.Prefix) bool {
	t.Helper()
	ok, err := network.Installed(subnet)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}
