package firecracker

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
)

func TestKernelCmdline(t *testing.T) {
	got := bootConfig{ID: "a-1", ClockUnixMs: 1700000000123, IP: "10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"}.kernelCmdline()
	want := "console=ttyS0 quiet reboot=k panic=-1 pci=off root=/dev/vda rootfstype=ext4 ro init=/sbin/init " +
		"invokex.code=/dev/vdb invokex.scratch=/dev/vdc invokex.vsock=1024 invokex.hostname=sandbox-a-1 " +
		"invokex.clock=1700000000123 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"
	if got != want {
		t.Errorf("cmdline\n got %q\nwant %q", got, want)
	}
	if got := (bootConfig{ID: "b"}).kernelCmdline(); strings.Contains(got, "clock=") || strings.Contains(got, "ip=") {
		t.Errorf("cmdline without clock and ip: %q", got)
	}
}

func TestJailerArgs(t *testing.T) {
	j := jail{
		Jailer: "/usr/bin/jailer", Firecracker: "/usr/bin/firecracker", ID: "vm-1",
		UID: 1073741824, GID: 1073741824, ChrootBase: "/var/lib/invokex/fc/vm-1/jail",
		Cgroups: cgroupSetup{Version: 2, MemoryRoot: "/sys/fs/cgroup", PidsRoot: "/sys/fs/cgroup"},
		Parent:  "invokex-firecracker", MemoryMB: 128, NetNS: "/var/run/netns/invokex",
	}
	want := "--id vm-1 --exec-file /usr/bin/firecracker --uid 1073741824 --gid 1073741824 " +
		"--chroot-base-dir /var/lib/invokex/fc/vm-1/jail --cgroup-version 2 --parent-cgroup invokex-firecracker " +
		"--cgroup memory.max=201326592 --cgroup pids.max=64 --netns /var/run/netns/invokex -- --api-sock /firecracker.sock"
	if got := strings.Join(j.args(), " "); got != want {
		t.Errorf("jailer args\n got %q\nwant %q", got, want)
	}
	if got, want := j.chroot(), "/var/lib/invokex/fc/vm-1/jail/firecracker/vm-1/root"; got != want {
		t.Errorf("chroot %q, want %q", got, want)
	}
	if got := j.Cgroups.dirs(j.Parent, j.ID); len(got) != 1 || got[0] != "/sys/fs/cgroup/invokex-firecracker/vm-1" {
		t.Errorf("v2 cgroup dirs %v", got)
	}
	j.Cgroups = cgroupSetup{Version: 1, MemoryRoot: "/sys/fs/cgroup/memory", PidsRoot: "/sys/fs/cgroup/pids"}
	j.NetNS = ""
	if got := strings.Join(j.args(), " "); !strings.Contains(got, "--cgroup-version 1 --parent-cgroup invokex-firecracker --cgroup memory.limit_in_bytes=201326592 --cgroup pids.max=64 -- ") {
		t.Errorf("v1 jailer args %q", got)
	}
	if got := j.Cgroups.dirs(j.Parent, j.ID); len(got) != 2 || got[0] != "/sys/fs/cgroup/memory/invokex-firecracker/vm-1" || got[1] != "/sys/fs/cgroup/pids/invokex-firecracker/vm-1" {
		t.Errorf("v1 cgroup dirs %v", got)
	}
	j.Cgroups = cgroupSetup{}
	if got := strings.Join(j.args(), " "); strings.Contains(got, "cgroup") || strings.Contains(got, "netns") {
		t.Errorf("jailer args without cgroups or netns: %q", got)
	}
}

func TestDetectCgroups(t *testing.T) {
	dir := t.TempDir()
	unified := filepath.Join(dir, "unified")
	os.Mkdir(unified, 0o755)
	mounts := filepath.Join(dir, "mounts")
	write := func(controllers, content string) {
		os.WriteFile(filepath.Join(unified, "cgroup.controllers"), []byte(controllers), 0o644)
		os.WriteFile(mounts, []byte(content), 0o644)
	}
	v1 := "cgroup " + dir + "/memory cgroup rw,nosuid,relatime,memory 0 0\n" +
		"cgroup " + dir + "/pids cgroup rw,relatime,pids 0 0\n" +
		"cgroup " + dir + "/cpu cgroup rw,relatime,cpu,cpuacct 0 0\n"
	v2 := "cgroup2 " + unified + " cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
	write("cpu memory pids\n", "proc /proc proc rw 0 0\n"+v2)
	if c := detectCgroups(mounts); c.Version != 2 || c.MemoryRoot != unified || c.PidsRoot != unified {
		t.Errorf("v2 with memory and pids: %+v", c)
	}
	// A hybrid host whose v2 hierarchy has no memory controller uses v1.
	write("hugetlb\n", v1+v2)
	if c := detectCgroups(mounts); c.Version != 1 || c.MemoryRoot != dir+"/memory" || c.PidsRoot != dir+"/pids" {
		t.Errorf("hybrid: %+v", c)
	}
	write("hugetlb\n", v2)
	if c := detectCgroups(mounts); c.Version != 0 || c.why == "" {
		t.Errorf("no usable hierarchy: %+v", c)
	}
	if c := detectCgroups(filepath.Join(dir, "absent")); c.Version != 0 || !strings.Contains(c.why, "absent") {
		t.Errorf("unreadable mounts: %+v", c)
	}
}

