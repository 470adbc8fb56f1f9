package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
)

func TestStartConnStop(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-1")
	// The bytes right after the ready line belong to the protocol: none
	// may be lost to the handshakes.
	buf := make([]byte, 5)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "HELLO" {
		t.Fatalf("first bytes after the handshake = %q, %v; want HELLO", buf, err)
	}
	if _, err := inst.Conn().Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, 4)
	if _, err := io.ReadFull(inst.Conn(), buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	rec, err := hostproc.ReadRecord[record](inst.dir)
	if err != nil {
		t.Fatal(err)
	}
	if rec.PID != inst.PID() || rec.StartTime == 0 || rec.Firecracker != e.fc || rec.Jailer != "" || rec.Root != inst.dir {
		t.Errorf("record %+v does not describe firecracker %d", rec, inst.PID())
	}
	if fi, err := os.Stat(filepath.Join(inst.dir, scratchImage)); err != nil || fi.Size() != 16<<20 {
		t.Errorf("scratch image: %v, %v", fi, err)
	}
	if !isOurVMM(inst.PID(), e.fc, "", "ok-1") || isOurVMM(inst.PID(), e.fc, "", "ok-2") || isOurVMM(inst.PID(), "/usr/bin/firecracker", "", "ok-1") {
		t.Errorf("isOurVMM(%d) does not tell its instance", inst.PID())
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(inst.console.LastLines(), "fake console: booted ok-1") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := inst.console.LastLines(); !strings.Contains(got, "booted ok-1") {
		t.Errorf("console = %q", got)
	}
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-1"); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case <-inst.Done():
	default:
		t.Errorf("Done not closed after Stop")
	}
	assertGone(t, e, "ok-1", pid)
	if _, err := inst.Conn().Read(buf); err == nil {
		t.Errorf("Conn still readable after Stop")
	}
	if err := e.d.Stop(context.Background(), "ok-1"); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

// TestAPIRequests checks what the driver asks of Firecracker, in order,
// against the documented API (the stand-in refuses anything the schema
// does not allow, so a started VM already means well-formed requests).
func TestAPIRequests(t *testing.T) {
	e := newFakeEnv(t)
	sp := e.spec("ok-api")
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
	want := []string{"/machine-config", "/boot-source", "/drives/root", "/drives/code", "/drives/scratch", "/vsock", "/entropy", "/actions"}
	if strings.Join(paths, " ") != strings.Join(want, " ") {
		t.Fatalf("requests %v, want %v", paths, want)
	}
	wantVCPUs := float64(vcpusFor(2048, e.d.hostCPUs))
	if m := bodies["/machine-config"]; m["vcpu_count"] != wantVCPUs || m["mem_size_mib"] != 2048.0 {
		t.Errorf("machine config %v, want %v vcpus and 2048 MiB", m, wantVCPUs)
	}
	boot := bodies["/boot-source"]
	if boot["kernel_image_path"] != e.kernel {
		t.Errorf("kernel %v, want %s", boot["kernel_image_path"], e.kernel)
	}
	args, _ := boot["boot_args"].(string)
	for _, w := range []string{"console=ttyS0", "reboot=k", "panic=-1", "pci=off", "root=/dev/vda", " ro ", "init=/sbin/init",
		"invokex.code=/dev/vdb", "invokex.scratch=/dev/vdc", "invokex.vsock=1024", "invokex.hostname=sandbox-ok-api", "invokex.clock="} {
		if !strings.Contains(args, w) {
			t.Errorf("boot args %q lack %q", args, w)
		}
	}
	for id, w := range map[string][2]bool{"root": {true, true}, "code": {false, true}, "scratch": {false, false}} {
		b := bodies["/drives/"+id]
		if b["drive_id"] != id || b["is_root_device"] != w[0] || b["is_read_only"] != w[1] {
			t.Errorf("drive %s = %v, want root %v read-only %v", id, b, w[0], w[1])
		}
	}
	if p := bodies["/drives/scratch"]["path_on_host"]; p != filepath.Join(inst.dir, scratchImage) {
		t.Errorf("scratch drive at %v", p)
	}
	if v := bodies["/vsock"]; v["guest_cid"] != 3.0 || v["uds_path"] != vsockSock {
		t.Errorf("vsock %v, want guest_cid 3 and %s", v, vsockSock)
	}
	if a := bodies["/actions"]; a["action_type"] != "InstanceStart" {
		t.Errorf("action %v", a)
	}
}

func TestNetworkInterface(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) {
		o.TapName = "fc{slot}"
		o.GuestIP = "172.16.{slot}.2::172.16.{slot}.1:255.255.255.0::eth0:off"
	})
	isolated := startFake(t, e, "ok-isolated")
	sp := e.spec("ok-net")
	sp.Network = true
	inst := startSpec(t, e, sp)
	for _, r := range requests(t, isolated) {
		if strings.HasPrefix(r.Path, "/network-interfaces/") {
			t.Errorf("a VM without Spec.Network got %s", r.Path)
		}
	}
	var nic, boot map[string]any
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
	if nic == nil || nic["host_dev_name"] != "fc1" || nic["iface_id"] != "eth0" || nic["guest_mac"] != "06:00:00:00:00:01" {
		t.Errorf("network interface %v, want eth0 on tap fc1 (slot 1)", nic)
	}
	if args, _ := boot["boot_args"].(string); !strings.Contains(args, " ip=172.16.1.2::172.16.1.1:255.255.255.0::eth0:off") {
		t.Errorf("boot args %q lack the guest's ip=", args)
	}
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
	if st := inst.cmd.ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
		t.Errorf("firecracker ended with %v, want a clean exit", st)
	}
	assertGone(t, e, "ok-graceful", pid)
}

