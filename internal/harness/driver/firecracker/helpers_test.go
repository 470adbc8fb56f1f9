package firecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/runtimes"
)

func TestMain(m *testing.M) {
	switch filepath.Base(os.Args[0]) {
	case fakeFCName:
		os.Exit(fakeFirecracker(os.Args[1:]))
	case fakeJailerName:
		os.Exit(fakeJailer(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeBinary returns a symlink named name to the test binary.
func fakeBinary(t *testing.T, name string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.Symlink(exe, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeImages makes image files and counts its calls.
type fakeImages struct {
	dir      string
	roots    atomic.Int32
	codeKeys sync.Map
	// block, if set, makes Root wait for ctx (a slow image build).
	block bool
}

func (f *fakeImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	f.roots.Add(1)
	if f.block {
		<-ctx.Done()
		return "", ctx.Err()
	}
	p := filepath.Join(f.dir, rt.ID+".ext4")
	return p, os.WriteFile(p, []byte("root"), 0o644)
}

func (f *fakeImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	f.codeKeys.Store(key, codeDir)
	p := filepath.Join(f.dir, "code-"+key+".ext4")
	return p, os.WriteFile(p, []byte("code"), 0o644)
}

func (f *fakeImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	fh, err := os.Create(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	return fh.Truncate(int64(sizeMB) << 20)
}

type fakeEnv struct {
	d        *Driver
	images   *fakeImages
	stateDir string
	code     string
	fc       string
	kernel   string
}

func newFakeEnv(t *testing.T, mutate ...func(*Options)) *fakeEnv {
	t.Helper()
	e := &fakeEnv{stateDir: t.TempDir(), code: t.TempDir(), fc: fakeBinary(t, fakeFCName)}
	e.images = &fakeImages{dir: t.TempDir()}
	e.kernel = filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(e.kernel, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.code, "bootstrap"), []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := Options{
		StateDir: e.stateDir, FirecrackerPath: e.fc, KernelPath: e.kernel,
		Logger: hostproctest.Logger(t), StopGrace: time.Second, ReadyTimeout: 10 * time.Second,
	}
	for _, m := range mutate {
		m(&opts)
	}
	d, err := newDriver(opts, e.images)
	if err != nil {
		t.Fatalf("newDriver: %v", err)
	}
	e.d = d
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

func (e *fakeEnv) spec(id string) driver.Spec {
	return driver.Spec{
		ID: id, Function: "f", RevisionID: "r",
		Runtime:  runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided},
		CodeDir:  e.code,
		MemoryMB: 128, EphemeralMB: 16,
	}
}

func startFake(t *testing.T, e *fakeEnv, id string) *instance {
	t.Helper()
	return startSpec(t, e, e.spec(id))
}

func startSpec(t *testing.T, e *fakeEnv, sp driver.Spec) *instance {
	t.Helper()
	inst, err := e.d.Start(context.Background(), sp)
	if err != nil {
		t.Fatalf("Start(%s): %v", sp.ID, err)
	}
	return inst.(*instance)
}

// requests returns what the stand-in Firecracker of inst was sent.
func requests(t *testing.T, inst *instance) []loggedRequest {
	t.Helper()
	f, err := os.Open(filepath.Join(inst.root, fakeRequests))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var reqs []loggedRequest
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r loggedRequest
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, r)
	}
	return reqs
}

// assertGone fails unless the process, the instance directory and the
// given cgroups are gone.
func assertGone(t *testing.T, e *fakeEnv, id string, pid int, cgroups ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for pid > 0 && pidAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pid > 0 && pidAlive(pid) {
		t.Errorf("firecracker %d still running", pid)
	}
	if _, err := os.Stat(filepath.Join(e.stateDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("instance directory of %s left: %v", id, err)
	}
	for _, cg := range cgroups {
		if _, err := os.Stat(cg); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left: %v", cg, err)
		}
	}
	if p := processesNamed(id); len(p) > 0 {
		t.Errorf("processes naming %s left: %v", id, p)
	}
}

func pidAlive(pid int) bool {
	p, err := hostproc.Lookup(pid)
	return err == nil && p.Running()
}

// processesNamed lists live pids (other than this one) whose command line
// contains s as a whole argument or as --id=s.
func processesNamed(s string) []int {
	var found []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if (a == s || a == "--id="+s) && pidAlive(pid) {
				found = append(found, pid)
				break
			}
		}
	}
	return found
}

// startSleeper starts a process that is not Firecracker.
func startSleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	c := exec.Command("sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c
}
