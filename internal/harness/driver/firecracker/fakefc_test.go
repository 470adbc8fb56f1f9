package firecracker

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/protocol"
)

// Names of the symlinks to the test binary that make it behave as
// Firecracker or the jailer (see TestMain): Recover and the jailer
// recognise them by file name.
const (
	fakeFCName     = "firecracker"
	fakeJailerName = "jailer"
	// fakeRequests is where the stand-in logs every API request, next to
	// its API socket.
	fakeRequests = "fake-requests.jsonl"
	// fakeJailerArgs is where the stand-in jailer writes its arguments,
	// in the chroot.
	fakeJailerArgs = "fake-jailer-args.json"
)

// loggedRequest is one line of fakeRequests.
type loggedRequest struct {
	Method      string          `json:"method"`
	Path        string          `json:"path"`
	ContentType string          `json:"content_type"`
	Body        json.RawMessage `json:"body"`
}

// fakeFirecracker imitates what the driver needs of Firecracker, checking
// every request against the API schema (src/firecracker/swagger/
// firecracker.yaml): required fields, types, no unknown fields, drive IDs
// matching their paths, files that must exist, pre-boot-only requests
// refused after InstanceStart. On InstanceStart it serves the hybrid
// vsock socket (docs/vsock.md): "CONNECT <port>\n" to the port named by
// invokex.vsock in the boot arguments is answered "OK <n>\n", followed by
// the guest's ready line, "HELLO" and an echo; when the host closes that
// stream the "guest" ends and the stand-in exits 0, as a real guest's
// vminit does. It also pauses, snapshots and loads snapshots (see
// fakesnap_test.go). Behaviour by the --id's prefix:
//
//	exit-       prints an error and exits 1 at once
//	apifail-    refuses PUT /drives/code with a fault_message, and logs why
//	nolisten-   closes every CONNECT (nothing listens in the guest)
//	slowlisten- closes the first three CONNECTs, then serves
//	garbage-    sends another line instead of the ready line
//	stubborn-   ignores Ctrl-Alt-Del, SIGTERM and the stream's end
//	cad-        ignores the stream's end (a guest whose agent is wedged)
//	            but reboots on Ctrl-Alt-Del
//	nocad-      ignores Ctrl-Alt-Del and the stream's end (a guest
//	            without an i8042 driver whose agent is wedged)
//	die-        exits 0 right after the ready line
//	pausefail-  refuses PATCH /vm
//	snapfail-   refuses PUT /snapshot/create
//	snapnomem-  answers PUT /snapshot/create 204 but writes no memory file
//	loadfail-   refuses PUT /snapshot/load (and exits, as Firecracker does)
//	observe-    logs a warning once its logger is configured, and its
//	            metrics say seccomp caught a fault and 100 bytes were read
//
// It exits 0 when the "guest" ends (stream closed, Ctrl-Alt-Del) and
// fakeTermExit on SIGTERM, so tests can tell which ended it. A paused
// guest does nothing: neither the stream's end nor Ctrl-Alt-Del ends it,
// and a Ctrl-Alt-Del sent to it makes SIGTERM exit fakePausedCADExit, so
// tests can tell that the driver asked a frozen guest.
//
// Started by the stand-in jailer, it finds its chroot in $FAKEFC_ROOT and
// resolves absolute paths under it.
func fakeFirecracker(args []string) int {
	var apiPath, id string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--api-sock" && i+1 < len(args):
			apiPath, i = args[i+1], i+1
		case a == "--id" && i+1 < len(args):
			id, i = args[i+1], i+1
		case strings.HasPrefix(a, "--id="):
			id = strings.TrimPrefix(a, "--id=")
		case strings.HasPrefix(a, "--start-time-"):
		default:
			fmt.Fprintln(os.Stderr, "firecracker: unknown argument", a)
			return 1
		}
	}
	mode, _, _ := strings.Cut(id, "-")
	if mode == "exit" {
		fmt.Fprintln(os.Stderr, "firecracker: fake failure for", id)
		return 1
	}
	root := os.Getenv("FAKEFC_ROOT")
	if root != "" {
		// Hold the chroot by a descriptor, as a real chroot holds it by
		// its inode: the driver may rename a directory above it.
		d, err := os.Open(root)
		if err != nil {
			fmt.Fprintln(os.Stderr, "firecracker: chroot:", err)
			return 1
		}
		root = "/proc/self/fd/" + strconv.Itoa(int(d.Fd()))
	}
	resolve := func(p string) string {
		if root != "" && filepath.IsAbs(p) {
			return filepath.Join(root, p)
		}
		return p
	}
	if apiPath == "" {
		apiPath = "/run/firecracker.socket"
	}
	l, err := listenUnixLong(resolve(apiPath))
	if err != nil {
		fmt.Fprintln(os.Stderr, "firecracker: api socket:", err)
		return 1
	}
	vm := &fakeVM{
		id: id, mode: mode, resolve: resolve, quit: make(chan int, 4),
		log: filepath.Join(filepath.Dir(resolve(apiPath)), fakeRequests),
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() {
		for range sigs {
			vm.mu.Lock()
			code := fakeTermExit
			if vm.cadWhilePaused {
				code = fakePausedCADExit
			}
			vm.mu.Unlock()
			vm.end(code)
		}
	}()
	go http.Serve(l, vm)
	select {
	case code := <-vm.quit:
		return code
	case <-time.After(5 * time.Minute):
		return 2
	}
}

