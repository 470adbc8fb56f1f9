package qemu_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/qemu"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// agentEnv hands the agent binary the parent test built to the suite's
// crash-helper child (a re-execution of this test binary), so it is built
// once per run.
const agentEnv = "INVOKEX_QEMU_TEST_AGENT"

// TestDriver runs the conformance suite against real QEMU VMs booting the
// guest kernel, with invokex (built static) as their init.
func TestDriver(t *testing.T) {
	qemuPath, cache, kernel := vmmtest.QEMUGuest(t)
	agent := agentBinary(t)
	opts := drivertest.Options{
		// Under TCG a boot takes seconds, more with several VMs on few
		// cores, and the first Start builds the runtime's root image.
		StartTimeout: 5 * time.Minute,
		FrameTimeout: 3 * time.Minute,
		// The driver keeps a spare VM (Options.SpareVMs' default).
		WarmReady: func(stateDir string) bool { _, ready := vmm.SparePIDs(stateDir); return ready > 0 },
		FromWarm: func(inst driver.Instance) bool {
			return slices.ContainsFunc(vmm.Cmdline(inst.(drivertest.HostProcess).PID()), func(a string) bool {
				return strings.HasPrefix(a, "invokex-spare-")
			})
		},
	}
	nm := drivertest.NetworkManager(t, &opts)
	drivertest.RunWith(t, opts, func(t *testing.T, stateDir string) driver.Driver {
		d, err := qemu.New(qemu.Options{
			StateDir:   stateDir,
			CacheDir:   cache,
			QEMUPath:   qemuPath,
			KernelPath: kernel,
			AgentBin:   agent,
			Logger:     hostproctest.Logger(t),
			Network:    nm,
		})
		if err != nil {
			t.Fatalf("qemu.New: %v", err)
		}
		return d
	})
}

// agentPackage is the guest init the suite boots: the agent binary the
// server runs in every sandbox (vminit.Main when the kernel starts it as
// /sbin/init).
const agentPackage = "./cmd/invokex-agent"

func agentBinary(t testing.TB) string {
	return vmmtest.AgentBinary(t, agentPackage, agentEnv, "-trimpath", "-ldflags=-s -w")
}

// BenchmarkColdStart measures what a cold invocation costs through a VM:
// Start (disks, QEMU, guest boot, agent handshake), INIT of the probe and
// its first invocation, then Stop. It reports each phase in ms/op.
func BenchmarkColdStart(b *testing.B) {
	qemuPath, cache, kernel := vmmtest.QEMUGuest(b)
	agent := agentBinary(b)
	d, err := qemu.New(qemu.Options{StateDir: b.TempDir(), CacheDir: cache, QEMUPath: qemuPath, KernelPath: kernel, AgentBin: agent})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close(context.Background())
	probe := drivertest.BuildProbe(b)
	spec := func(n int) driver.Spec {
		return driver.Spec{
			ID: fmt.Sprintf("bench-%d-%d", os.Getpid(), n), Function: "probe",
			Runtime: runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided, Bootstrap: []string{"/var/task/bootstrap"}},
			CodeDir: probe, CodeSha256: "bench-probe",
			MemoryMB: 128, EphemeralMB: 64,
		}
	}
	// Warm the image caches: the first Start builds them.
	warm(b, d, spec(-1))
	var start, initT, invoke, stop time.Duration
	var rss int64
	b.ResetTimer()
	for n := range b.N {
		sp := spec(n)
		t0 := time.Now()
		inst, err := d.Start(context.Background(), sp)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		c := protocol.NewConn(inst.Conn())
		if err := c.WriteFrame(protocol.TypeInit, benchInit(sp)); err != nil {
			b.Fatal(err)
		}
		if f, err := c.ReadFrame(); err != nil || f.Type != protocol.TypeInitDone {
			b.Fatalf("init: %v %v", f, err)
		}
		t2 := time.Now()
		inv := protocol.Invoke{RequestID: fmt.Sprint("req-", n), DeadlineUnixMs: time.Now().Add(time.Minute).UnixMilli()}
		if err := c.WriteFrame(protocol.TypeInvoke, inv, []byte(`{"action":"echo"}`)); err != nil {
			b.Fatal(err)
		}
		if f, err := c.ReadFrame(); err != nil || f.Type != protocol.TypeResult {
			b.Fatalf("invoke: %v %v", f, err)
		}
		t3 := time.Now()
		if hp, ok := inst.(drivertest.HostProcess); ok {
			rss += vmRSS(b, hp.PID())
		}
		if err := d.Stop(context.Background(), sp.ID); err != nil {
			b.Fatal(err)
		}
		start += t1.Sub(t0)
		initT += t2.Sub(t1)
		invoke += t3.Sub(t2)
		stop += time.Since(t3)
	}
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / float64(b.N) }
	b.ReportMetric(ms(start), "start-ms/op")
	b.ReportMetric(ms(initT), "init-ms/op")
	b.ReportMetric(ms(invoke), "first-invoke-ms/op")
	b.ReportMetric(ms(stop), "stop-ms/op")
	b.ReportMetric(float64(rss)/float64(b.N)/1024, "qemu-rss-MiB")
}

// vmRSS returns the resident set of pid in KiB.
func vmRSS(b *testing.B, pid int) int64 {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kb int64
			fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(v), " kB"), &kb)
			return kb
		}
	}
	b.Fatalf("no VmRSS for %d", pid)
	return 0
}

func warm(b *testing.B, d *qemu.Driver, sp driver.Spec) {
	b.Helper()
	if _, err := d.Start(context.Background(), sp); err != nil {
		b.Fatal(err)
	}
	if err := d.Stop(context.Background(), sp.ID); err != nil {
		b.Fatal(err)
	}
}

func benchInit(sp driver.Spec) protocol.Init {
	return protocol.Init{
		FunctionName: sp.Function, FunctionVersion: "$LATEST", MemoryMB: sp.MemoryMB, TimeoutSec: 30,
		Command: []string{"/var/task/bootstrap"},
		Env:     []string{"AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001", "LAMBDA_TASK_ROOT=/var/task", "_HANDLER=bootstrap"},
		Dir:     "/var/task", UID: 993, GID: 993,
	}
}
