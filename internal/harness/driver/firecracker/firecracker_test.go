package firecracker_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/firecracker"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
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
		Unsupported: map[string]string{
			"NetworkShared": "the test configures no tap device (Options.TapName)",
		},
		// The first Start builds the runtime's root image.
		StartTimeout: 5 * time.Minute,
	}
	drivertest.RunWith(t, opts, func(t *testing.T, stateDir string) driver.Driver {
		d, err := firecracker.New(firecracker.Options{
			StateDir:        stateDir,
			CacheDir:        cache,
			FirecrackerPath: fc,
			JailerPath:      os.Getenv(jailerEnv),
			KernelPath:      kernel,
			AgentBin:        agent,
			Logger:          hostproctest.Logger(t),
		})
		if err != nil {
			t.Fatalf("firecracker.New: %v", err)
		}
		return d
	})
}

// kvmProbeTimeout bounds the probe VM.
const kvmProbeTimeout = 10 * time.Second

// probeKVM reports whether KVM runs a standard x86 guest: nil if so,
// else why not. /dev/kvm opening is not enough: nested under some
// hypervisors it creates VMs and then refuses the MSRs every guest needs.
// Like the qemu driver's probe (qemu/accel.go), it starts a paused QEMU
// microvm with -accel kvm and asks it to quit: QEMU resets the vCPUs
// before serving QMP, which is where an unusable KVM fails. Without QEMU
// only the device is checked, and Firecracker's own failure will say the
// rest.
func probeKVM() error {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/kvm: %w", err)
	}
	unix.Close(fd)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvmProbeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemu,
		"-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
		"-accel", "kvm", "-cpu", "host", "-m", "16M",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-S", "-qmp", "stdio")
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		msg, _, _ := strings.Cut(strings.TrimSpace(stderr.String()), "\n")
		if msg == "" {
			msg = "no message"
		}
		return fmt.Errorf("a kvm test vm failed (%v): %s", err, msg)
	}
	return nil
}

var agentBuild struct {
	mu   sync.Mutex
	path string
}

// agentPackage is the guest init the suite boots.
const agentPackage = "./internal/harness/driver/firecracker/testdata/agent"

// agentBinary builds agentPackage with CGO_ENABLED=0 into the test's
// temporary directory, or returns the build of an earlier test or of the
// parent process.
func agentBinary(t testing.TB) string {
	t.Helper()
	agentBuild.mu.Lock()
	defer agentBuild.mu.Unlock()
	for _, p := range []string{agentBuild.path, os.Getenv(agentEnv)} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatalf("locating the module: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "invokex-agent")
	cmd := exec.Command("go", "build", "-o", bin, agentPackage)
	cmd.Dir = strings.TrimSpace(string(out))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the agent: %v\n%s", err, out)
	}
	agentBuild.path = bin
	os.Setenv(agentEnv, bin) // inherited by the crash-helper child
	return bin
}
