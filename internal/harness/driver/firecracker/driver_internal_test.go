package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
)

// TestFake runs what every VM driver must do against the stand-in
// Firecracker.
func TestFake(t *testing.T) {
	vmmtest.RunFakeSuite(t, func(t *testing.T, tu vmmtest.Tuning) *vmmtest.Env {
		return newFakeEnv(t, func(o *Options) { o.StopGrace, o.ReadyTimeout = tu.StopGrace, tu.ReadyTimeout }).Env
	})
}

// TestRecordAndDisks checks what the driver keeps of a running VM: its
// record names Firecracker and its root, its scratch disk is sized by
// EphemeralMB, and isOurVMM tells its Firecracker from others.
func TestRecordAndDisks(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-1")
	rec, err := hostproc.ReadRecord[record](inst.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if rec.PID != inst.PID() || rec.StartTime == 0 || rec.Firecracker != e.fc || rec.Jailer != "" || rec.Root != inst.Dir() || rec.UID != 0 {
		t.Errorf("record %+v does not describe firecracker %d", rec, inst.PID())
	}
	if fi, err := os.Stat(filepath.Join(inst.Dir(), scratchImage)); err != nil || fi.Size() != 16<<20 {
		t.Errorf("scratch image: %v, %v", fi, err)
	}
	if !isOurVMM(inst.PID(), e.fc, "", "ok-1") || isOurVMM(inst.PID(), e.fc, "", "ok-2") || isOurVMM(inst.PID(), "/usr/bin/firecracker", "", "ok-1") {
		t.Errorf("isOurVMM(%d) does not tell its instance", inst.PID())
	}
}

// TestAPIRequests checks what the driver asks of Firecracker, in order,
// against the documented API (the stand-in refuses anything the schema
// does not allow, so a started VM already means well-formed requests).
func TestAPIRequests(t *testing.T) {
	e := newFakeEnv(t)
	sp := e.Spec("ok-api")
	sp.MemoryMB = 2048 // two vCPUs by Lambda's rule, if the host has them
	inst := startSpec(t, e, sp)
	reqs := requests(t, inst)
	var paths []string
	bodies := map[string]map[string]any{}
	for _, r := range reqs {
		if r.Method != "PUT" || r.ContentType != "application/json" {
			t.Errorf("%s %s with Content-Type %q, want PUT with application/json", r.Method, r.Path, r.ContentType)
		}
		paths = append(paths, r.Path)
		var b map[string]any
		if err := json.Unmarshal(r.Body, &b); err != nil {
			t.Fatalf("%s: body %s: %v", r.Path, r.Body, err)
		}
		bodies[r.Path] = b
	}
	want := []string{"/logger", "/metrics", "/machine-config", "/boot-source", "/drives/root", "/drives/code", "/drives/scratch", "/vsock", "/entropy", "/actions"}
	if strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Fatalf("requests %v, want %v", paths, want)
	}
	wantVCPUs := float64(e.d.host.VCPUs(2048))
	if m := bodies["/machine-config"]; m["vcpu_count"] != wantVCPUs || m["mem_size_mib"] != 2048.0 {
		t.Errorf("machine config %v, want %v vcpus and 2048 MiB", m, wantVCPUs)
	}
	boot := bodies["/boot-source"]
	if boot["kernel_image_path"] != kernelFile {
		t.Errorf("kernel %v, want %s", boot["kernel_image_path"], kernelFile)
	}
	args, _ := boot["boot_args"].(string)
	for _, w := range []string{"console=ttyS0", "reboot=k", "panic=-1", "pci=off", "root=/dev/vda", " ro ", "init=/sbin/init",
		"invokex.code=/dev/vdb", "invokex.scratch=/dev/vdc", "invokex.vsock=1024", "invokex.hostname=sandbox-ok-api", "invokex.clock="} {
		if !strings.Contains(args, w) {
			t.Errorf("boot args %q lack %q", args, w)
		}
	}
	if got, want := strings.Contains(args, "invokex.agentcpu=1"), e.d.host.AgentCPU(); got != want {
		t.Errorf("boot args %q: invokex.agentcpu=1 present %v, want %v (a vCPU for the agent)", args, got, want)
	}
	for id, w := range map[string][2]bool{"root": {true, true}, "code": {false, true}, "scratch": {false, false}} {
		b := bodies["/drives/"+id]
		if b["drive_id"] != id || b["is_root_device"] != w[0] || b["is_read_only"] != w[1] {
			t.Errorf("drive %s = %v, want root %v read-only %v", id, b, w[0], w[1])
		}
	}
	// Every path is relative to Firecracker's working directory, the
	// instance directory, where the images are links to the cache's: a
	// snapshot records these paths, and a restore resolves them in its own
	// instance directory.
	rt := sp.Runtime
	rootSrc, _ := e.Images.Root(context.Background(), &rt)
	for id, w := range map[string]string{"root": rootImage, "code": codeImage, "scratch": scratchImage} {
		if p := bodies["/drives/"+id]["path_on_host"]; p != w {
			t.Errorf("drive %s at %v, want %s", id, p, w)
		}
	}
	for name, target := range map[string]string{kernelFile: e.Kernel, rootImage: rootSrc} {
		if got, err := os.Readlink(filepath.Join(inst.Dir(), name)); err != nil || got != target {
			t.Errorf("%s in the instance directory links to %q (%v), want %s", name, got, err, target)
		}
	}
	if fi, err := os.Lstat(filepath.Join(inst.Dir(), scratchImage)); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("scratch image is not the instance's own file: %v", err)
	}
	if v := bodies["/vsock"]; v["guest_cid"] != 3.0 || v["uds_path"] != vsockSock {
		t.Errorf("vsock %v, want guest_cid 3 and %s", v, vsockSock)
	}
	if a := bodies["/actions"]; a["action_type"] != "InstanceStart" {
		t.Errorf("action %v", a)
	}
	// The logger and metrics write to named pipes in the instance
	// directory (the stand-in refuses anything else).
	if l := bodies["/logger"]; l["log_path"] != logFIFO || l["level"] != "Warning" || l["show_level"] != true {
		t.Errorf("logger %v, want %s at Warning with levels shown", l, logFIFO)
	}
	if m := bodies["/metrics"]; m["metrics_path"] != metricsFIFO {
		t.Errorf("metrics %v, want %s", m, metricsFIFO)
	}
}