func TestLinkOrCopy(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	os.WriteFile(src, []byte("image"), 0o644)
	dst := filepath.Join(dir, "dst")
	copied, err := linkOrCopy(src, dst)
	if err != nil || copied {
		t.Fatalf("linkOrCopy on one file system = %v, %v; want a link", copied, err)
	}
	a, _ := os.Stat(src)
	b, _ := os.Stat(dst)
	if !os.SameFile(a, b) {
		t.Errorf("dst is not a hard link of src")
	}
	// /dev/shm is another file system than the test's temporary directory
	// on most hosts; where it is not, the link path is taken again.
	other, err := os.MkdirTemp("/dev/shm", "fc-test-")
	if err != nil {
		t.Skipf("skipping the copy case: %v", err)
	}
	defer os.RemoveAll(other)
	dst2 := filepath.Join(other, "dst")
	copied, err = linkOrCopy(src, dst2)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(dst2); string(got) != "image" {
		t.Errorf("copy holds %q", got)
	}
	c, _ := os.Stat(dst2)
	if copied == os.SameFile(a, c) {
		t.Errorf("copied=%v but SameFile=%v", copied, os.SameFile(a, c))
	}
}

// unixServer serves handle on a unix socket in a temporary directory and
// returns its path.
func unixServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "s.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return p
}

// TestConnectGuest: the hybrid vsock handshake against an in-test unix
// server: CONNECTs that are closed are retried, the OK line is consumed
// and nothing after it, and a wrong answer fails at once.
func TestConnectGuest(t *testing.T) {
	attempts := make(chan string, 16)
	var n atomic.Int32
	path := unixServer(t, func(c net.Conn) {
		line, _ := readLine(c, 64)
		attempts <- line
		if n.Add(1) < 3 {
			c.Close() // nobody listens in the guest yet
			return
		}
		io.WriteString(c, "OK 1073741824\nREADY")
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := connectGuest(ctx, path, 1024)
	if err != nil {
		t.Fatalf("connectGuest: %v", err)
	}
	defer conn.Close()
	buf := make([]byte, 5)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "READY" {
		t.Errorf("bytes after OK = %q, %v; want READY", buf, err)
	}
	close(attempts)
	var got []string
	for a := range attempts {
		got = append(got, a)
	}
	if len(got) != 3 || got[0] != "CONNECT 1024\n" || got[2] != "CONNECT 1024\n" {
		t.Errorf("attempts %q, want three CONNECT 1024", got)
	}

	refused := unixServer(t, func(c net.Conn) {
		readLine(c, 64)
		io.WriteString(c, "NO\n")
		c.Close()
	})
	var he *handshakeError
	if _, err := connectGuest(ctx, refused, 1024); !errors.As(err, &he) || !strings.Contains(err.Error(), `"NO\n"`) {
		t.Errorf("wrong answer: %v, want a handshakeError quoting it", err)
	}

	never := unixServer(t, func(c net.Conn) { readLine(c, 64); c.Close() })
	short, cancel2 := context.WithTimeoutCause(context.Background(), 2*time.Second, errors.New("guest too slow"))
	defer cancel2()
	if _, err := connectGuest(short, never, 1024); err == nil || !strings.Contains(err.Error(), "guest too slow") || !strings.Contains(err.Error(), "not listening") {
		t.Errorf("guest never listening: %v, want the context's cause and the last attempt", err)
	}
	missing := filepath.Join(t.TempDir(), "absent.sock")
	short2, cancel3 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel3()
	if _, err := connectGuest(short2, missing, 1024); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("missing socket: %v, want the deadline after retrying", err)
	}
}

// apiServer serves handler over HTTP on a unix socket and returns a
// client for it.
func apiServer(t *testing.T, handler http.HandlerFunc) *apiClient {
	t.Helper()
	p := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: handler}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	c := newAPIClient(p)
	t.Cleanup(c.Close)
	return c
}

func TestAPIErrors(t *testing.T) {
	ctx := context.Background()
	c := apiServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/machine-config":
			w.WriteHeader(400)
			io.WriteString(w, `{"fault_message":"The memory size (MiB) is invalid."}`)
		case "/actions":
			w.WriteHeader(500)
			io.WriteString(w, `{"fault_message":"Internal error: vcpu thread died"}`)
		case "/vsock":
			w.WriteHeader(400)
			io.WriteString(w, "not json")
		default:
			w.WriteHeader(204)
		}
	})
	err := c.putMachineConfig(ctx, machineConfig{VCPUCount: 1, MemSizeMiB: 0})
	var ae *APIError
	if !errors.As(err, &ae) || ae.StatusCode != 400 || ae.FaultMessage != "The memory size (MiB) is invalid." || ae.Path != "/machine-config" {
		t.Errorf("400: %#v", err)
	}
	if !errors.Is(err, errdefs.ErrInvalidParameter) || err.Error() != "firecracker PUT /machine-config: 400 Bad Request: The memory size (MiB) is invalid." {
		t.Errorf("400: %q, want ErrInvalidParameter with the fault message", err)
	}
	if err := c.action(ctx, actionInstanceStart); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "vcpu thread died") {
		t.Errorf("500: %v, want ErrUnavailable with the fault message", err)
	}
	if err := c.putVsock(ctx, vsockDevice{GuestCID: 3, UDSPath: "v.sock"}); !errors.As(err, &ae) || ae.FaultMessage != "not json" {
		t.Errorf("an error body that is not JSON: %v, want its text", err)
	}
	if err := c.putDrive(ctx, drive{DriveID: "root", PathOnHost: "/x", IsRootDevice: true}); err != nil {
		t.Errorf("204: %v", err)
	}
	gone := newAPIClient(filepath.Join(t.TempDir(), "absent.sock"))
	if err := gone.putEntropy(ctx); !errors.Is(err, errdefs.ErrUnavailable) || isAPIError(err) {
		t.Errorf("no firecracker: %v, want ErrUnavailable that is not an APIError", err)
	}
}
