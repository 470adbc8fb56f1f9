package firecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
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

// fakeEnv is a driver whose Firecracker (and jailer) are the stand-ins of
// fakefc_test.go.
type fakeEnv struct {
	*vmmtest.Env
	d  *Driver
	fc string
}

func newFakeEnv(t *testing.T, mutate ...func(*Options)) *fakeEnv {
	t.Helper()
	e := &fakeEnv{Env: vmmtest.NewEnv(t, "firecracker"), fc: vmmtest.FakeBinary(t, fakeFCName)}
	e.Failures = map[string]string{
		"apifail-1": "firecracker PUT /drives/code: 400 Bad Request: Unable to create the block device: fake failure of code",
		// What Firecracker's logger said comes with the error.
		"apifail-2":  "firecracker logged: [apifail-2:fc_api:ERROR] fake refusal of drive code",
		"nolisten-1": "vm not ready within 1s",
	}
	opts := Options{
		StateDir: e.StateDir, CacheDir: e.CacheDir, FirecrackerPath: e.fc, KernelPath: e.Kernel,
		Logger: hostproctest.Logger(t), StopGrace: time.Second, ReadyTimeout: 10 * time.Second,
		// Spares are TestSpare's; elsewhere they would make the suite's
		// process and request counts depend on the pool.
		SpareVMs: -1,
	}
	for _, m := range mutate {
		m(&opts)
	}
	e.d = newTestDriver(t, opts, e.Images)
	e.Driver = e.d
	e.Restart = func(t *testing.T) vmmtest.Driver {
		o := opts
		o.StopGrace, o.ReadyTimeout = 0, 0
		return newTestDriver(t, o, e.Images)
	}
	e.Gone = func(t *testing.T, id string) {
		if p := vmmtest.ProcessesWithArg(id, "--id="+id); len(p) > 0 {
			t.Errorf("processes naming %s left: %v", id, p)
		}
	}
	return e
}

// newTestDriver is newDriver, closed when t ends.
func newTestDriver(t *testing.T, opts Options, images *vmmtest.FakeImages) *Driver {
	t.Helper()
	d, err := newDriver(opts, images)
	return vmmtest.Opened(t, d, err)
}

func startFake(t *testing.T, e *fakeEnv, id string) *instance {
	t.Helper()
	return e.Start(t, id).(*instance)
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

// assertGone fails unless the VM's process, its instance directory and
// the given cgroups are gone.
func assertGone(t *testing.T, e *fakeEnv, id string, pid int, cgroups ...string) {
	t.Helper()
	e.AssertGone(t, id, pid)
	for _, cg := range cgroups {
		if _, err := os.Stat(cg); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left: %v", cg, err)
		}
	}
}
