package qemu_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/qemu"
)

// agentEnv hands the agent binary the parent test built to the suite's
// crash-helper child (a re-execution of this test binary), so it is built
// once per run.
const agentEnv = "INVOKEX_QEMU_TEST_AGENT"

// TestDriver runs the conformance suite against real QEMU VMs booting the
// guest kernel, with invokex (built static) as their init.
func TestDriver(t *testing.T) {
	qemuPath, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("skipping: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
	}
	cache := guest.DefaultCacheDir()
	kernel, ok := guest.KernelPath(cache)
	if !ok {
		if os.Getenv("INVOKEX_BUILD_KERNEL") != "1" {
			t.Skipf("skipping: no guest kernel in %s: run `invokex guest kernel` or set INVOKEX_BUILD_KERNEL=1", cache)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
		kernel, err = guest.EnsureKernel(ctx, cache, qemu.NewTestLogger(t))
		cancel()
		if err != nil {
			t.Fatalf("building the guest kernel: %v", err)
		}
	}
	agent := agentBinary(t)
	opts := drivertest.Options{
		Unsupported: map[string]string{
			"NetworkShared": "the qemu driver attaches no guest network yet (loopback only)",
		},
		// Under TCG a boot takes seconds, more with several VMs on few
		// cores, and the first Start builds the runtime's root image.
		StartTimeout: 5 * time.Minute,
		FrameTimeout: 3 * time.Minute,
	}
	drivertest.RunWith(t, opts, func(t *testing.T, stateDir string) driver.Driver {
		d, err := qemu.New(qemu.Options{
			StateDir:   stateDir,
			CacheDir:   cache,
			QEMUPath:   qemuPath,
			KernelPath: kernel,
			AgentBin:   agent,
			Logger:     qemu.NewTestLogger(t),
		})
		if err != nil {
			t.Fatalf("qemu.New: %v", err)
		}
		return d
	})
}

var agentBuild struct {
	once sync.Once
	path string
	err  error
}

// agentPackage is the guest init the suite boots. It runs vminit.Main, as
// the invokex binary does when the kernel starts it as /sbin/init.
const agentPackage = "./internal/harness/driver/qemu/testdata/agent"

// agentBinary builds agentPackage with CGO_ENABLED=0 into the test's
// temporary directory, once, or takes the parent's build.
func agentBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv(agentEnv); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	dir := t.TempDir()
	agentBuild.once.Do(func() {
		out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
		if err != nil {
			agentBuild.err = err
			return
		}
		bin := filepath.Join(dir, "invokex")
		cmd := exec.Command("go", "build", "-o", bin, agentPackage)
		cmd.Dir = strings.TrimSpace(string(out))
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			agentBuild.err = err
			t.Logf("go build: %s", out)
			return
		}
		agentBuild.path = bin
		os.Setenv(agentEnv, bin) // inherited by the crash-helper child
	})
	if agentBuild.err != nil {
		t.Fatalf("building the agent: %v", agentBuild.err)
	}
	return agentBuild.path
}