func TestStopForcesStubbornVM(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = 200 * time.Millisecond })
	inst := startFake(t, e, "stubborn-1")
	pid := inst.PID()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // cleanup must complete even with a cancelled context
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := e.d.Stop(ctx, "stubborn-1"); err != nil {
				t.Errorf("Stop: %v", err)
			}
		}()
	}
	wg.Wait()
	assertGone(t, e, "stubborn-1", pid)
}

// TestStopAsksThenTerminates: a guest that ignores its stream closing
// gets Ctrl-Alt-Del through the API, then Firecracker SIGTERM, within the
// grace, before any SIGKILL.
func TestStopAsksThenTerminates(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.StopGrace = time.Minute })
	inst := startFake(t, e, "ok-cad")
	// Stop the stream's end from ending the "guest": the stand-in then
	// exits only on Ctrl-Alt-Del or SIGTERM.
	conn := inst.conn
	defer conn.Close()
	inst.conn = nil
	if err := e.d.Stop(context.Background(), "ok-cad"); err != nil {
		t.Fatal(err)
	}
	if st := inst.cmd.ProcessState; st == nil || !st.Exited() || st.ExitCode() != 0 {
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
	if st := inst.cmd.ProcessState; st == nil || !st.Exited() || st.ExitCode() != fakeTermExit {
		t.Errorf("firecracker ended with %v, want its exit on SIGTERM (%d)", st, fakeTermExit)
	}
	assertGone(t, e, "nocad-1", inst.PID())
}

func TestStartFailures(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.ReadyTimeout = time.Second })
	for id, want := range map[string]string{
		"exit-1":     "fake failure for exit-1",
		"apifail-1":  "firecracker PUT /drives/code: 400 Bad Request: Unable to create the block device: fake failure of code",
		"garbage-1":  "instead of its ready line",
		"nolisten-1": "vm not ready within 1s",
	} {
		inst, err := e.d.Start(context.Background(), e.spec(id))
		if err == nil {
			t.Errorf("Start(%s) succeeded", id)
			continue
		}
		if inst != nil {
			t.Errorf("Start(%s) returned an instance with its error", id)
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Start(%s): %v; want it to say %q", id, err, want)
		}
		assertGone(t, e, id, 0)
	}
	_, err := e.d.Start(context.Background(), e.spec("apifail-2"))
	var ae *APIError
	if !errors.As(err, &ae) || ae.StatusCode != 400 || !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("refused configuration: %v, want an *APIError 400 wrapping ErrInvalidParameter", err)
	}
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

func TestStartCancelledDuringImages(t *testing.T) {
	e := newFakeEnv(t)
	e.images.block = true
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := e.d.Start(ctx, e.spec("ok-cancel")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start = %v, want DeadlineExceeded", err)
	}
	assertGone(t, e, "ok-cancel", 0)
	done := make(chan error, 1)
	go func() {
		_, err := e.d.Start(context.Background(), e.spec("ok-stopped"))
		done <- err
	}()
	for e.images.roots.Load() < 2 {
		time.Sleep(time.Millisecond)
	}
	if err := e.d.Stop(context.Background(), "ok-stopped"); err != nil {
		t.Fatalf("Stop during Start: %v", err)
	}
	if err := <-done; err == nil {
		t.Fatalf("Start succeeded although stopped")
	}
	assertGone(t, e, "ok-stopped", 0)
}