func TestNetworkInterface(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) {
		o.TapName = "fc{slot}"
		o.GuestIP = "172.16.{slot}.2::172.16.{slot}.1:255.255.255.0::eth0:off"
	})
	isolated := startFake(t, e, "ok-isolated")
	sp := e.Spec("ok-net")
	sp.Network = true
	inst := startSpec(t, e, sp)
	for _, r := range requests(t, isolated) {
		if strings.HasPrefix(r.Path, "/network-interfaces/") {
			t.Errorf("a VM without Spec.Network got %s", r.Path)
		}
	}
	nic, boot := nicAndBoot(t, inst)
	if nic == nil || nic["host_dev_name"] != "fc1" || nic["iface_id"] != "eth0" || nic["guest_mac"] != "06:00:00:00:00:01" {
		t.Errorf("network interface %v, want eth0 on tap fc1 (slot 1)", nic)
	}
	if args, _ := boot["boot_args"].(string); !strings.Contains(args, " ip=172.16.1.2::172.16.1.1:255.255.255.0::eth0:off") {
		t.Errorf("boot args %q lack the guest's ip=", args)
	}
}

// nicAndBoot are the bodies inst's Firecracker was sent for eth0 and the
// boot source (nil if not sent).
func nicAndBoot(t *testing.T, inst *instance) (nic, boot map[string]any) {
	t.Helper()
	for _, r := range requests(t, inst) {
		var b map[string]any
		json.Unmarshal(r.Body, &b)
		switch r.Path {
		case "/network-interfaces/eth0":
			nic = b
		case "/boot-source":
			boot = b
		}
	}
	return nic, boot
}

