package e2e

import (
	"encoding/json"
	"net"
	"strings"
	"testing"

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