func TestInvalidSpecs(t *testing.T) {
	e := newFakeEnv(t)
	for name, mutate := range map[string]func(*driver.Spec){
		"bad id":        func(s *driver.Spec) { s.ID = "A_B" },
		"small memory":  func(s *driver.Spec) { s.MemoryMB = 64 },
		"no ephemeral":  func(s *driver.Spec) { s.EphemeralMB = 0 },
		"relative code": func(s *driver.Spec) { s.CodeDir = "code" },
	} {
		sp := e.spec("ok-inv")
		mutate(&sp)
		if _, err := e.d.Start(context.Background(), sp); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: %v, want ErrInvalidParameter", name, err)
		}
	}
	startFake(t, e, "ok-dup")
	if _, err := e.d.Start(context.Background(), e.spec("ok-dup")); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("duplicate ID: %v, want ErrAlreadyExists", err)
	}
}

func TestCloseStopsAll(t *testing.T) {
	e := newFakeEnv(t)
	a, b := startFake(t, e, "ok-a"), startFake(t, e, "stubborn-b")
	if err := e.d.Close(context.Background()); err != nil {
		t.Fatalf("Close: %v", err)
	}
	assertGone(t, e, "ok-a", a.PID())
	assertGone(t, e, "stubborn-b", b.PID())
	if _, err := e.d.Start(context.Background(), e.spec("ok-c")); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("Start after Close: %v, want ErrUnavailable", err)
	}
	if err := e.d.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestVMExitClosesDone(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "die-1")
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Done not closed after firecracker exited")
	}
	if err := e.d.Stop(context.Background(), "die-1"); err != nil {
		t.Fatal(err)
	}
	assertGone(t, e, "die-1", 0)
}

// TestRecover: a second driver on the same state directory (a restarted
// harness) kills the first one's VMs, found by their record or, when the
// record has no pid yet, by Firecracker's command line; it removes every
// instance directory, and it never kills a process that is not that
// instance's Firecracker even if a record names it.
func TestRecover(t *testing.T) {
	e := newFakeEnv(t)
	byRecord := startFake(t, e, "ok-rec")
	byName := startFake(t, e, "ok-noid")
	rec, err := hostproc.ReadRecord[record](byName.dir)
	if err != nil {
		t.Fatal(err)
	}
	rec.PID, rec.StartTime = 0, 0
	if err := hostproc.WriteRecord(byName.dir, rec); err != nil {
		t.Fatal(err)
	}
	sleeper := startSleeper(t)
	sp, err := hostproc.Lookup(sleeper.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	strangerDir := filepath.Join(e.stateDir, "stranger")
	os.Mkdir(strangerDir, 0o700)
	hostproc.WriteRecord(strangerDir, &record{ID: "stranger", Firecracker: e.fc, PID: sp.PID, StartTime: sp.StartTime})
	os.Mkdir(filepath.Join(e.stateDir, "bare"), 0o700)

	d2, err := newDriver(Options{StateDir: e.stateDir, FirecrackerPath: e.fc, KernelPath: e.kernel, Logger: hostproctest.Logger(t)}, e.images)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close(context.Background())
	insts, err := d2.Recover(context.Background())
	if err != nil || len(insts) != 0 {
		t.Fatalf("Recover = %v, %v; want no instances and no error", insts, err)
	}
	for _, inst := range []*instance{byRecord, byName} {
		select {
		case <-inst.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("%s survived Recover", inst.id)
		}
		assertGone(t, e, inst.id, inst.PID())
	}
	for _, id := range []string{"stranger", "bare"} {
		assertGone(t, e, id, 0)
	}
	if !pidAlive(sleeper.Process.Pid) {
		t.Errorf("Recover killed a process that was not Firecracker")
	}
	if err := e.d.Stop(context.Background(), "ok-rec"); err != nil {
		t.Errorf("Stop after Recover: %v", err)
	}
}

func TestRecoverSkipsOwnInstances(t *testing.T) {
	e := newFakeEnv(t)
	inst := startFake(t, e, "ok-own")
	if _, err := e.d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inst.Done():
		t.Fatalf("Recover killed its own driver's instance")
	default:
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: "/nonexistent/firecracker", KernelPath: "/etc/hostname"}, nil); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Errorf("missing firecracker: %v", err)
	}
	fc := fakeBinary(t, fakeFCName)
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: fc, KernelPath: "/nonexistent/vmlinux"}, nil); err == nil || !strings.Contains(err.Error(), "invokex guest kernel") {
		t.Errorf("missing kernel: %v", err)
	}
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: fc, KernelPath: "/etc/hostname", NetNS: "/var/run/netns/x"}, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("NetNS without jailer: %v", err)
	}
	vmm := fakeBinary(t, "vmm")
	if _, err := newDriver(Options{StateDir: t.TempDir(), FirecrackerPath: vmm, JailerPath: fakeBinary(t, fakeJailerName), KernelPath: "/etc/hostname"}, nil); !errors.Is(err, errdefs.ErrInvalidParameter) {
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