func TestStopGraceful(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = time.Minute })
	inst := startFake(t, e, "ok-graceful")
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-graceful"); err != nil {
		t.Fatal(err)
	}
	// Closing the stream ended the "guest", which ended Firecracker
	// before the (long) grace ran out: it was not killed.
	if st := inst.Cmd().ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
		t.Errorf("firecracker ended with %v, want a clean exit", st)
	}
	assertGone(t, e, "ok-graceful", pid)
}

// TestStopAsksThenTerminates: a guest that ignores its stream closing
// gets Ctrl-Alt-Del through the API, then Firecracker SIGTERM, within the
// grace, before any SIGKILL.
func TestStopAsksThenTerminates(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = time.Minute })
	// The stand-in then exits only on Ctrl-Alt-Del or SIGTERM.
	inst := startFake(t, e, "cad-1")
	if err := e.d.Stop(context.Background(), "cad-1"); err != nil {
		t.Fatal(err)
	}
	if st := inst.Cmd().ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
		t.Errorf("firecracker ended with %v, want its own exit after Ctrl-Alt-Del", st)
	}
}

// TestStopTerminates: a VM that ignores both its stream's end and
// Ctrl-Alt-Del gets SIGTERM after half the grace, before any SIGKILL.
func TestStopTerminates(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = time.Second })
	inst := startFake(t, e, "nocad-1")
	if err := e.d.Stop(context.Background(), "nocad-1"); err != nil {
		t.Fatal(err)
	}
	if st := inst.Cmd().ProcessState; st == nil || !st.Exited() || st.ExitCode() != fakeTermExit {
		t.Errorf("firecracker ended with %v, want its exit on SIGTERM (%d)", st, fakeTermExit)
	}
	assertGone(t, e, "nocad-1", inst.PID())
}

// TestAPIError: a configuration Firecracker refuses fails Start with its
// API error, which wraps the errdefs kind of its status.
func TestAPIError(t *testing.T) {
	e := newFakeEnv(t)
	_, err := e.d.Start(context.Background(), e.Spec("apifail-2"))
	var ae *APIError
	if !errors.As(err, &ae) || ae.StatusCode != 400 || !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("refused configuration: %v, want an *APIError 400 wrapping ErrInvalidParameter", err)
	}
	assertGone(t, e, "apifail-2", 0)
}

// TestSlowGuest: CONNECTs closed while the guest does not listen yet are
// retried until it does.
func TestSlowGuest(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "slowlisten-1")
	buf := make([]byte, 5)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "HELLO" {
		t.Fatalf("first bytes = %q, %v", buf, err)
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: "/nonexistent/firecracker", KernelPath: "/etc/hostname"}, nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("missing firecracker: %v", err)
	}
	fc := vmmtest.FakeBinary(t, fakeFCName)
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: fc, KernelPath: "/nonexistent/vmlinux"}, nil); err == nil || !strings.Contains(err.Error(), "invokex guest kernel") {
		t.Errorf("missing kernel: %v", err)
	}
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: fc, KernelPath: "/etc/hostname", NetNS: "/var/run/netns/x"}, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("NetNS without jailer: %v", err)
	}
	vmm := vmmtest.FakeBinary(t, "vmm")
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: vmm, JailerPath: vmmtest.FakeBinary(t, fakeJailerName), KernelPath: "/etc/hostname"}, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("jailer with a binary not named firecracker: %v", err)
	}
	if _, err := New(Options{StateDir: t.TempDir(), CacheDir: t.TempDir(), FirecrackerPath: fc}); err == nil || !strings.Contains(err.Error(), "no guest kernel") {
		t.Errorf("New without a kernel in the cache: %v", err)
	}
}

func TestDescribe(t *testing.T) {
	e := newFakeEnv(t)
	got := strings.Join(e.d.Describe(), "\n")
	for _, want := range []string{"no jailer", "no guest network"} {
		if !strings.Contains(got, want) {
			t.Errorf("Describe() = %q, lacks %q", got, want)
		}
	}
	if e.d.Name() != "firecracker" {
		t.Errorf("Name() = %q", e.d.Name())
	}
}

