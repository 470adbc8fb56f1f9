package vminit

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestParseCmdline(t *testing.T) {
	c, err := ParseCmdline("console=ttyS0 quiet root=/dev/vda ro init=/sbin/init\n")
	if err != nil {
		t.Fatal(err)
	}
	if c.CodeDevice != DefaultCodeDevice || c.ScratchDevice != DefaultScratchDevice || c.PortName != DefaultPortName ||
		c.Hostname != "" || c.ClockUnixMs != 0 || c.Debug || c.AgentCPU || c.Spare {
		t.Errorf("defaults = %+v", c)
	}
	c, err = ParseCmdline("invokex.code=/dev/vdc invokex.scratch=tmpfs invokex.port=p1 invokex.hostname=sandbox-a invokex.clock=1700000000123 invokex.agentcpu=1 invokex.spare=1 invokex.debug=1 other.x=y")
	if err != nil {
		t.Fatal(err)
	}
	want := Config{CodeDevice: "/dev/vdc", ScratchDevice: "tmpfs", PortName: "p1", Hostname: "sandbox-a", ClockUnixMs: 1700000000123, AgentCPU: true, Spare: true, Debug: true}
	if c != want {
		t.Errorf("parsed %+v, want %+v", c, want)
	}
	for _, bad := range []string{
		"invokex.code=vdb", "invokex.code=/dev/../etc/x", "invokex.scratch=/tmp/x", "invokex.port=a/b",
		"invokex.clock=soon", "invokex.hostname=" + strings.Repeat("h", 65),
	} {
		if _, err := ParseCmdline(bad); err == nil {
			t.Errorf("ParseCmdline(%q) accepted it", bad)
		}
	}
}

func TestIsVMInit(t *testing.T) {
	for _, c := range []struct {
		pid  int
		args []string
		want bool
	}{
		{1, []string{"/sbin/init"}, true},
		{1, []string{"init"}, true},
		{1, []string{"/sbin/init", "rootwait"}, true}, // unknown kernel words become arguments
		{1, []string{"/proc/self/exe", "sandbox-init"}, false},
		{1, []string{"/sbin/init", "sandbox-init"}, false},
		{1, []string{"/usr/bin/invokex", "server"}, false}, // invokex as a container's PID 1
		{42, []string{"/sbin/init"}, false},
		{1, nil, false},
	} {
		if got := isVMInit(c.pid, c.args); got != c.want {
			t.Errorf("isVMInit(%d, %q) = %v, want %v", c.pid, c.args, got, c.want)
		}
	}
	if IsVMInit() {
		t.Error("the test process claims to be a VM's init")
	}
}

// fakePorts lays out /sys/class/virtio-ports entries: device -> name.
func fakePorts(t *testing.T, ports map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for dev, name := range ports {
		os.MkdirAll(filepath.Join(dir, dev), 0o755)
		if name != "" {
			os.WriteFile(filepath.Join(dir, dev, "name"), []byte(name+"\n"), 0o644)
		}
	}
	return dir
}

func TestFindPort(t *testing.T) {
	dir := fakePorts(t, map[string]string{"vport0p0": "", "vport0p1": "other", "vport0p2": "invokex.agent"})
	dev, err := findPort(dir, "invokex.agent")
	if err != nil || dev != "vport0p2" {
		t.Errorf("findPort = %q, %v; want vport0p2", dev, err)
	}
	_, err = findPort(dir, "missing")
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "vport0p1=other") {
		t.Errorf("findPort(missing) = %v, want ErrNotExist listing the ports seen", err)
	}
}

// TestOpenPortWaitsForName checks that a port named late (the host names
// ports over the control queue, after the device appears) is still found,
// and that a port never named ends the wait with an error.
func TestOpenPortWaitsForName(t *testing.T) {
	dir := fakePorts(t, map[string]string{"vport0p1": ""})
	go func() {
		time.Sleep(50 * time.Millisecond)
		os.WriteFile(filepath.Join(dir, "vport0p1", "name"), []byte("invokex.agent\n"), 0o644)
	}()
	// The device node is /dev/vport0p1, absent here: the error must come
	// from opening it, after the name was found.
	_, err := openPort(context.Background(), dir, "invokex.agent", time.Minute)
	if err == nil || !strings.Contains(err.Error(), "opening agent port vport0p1") {
		t.Errorf("openPort = %v, want it to find vport0p1 and fail to open /dev/vport0p1", err)
	}
	_, err = openPort(context.Background(), fakePorts(t, nil), "invokex.agent", 20*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), `no virtio-serial port named "invokex.agent"`) {
		t.Errorf("openPort without the port = %v", err)
	}
}

func TestRaiseThreadsMax(t *testing.T) {
	p := filepath.Join(t.TempDir(), "threads-max")
	for _, c := range []struct{ cur, want string }{
		{"931\n", "1536"},    // a 128 MB guest's own value: raised
		{"1536\n", "1536\n"}, // at the floor: left alone
		{"7000\n", "7000\n"}, // above: never lowered
	} {
		if err := os.WriteFile(p, []byte(c.cur), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := raiseThreadsMax(p, 1536); err != nil {
			t.Fatalf("raiseThreadsMax with %q: %v", c.cur, err)
		}
		if b, _ := os.ReadFile(p); string(b) != c.want {
			t.Errorf("threads-max %q became %q, want %q", c.cur, b, c.want)
		}
	}
	if err := os.WriteFile(p, []byte("many\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := raiseThreadsMax(p, 1536); err == nil {
		t.Error("raiseThreadsMax accepted a threads-max of \"many\"")
	}
	if err := raiseThreadsMax(filepath.Join(t.TempDir(), "absent"), 1536); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("raiseThreadsMax on a missing file: %v, want ErrNotExist", err)
	}
}