// openTap attaches to the tap name in the stand-in's network namespace as
// Firecracker does (its flags; usable by the stand-in's user), and keeps
// it open. The tap must exist: Firecracker as root would create a missing
// one, which would hide a driver that made none.
func (v *fakeVM) openTap(name string) error {
	if _, err := net.InterfaceByName(name); err != nil {
		return fmt.Errorf("Could not create the network device: %s: %v", name, err)
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err == nil {
		var ifr *unix.Ifreq
		if ifr, err = unix.NewIfreq(name); err == nil {
			ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
			err = unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr)
		}
	}
	if err != nil {
		return fmt.Errorf("Could not create the network device: Open tap device failed: %s: %v", name, err)
	}
	v.tapFD = fd
	return nil
}

type fakeVM struct {
	tapFD         int    // mode "tap": the tap it opened
	tap           string // the network interface's host_dev_name
	id, mode, log string
	resolve       func(string) string
	quit          chan int

	mu       sync.Mutex
	started  bool
	bootArgs string
	kernel   bool
	drives   map[string]bool // id -> is_root_device
	udsPath  string
	connects int
	served   bool

	// Snapshots (fakesnap_test.go): configured is set by any pre-boot
	// request (a load must come first), history is every request so far.
	configured     bool
	paused         bool
	cadWhilePaused bool
	restored       bool
	from           string            // the VM a restored one is a snapshot of
	paths          map[string]string // drive id -> path_on_host
	memMiB         int
	history        []loggedRequest
	// patched are the drives PATCH /drives switched (a spare's code).
	patched []string

	// logs and metrics are the logger's and the metrics' pipes, once
	// configured (metrics is written without mu: end may hold it or
	// not); exitMetrics writes the last record once.
	logs        *os.File
	metrics     atomic.Pointer[os.File]
	exitMetrics sync.Once
}

// fakeTermExit is the stand-in's exit status after SIGTERM,
// fakePausedCADExit after SIGTERM if it was sent Ctrl-Alt-Del while
// paused.
const (
	fakeTermExit      = 3
	fakePausedCADExit = 4
)

func (v *fakeVM) end(code int) {
	if v.mode != "stubborn" {
		v.exitMetrics.Do(v.flushMetrics)
		select {
		case v.quit <- code:
		default:
		}
	}
}

// schema lists each request's fields (name -> JSON type) and which are
// required, from the swagger definitions.
var schema = map[string]struct{ fields, required map[string]string }{
	"MachineConfiguration": {
		fields:   map[string]string{"vcpu_count": "int", "mem_size_mib": "int", "smt": "bool", "track_dirty_pages": "bool", "cpu_template": "string", "huge_pages": "string"},
		required: map[string]string{"vcpu_count": "", "mem_size_mib": ""},
	},
	"BootSource": {
		fields:   map[string]string{"kernel_image_path": "string", "boot_args": "string", "initrd_path": "string"},
		required: map[string]string{"kernel_image_path": ""},
	},
	"Drive": {
		fields:   map[string]string{"drive_id": "string", "path_on_host": "string", "is_root_device": "bool", "is_read_only": "bool", "partuuid": "string", "cache_type": "string", "io_engine": "string"},
		required: map[string]string{"drive_id": "", "is_root_device": ""},
	},
	"Vsock": {
		fields:   map[string]string{"guest_cid": "int", "uds_path": "string", "vsock_id": "string"},
		required: map[string]string{"guest_cid": "", "uds_path": ""},
	},
	"EntropyDevice":    {fields: map[string]string{"rate_limiter": "object"}, required: map[string]string{}},
	"NetworkInterface": {fields: map[string]string{"iface_id": "string", "host_dev_name": "string", "guest_mac": "string"}, required: map[string]string{"iface_id": "", "host_dev_name": ""}},
	"PartialDrive": {
		fields:   map[string]string{"drive_id": "string", "path_on_host": "string", "rate_limiter": "object"},
		required: map[string]string{"drive_id": ""},
	},
	"Logger": {
		fields: map[string]string{"log_path": "string", "level": "string", "show_level": "bool", "show_log_origin": "bool", "module": "string"},
	},
	"Metrics": {
		fields:   map[string]string{"metrics_path": "string"},
		required: map[string]string{"metrics_path": ""},
	},
	"InstanceActionInfo": {
		fields:   map[string]string{"action_type": "string"},
		required: map[string]string{"action_type": ""},
	},
}