// logCapture is a debug-level logger whose records a test can read.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *logCapture) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *logCapture) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// TestLoggerAndMetrics: Firecracker's logger and metrics reach the
// harness's log through the pipes the driver drains: its warnings at
// warn, its metrics summed up when the VM ends (the last record is
// written as Firecracker exits), seccomp faults as a warning; the pipes
// go with the instance directory.
func TestLoggerAndMetrics(t *testing.T) {
	var logs logCapture
	e := newFakeEnv(t, func(o *Options) {
		o.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	inst := startFake(t, e, "observe-1")
	for _, name := range []string{logFIFO, metricsFIFO} {
		if fi, err := os.Stat(filepath.Join(inst.Dir(), name)); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
			t.Errorf("%s is not a named pipe in the instance directory: %v", name, err)
		}
	}
	if err := e.d.Stop(context.Background(), inst.ID()); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	assertGone(t, e, inst.ID(), inst.PID())
	out := logs.String()
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`level=WARN msg="vm output".*source=firecracker.*line="\[observe-1:main:WARN\] fake warning for observe-1"`),
		regexp.MustCompile(`level=WARN msg="firecracker reports seccomp faults".*instance=observe-1.* count=1`),
		regexp.MustCompile(`level=DEBUG msg="firecracker metrics".*instance=observe-1.* flushes=1 .*block_read_bytes=100 `),
	} {
		if !want.MatchString(out) {
			t.Errorf("the log has no line matching %s:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "firecracker reports seccomp faults"); n != 1 {
		t.Errorf("seccomp faults reported %d times, want once", n)
	}
	// The driver's Prometheus metrics sum the VMs' records.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e.d.Collector())
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.Metric {
			key := f.GetName()
			for _, l := range m.Label {
				key += "," + l.GetValue()
			}
			got[key] = m.Counter.GetValue()
		}
	}
	for key, want := range map[string]float64{
		"invokex_firecracker_metrics_records_total":         1,
		"invokex_firecracker_device_bytes_total,block,read": 100,
		"invokex_firecracker_alarms_total,seccomp_faults":   1,
		"invokex_firecracker_alarms_total,sigsegv":          0,
		"invokex_firecracker_missed_total,log_lines":        0,
		"invokex_firecracker_device_bytes_total,vsock,rx":   0,
	} {
		if v, ok := got[key]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", key, v, ok, want)
		}
	}
}

// TestMetricsSum: counters are the change since Firecracker's last flush
// and add up; alarms are warned of once; an unreadable record is skipped.
func TestMetricsSum(t *testing.T) {
	var logs logCapture
	o := &observer{log: slog.New(slog.NewTextHandler(&logs, nil))}
	o.readMetrics(strings.NewReader(
		`{"utc_timestamp_ms":1,"block":{"read_bytes":10,"write_bytes":1},"vsock":{"rx_bytes_count":5},"signals":{"sigsegv":0}}` + "\n" +
			"not json\n" +
			`{"utc_timestamp_ms":2,"block":{"read_bytes":20},"vcpu":{"failures":2},"signals":{"sigsegv":1},"logger":{"missed_log_count":3}}` + "\n" +
			`{"utc_timestamp_ms":3,"signals":{"sigsegv":1}}` + "\n"))
	got := o.totals
	got.warned = nil
	want := fcMetrics{Flushes: 3, BlockReadBytes: 30, BlockWriteBytes: 1, VsockRxBytes: 5, VCPUFailures: 2, MissedLogs: 3}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("totals %+v, want %+v", got, want)
	}
	out := logs.String()
	if strings.Count(out, "firecracker reports sigsegv") != 1 || strings.Count(out, "unreadable firecracker metrics") != 1 {
		t.Errorf("want one sigsegv warning and one unreadable-record warning:\n%s", out)
	}
}
