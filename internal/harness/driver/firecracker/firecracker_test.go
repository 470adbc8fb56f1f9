package firecracker_test

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/firecracker"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
)

// Environment of the real tests: where Firecracker (and, to test jailed
// VMs, the jailer) are, when not in PATH.
const (
	firecrackerEnv = "INVOKEX_FIRECRACKER"
	jailerEnv      = "INVOKEX_JAILER"
	// agentEnv hands the agent binary the parent test built to the
	// suite's crash-helper child, so it is built once per run.
	agentEnv = "INVOKEX_FIRECRACKER_TEST_AGENT"
)

// TestDriver runs the conformance suite against real Firecracker VMs
// booting the guest kernel, with invokex (built static) as their init. It
// runs where /dev/kvm runs a standard guest and a firecracker binary is
// found, and skips with the reasons elsewhere.
func TestDriver(t *testing.T) {
	var missing []string
	fc := os.Getenv(firecrackerEnv)
	if fc == "" {
		if p, err := exec.LookPath("firecracker"); err == nil {
			fc = p
		} else {
			missing = append(missing, "no firecracker binary (set "+firecrackerEnv+" or put firecracker in PATH)")
		}
	}
	if err := probeKVM(); err != nil {
		missing = append(missing, "/dev/kvm does not run a standard guest here: "+err.Error())
	}
	cache := guest.DefaultCacheDir()
	kernel, ok := guest.KernelPath(cache)
	if !ok {
		missing = append(missing, "no guest kernel in "+cache+" (run `invokex guest kernel`)")
	}
	if len(missing) > 0 {
		t.Skip("skipping: " + strings.Join(missing, "; "))
	}
	agent := agentBinary(t)
	opts := drivertest.Options{
		// The first Start builds the runtime's root image.
		StartTimeout: 5 * time.Minute,
	}
	nm := drivertest.NetworkManager(t, &opts)
	drivertest.RunWith(t, opts, func(t *testing.T, stateDir string) driver.Driver {
		d, err := firecracker.New(firecracker.Options{
			StateDir:        stateDir,
			CacheDir:        cache,
			FirecrackerPath: fc,
			JailerPath:      os.Getenv(jailerEnv),
			KernelPath:      kernel,
			AgentBin:        agent,
			Logger:          hostproctest.Logger(t),
			Network:         nm,
		})
		if err != nil {
			t.Fatalf("firecracker.New: %v", err)
		}
		return d
	})
}

// probeKVM reports whether KVM runs a standard x86 guest: nil if so,
// else why not (see vmm.ProbeKVM). Without QEMU only the device is
// checked, and Firecracker's own failure will say the rest.
func probeKVM() error {
	if err := vmm.OpenKVM(); err != nil {
		return err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil
	}
	return vmm.ProbeKVM(context.Background(), qemu)
}

// agentPackage is the guest init the suite boots.
const agentPackage = "./internal/harness/driver/firecracker/testdata/agent"

func agentBinary(t testing.TB) string { return vmmtest.AgentBinary(t, agentPackage, agentEnv) }