func checkSchema(def string, body map[string]any) error {
	s := schema[def]
	for k, v := range body {
		typ, ok := s.fields[k]
		if !ok {
			return fmt.Errorf("unknown field `%s` in %s", k, def)
		}
		okType := false
		switch typ {
		case "int":
			f, isNum := v.(float64)
			okType = isNum && f == float64(int64(f))
		case "bool":
			_, okType = v.(bool)
		case "string":
			_, okType = v.(string)
		case "object":
			_, okType = v.(map[string]any)
		case "array":
			_, okType = v.([]any)
		}
		if !okType {
			return fmt.Errorf("%s.%s: want %s, got %v", def, k, typ, v)
		}
	}
	for k := range s.required {
		if _, ok := body[k]; !ok {
			return fmt.Errorf("missing field `%s` in %s", k, def)
		}
	}
	return nil
}

func fault(w http.ResponseWriter, status int, format string, args ...any) {
	b, _ := json.Marshal(map[string]string{"fault_message": fmt.Sprintf(format, args...)})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

func (v *fakeVM) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	raw, _ := io.ReadAll(r.Body)
	logBody := json.RawMessage(raw)
	if !json.Valid(raw) {
		logBody, _ = json.Marshal(string(raw))
	}
	logged := loggedRequest{Method: r.Method, Path: r.URL.Path, ContentType: r.Header.Get("Content-Type"), Body: logBody}
	if f, err := os.OpenFile(v.log, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err == nil {
		json.NewEncoder(f).Encode(logged)
		f.Close()
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	v.history = append(v.history, logged)
	path := r.URL.Path
	var req map[string]any
	wantMethod := http.MethodPut
	if path == "/vm" || (r.Method == http.MethodPatch && strings.HasPrefix(path, "/drives/")) {
		wantMethod = http.MethodPatch
	}
	if r.Method != wantMethod || r.Header.Get("Content-Type") != "application/json" || json.Unmarshal(raw, &req) != nil {
		fault(w, 400, "Invalid request method and/or path: %s %s", r.Method, r.URL.Path)
		return
	}
	if v.serveSnapshot(w, path, req) {
		return
	}
	if r.Method == http.MethodPatch && strings.HasPrefix(path, "/drives/") {
		if err := v.patchDrive(strings.TrimPrefix(path, "/drives/"), req); err != nil {
			fault(w, 400, "%v", err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if v.started && path != "/actions" {
		fault(w, 400, "The requested operation is not supported after starting the microVM.")
		return
	}
	body := req
	var err error
	switch {
	case path == "/machine-config":
		if err = checkSchema("MachineConfiguration", body); err == nil {
			if n := body["vcpu_count"].(float64); n < 1 || n > 32 || body["mem_size_mib"].(float64) < 1 {
				err = fmt.Errorf("invalid machine configuration")
			}
			v.memMiB = int(body["mem_size_mib"].(float64))
		}
	case path == "/boot-source":
		if err = checkSchema("BootSource", body); err == nil {
			if _, serr := os.Stat(v.resolve(body["kernel_image_path"].(string))); serr != nil {
				err = fmt.Errorf("cannot load kernel: %v", serr)
			}
			v.bootArgs, _ = body["boot_args"].(string)
			v.kernel = true
		}
	case strings.HasPrefix(path, "/drives/"):
		err = v.putDrive(strings.TrimPrefix(path, "/drives/"), body)
	case path == "/vsock":
		if err = checkSchema("Vsock", body); err == nil {
			if body["guest_cid"].(float64) < 3 {
				err = fmt.Errorf("invalid guest cid")
			}
			v.udsPath = body["uds_path"].(string)
		}
	case path == "/entropy":
		err = checkSchema("EntropyDevice", body)
	case strings.HasPrefix(path, "/network-interfaces/"):
		if err = checkSchema("NetworkInterface", body); err == nil && body["iface_id"] != strings.TrimPrefix(path, "/network-interfaces/") {
			err = fmt.Errorf("the id from the path does not match the id from the body")
		}
		if err == nil && v.mode == "tap" {
			err = v.openTap(body["host_dev_name"].(string))
		}
		if err == nil {
			v.tap = body["host_dev_name"].(string)
		}
	case path == "/logger":
		if err = checkSchema("Logger", body); err == nil {
			v.logs, err = v.openObserved(v.logs, "logger", body["log_path"])
		}
		if err == nil && v.mode == "observe" {
			fmt.Fprintf(v.logs, "[%s:main:WARN] fake warning for %s\n", v.id, v.id)
		}
	case path == "/metrics":
		if err = checkSchema("Metrics", body); err == nil {
			var f *os.File
			if f, err = v.openObserved(v.metrics.Load(), "metrics", body["metrics_path"]); err == nil {
				v.metrics.Store(f)
			}
		}
	case path == "/actions":
		err = v.action(body)
	default:
		fault(w, 400, "Invalid request method and/or path: %s %s", r.Method, path)
		return
	}
	if err != nil {
		fault(w, 400, "%v", err)
		return
	}
	if path != "/actions" && path != "/logger" && path != "/metrics" {
		v.configured = true
	}
	w.WriteHeader(http.StatusNoContent)
}

// openObserved opens the logger's or the metrics' path as Firecracker
// does (read-write, non-blocking: a pipe nobody drains loses lines rather
// than stalling the VMM), once: a second configuration is refused. The
// path must be a named pipe, which is what the driver gives.
func (v *fakeVM) openObserved(open *os.File, what string, path any) (*os.File, error) {
	if open != nil {
		return open, fmt.Errorf("Reinitialization of %s not allowed.", what)
	}
	p, _ := path.(string)
	if fi, err := os.Stat(v.resolve(p)); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		return nil, fmt.Errorf("Failed to open target file for %s: %v (mode %v)", what, err, fi)
	}
	return os.OpenFile(v.resolve(p), os.O_RDWR|syscall.O_NONBLOCK, 0)
}

// flushMetrics writes a metrics record, as Firecracker does every 60 s,
// on FlushMetrics and when it exits. The "observe" mode's records count
// 100 bytes read from the disks and say that seccomp caught a fault.
func (v *fakeVM) flushMetrics() {
	f := v.metrics.Load()
	if f == nil {
		return
	}
	rec := map[string]any{"utc_timestamp_ms": time.Now().UnixMilli(), "block": map[string]any{"read_bytes": 0}}
	if v.mode == "observe" {
		rec["block"] = map[string]any{"read_bytes": 100, "write_bytes": 0}
		rec["seccomp"] = map[string]any{"num_faults": 1}
		rec["signals"] = map[string]any{"sigsegv": 0, "sigbus": 0}
	}
	b, _ := json.Marshal(rec)
	// Firecracker drops a record a full pipe cannot take (and counts it);
	// the stand-in must not hang its API on one either.
	f.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	f.Write(append(b, '\n'))
}

func (v *fakeVM) putDrive(id string, body map[string]any) error {
	if err := checkSchema("Drive", body); err != nil {
		return err
	}
	if body["drive_id"] != id {
		return fmt.Errorf("the id from the path does not match the id from the body")
	}
	if v.mode == "apifail" && id == "code" {
		if v.logs != nil {
			fmt.Fprintf(v.logs, "[%s:fc_api:ERROR] fake refusal of drive %s\n", v.id, id)
		}
		return fmt.Errorf("Unable to create the block device: fake failure of %s", id)
	}
	p, _ := body["path_on_host"].(string)
	if _, err := os.Stat(v.resolve(p)); err != nil {
		return fmt.Errorf("Unable to create the block device: %v", err)
	}
	if v.drives == nil {
		v.drives, v.paths = map[string]bool{}, map[string]string{}
	}
	root := body["is_root_device"].(bool)
	for d, r := range v.drives {
		if root && r && d != id {
			return fmt.Errorf("A root block device already exists")
		}
	}
	v.drives[id], v.paths[id] = root, p
	return nil
}

// patchDrive is PATCH /drives/{id}: only after InstanceStart, on a drive
// that exists, to a file that exists.
func (v *fakeVM) patchDrive(id string, body map[string]any) error {
	if err := checkSchema("PartialDrive", body); err != nil {
		return err
	}
	if body["drive_id"] != id {
		return fmt.Errorf("the id from the path does not match the id from the body")
	}
	if !v.started {
		return fmt.Errorf("The requested operation is not supported before starting the microVM.")
	}
	if _, ok := v.drives[id]; !ok {
		return fmt.Errorf("Unable to patch the block device: Cannot find block device with id %s", id)
	}
	p, _ := body["path_on_host"].(string)
	if _, err := os.Stat(v.resolve(p)); err != nil {
		return fmt.Errorf("Unable to patch the block device: %v", err)
	}
	v.paths[id] = p
	v.patched = append(v.patched, id)
	return nil
}

func (v *fakeVM) action(body map[string]any) error {
	if err := checkSchema("InstanceActionInfo", body); err != nil {
		return err
	}
	switch body["action_type"] {
	case "InstanceStart":
		if v.started {
			return fmt.Errorf("The microVM is already running")
		}
		if !v.kernel {
			return fmt.Errorf("Cannot start microvm without kernel configuration")
		}
		if v.udsPath != "" {
			l, err := listenUnixLong(v.resolve(v.udsPath))
			if err != nil {
				return fmt.Errorf("vsock: %v", err)
			}
			go v.serveVsock(l)
		}
		v.started = true
		fmt.Println("fake console: booted", v.id) // the serial console
	case "SendCtrlAltDel":
		if !v.started {
			return fmt.Errorf("The microVM is not running")
		}
		if v.paused {
			v.cadWhilePaused = true
			return nil
		}
		if v.mode != "nocad" {
			go v.end(0)
		}
	case "FlushMetrics":
		v.flushMetrics()
	default:
		return fmt.Errorf("unknown action_type %v", body["action_type"])
	}
	return nil
}

// listenUnixLong listens on the unix socket at path, however long (the
// stand-in binds absolute paths in its pretend chroot, which real
// Firecracker binds relative to its real one).
func listenUnixLong(path string) (net.Listener, error) {
	var l net.Listener
	err := hostproc.SocketAddr(path, func(addr string) error {
		var err error
		l, err = net.Listen("unix", addr)
		return err
	})
	return l, err
}

var spareArg = regexp.MustCompile(`(^| )invokex\.spare=1( |$)`)

var vsockArg = regexp.MustCompile(`(^| )invokex\.vsock=(\d+)( |$)`)

// serveVsock is the host side of the hybrid vsock with the guest's agent
// behind it.
func (v *fakeVM) serveVsock(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		line, err := bufio.NewReader(io.LimitReader(c, 64)).ReadString('\n')
		port, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "CONNECT ")
		v.mu.Lock()
		v.connects++
		m := vsockArg.FindStringSubmatch(v.bootArgs)
		listening := err == nil && ok && m != nil && m[2] == port && !v.served && !v.paused &&
			v.mode != "nolisten" && (v.mode != "slowlisten" || v.connects > 3)
		if listening {
			v.served = true
		}
		v.mu.Unlock()
		if !listening {
			c.Close()
			continue
		}
		go v.agent(c)
	}
}

func (v *fakeVM) agent(c net.Conn) {
	defer c.Close()
	io.WriteString(c, "OK "+strconv.Itoa(1<<30)+"\n")
	if v.restored {
		// The agent of a snapshot is mid-session, waiting for a frame.
		v.echo(c)
		return
	}
	if v.mode == "garbage" {
		io.WriteString(c, "NOT-READY\n")
		select {}
	}
	if spareArg.MatchString(v.bootArgs) {
		// A spare's init: its assignment comes once the host has switched
		// the code drive, and the agent starts only then.
		io.WriteString(c, vmm.SpareLine)
		if _, err := protocol.ReadAssignment(c); err != nil {
			return
		}
		v.mu.Lock()
		switched := slices.Contains(v.patched, "code")
		v.mu.Unlock()
		if !switched {
			io.WriteString(c, "CODE-NOT-SWITCHED\n")
			return
		}
	}
	io.WriteString(c, vmm.ReadyLine+"HELLO")
	if v.mode == "die" {
		// Give the driver time to read the ready line: a VMM that exits
		// while its ready line is unread fails the start by design.
		time.Sleep(300 * time.Millisecond)
		v.end(0)
		return
	}
	v.echo(c)
}

// echo serves the stream until the host closes it; the agent then exits
// and vminit ends the VM.
func (v *fakeVM) echo(c net.Conn) {
	io.Copy(c, c)
	v.mu.Lock()
	paused := v.paused
	v.mu.Unlock()
	if v.mode != "nocad" && v.mode != "cad" && !paused {
		v.end(0)
	}
}

// fakeJailer imitates the jailer's documented interface (docs/jailer.md):
// it checks its arguments, creates the chroot
// <chroot-base>/<exec file name>/<id>/root and the cgroups
// <hierarchy>/<parent>/<id> with the --cgroup values and its own pid, and
// execs the exec file in place with --id=<id>, the start times and the
// arguments after "--". It neither copies Firecracker into the chroot nor
// pivots into it nor changes user: the stand-in Firecracker resolves its
// paths under $FAKEFC_ROOT instead.
func fakeJailer(args []string) int {
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "jailer: "+format+"\n", a...)
		return 1
	}
	opts := map[string]string{}
	var cgroups, extra []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			extra = args[i+1:]
			break
		}
		switch a {
		case "--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--cgroup-version", "--parent-cgroup", "--netns", "--cgroup":
			if i+1 >= len(args) {
				return fail("%s needs a value", a)
			}
			if a == "--cgroup" {
				cgroups = append(cgroups, args[i+1])
			} else {
				opts[a] = args[i+1]
			}
			i++
		default:
			return fail("unknown argument %s", a)
		}
	}
	id, exe := opts["--id"], opts["--exec-file"]
	if !regexp.MustCompile(`^[a-zA-Z0-9-]{1,64}$`).MatchString(id) {
		return fail("invalid id %q", id)
	}
	if !strings.Contains(filepath.Base(exe), "firecracker") {
		return fail("exec file name must contain firecracker: %q", exe)
	}
	for _, k := range []string{"--uid", "--gid"} {
		if _, err := strconv.Atoi(opts[k]); err != nil {
			return fail("%s %q is not a number", k, opts[k])
		}
	}
	base := opts["--chroot-base-dir"]
	if base == "" {
		base = "/srv/jailer"
	}
	chroot := filepath.Join(base, filepath.Base(exe), id, "root")
	if err := os.MkdirAll(chroot, 0o700); err != nil {
		return fail("creating chroot: %v", err)
	}
	b, _ := json.Marshal(args)
	os.WriteFile(filepath.Join(chroot, fakeJailerArgs), b, 0o600)
	if ns := opts["--netns"]; ns != "" {
		// As the jailer does: this thread joins the namespace and execs
		// Firecracker from it.
		f, err := os.Open(ns)
		if err != nil {
			return fail("netns: %v", err)
		}
		runtime.LockOSThread()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			return fail("netns: %v", err)
		}
		f.Close()
	}
	if len(cgroups) > 0 {
		ver, _ := strconv.Atoi(opts["--cgroup-version"])
		cg := detectCgroups("/proc/mounts")
		if cg.Version != ver {
			return fail("no cgroup v%d hierarchy", ver)
		}
		for _, kv := range cgroups {
			file, val, _ := strings.Cut(kv, "=")
			hier := cg.MemoryRoot
			if strings.HasPrefix(file, "pids.") {
				hier = cg.PidsRoot
			}
			dir := filepath.Join(hier, opts["--parent-cgroup"], id)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return fail("cgroup: %v", err)
			}
			if err := os.WriteFile(filepath.Join(dir, file), []byte(val), 0); err != nil {
				return fail("cgroup %s: %v", file, err)
			}
			if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
				return fail("cgroup %s: %v", dir, err)
			}
		}
	}
	if err := os.Chdir(chroot); err != nil {
		return fail("%v", err)
	}
	argv := append([]string{"/" + filepath.Base(exe), "--id=" + id, "--start-time-us=0", "--start-time-cpu-us=0"}, extra...)
	err := syscall.Exec(exe, argv, []string{"FAKEFC_ROOT=" + chroot})
	return fail("exec: %v", err)
}
