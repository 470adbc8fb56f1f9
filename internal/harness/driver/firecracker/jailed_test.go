package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
)

// jailedEnv is a fakeEnv whose VMs go through the stand-in jailer, with a
// cgroup parent of the test's own (removed at the end).
func jailedEnv(t *testing.T, mutate ...func(*Options)) (*fakeEnv, string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: the jailer needs root")
	}
	jailer := vmmtest.FakeBinary(t, fakeJailerName)
	parent := "invokex-fctest-" + strconv.Itoa(os.Getpid())
	e := newFakeEnv(t, append([]func(*Options){func(o *Options) {
		o.JailerPath = jailer
		o.CgroupParent = parent
		o.UIDBase = 1<<30 + 777
	}}, mutate...)...)
	t.Cleanup(func() {
		for _, root := range []string{e.d.cgroups.MemoryRoot, e.d.cgroups.PidsRoot} {
			if root != "" {
				os.Remove(filepath.Join(root, parent))
			}
		}
	})
	if e.d.cgroups.Version == 0 {
		t.Logf("no cgroups on this host (%s): jailed without limits", e.d.cgroups.why)
	}
	return e, parent
}

func TestJailedStartStop(t *testing.T) {
	e, parent := jailedEnv(t)
	inst := startFake(t, e, "ok-jail")
	j := inst.jail
	if j == nil || inst.root != filepath.Join(e.StateDir, "ok-jail", "jail", "firecracker", "ok-jail", "root") {
		t.Fatalf("jail %+v, root %s", j, inst.root)
	}
	b, err := os.ReadFile(filepath.Join(inst.root, fakeJailerArgs))
	if err != nil {
		t.Fatal(err)
	}
	var args []string
	json.Unmarshal(b, &args)
	if strings.Join(args, " ") != strings.Join(j.args(), " ") || j.UID != 1<<30+777 || j.GID != j.UID {
		t.Errorf("jailer ran with %q, want %q (uid %d)", args, j.args(), j.UID)
	}
	// The images are in the chroot: hard links into the cache (one file
	// system here), and the scratch disk belongs to the VM's user.
	rt := e.Spec("x").Runtime
	rootSrc, _ := e.Images.Root(context.Background(), &rt)
	a, _ := os.Stat(rootSrc)
	if c, err := os.Stat(filepath.Join(inst.root, rootImage)); err != nil || !os.SameFile(a, c) {
		t.Errorf("root image in the jail is not a link of the cache's: %v", err)
	}
	if k, err := os.ReadFile(filepath.Join(inst.root, kernelFile)); err != nil || string(k) != "kernel" {
		t.Errorf("kernel in the jail: %q, %v", k, err)
	}
	if fi, err := os.Stat(filepath.Join(inst.root, scratchImage)); err != nil || fi.Sys().(*syscall.Stat_t).Uid != uint32(j.UID) {
		t.Errorf("scratch image not the vm user's: %v", err)
	}
	paths := map[string]string{}
	for _, r := range requests(t, inst) {
		var body map[string]any
		json.Unmarshal(r.Body, &body)
		for _, k := range []string{"kernel_image_path", "path_on_host", "uds_path"} {
			if v, ok := body[k].(string); ok {
				paths[r.Path] = v
			}
		}
	}
	for p, want := range map[string]string{"/boot-source": "/vmlinux", "/drives/root": "/root.ext4", "/drives/code": "/code.ext4", "/drives/scratch": "/scratch.ext4", "/vsock": "/vsock.sock"} {
		if paths[p] != want {
			t.Errorf("%s names %q, want the chroot's %q", p, paths[p], want)
		}
	}
	rec, _ := hostproc.ReadRecord[record](inst.Dir())
	if rec == nil || rec.Jailer != e.d.opts.JailerPath || rec.UID != j.UID || len(rec.Cgroups) != len(inst.cgroups) || rec.Root != inst.root {
		t.Errorf("record %+v does not describe the jailed vm", rec)
	}
	for _, dir := range inst.cgroups {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if err != nil || !strings.Contains(string(procs), strconv.Itoa(inst.PID())) {
			t.Errorf("cgroup %s: procs %q, %v; want firecracker %d", dir, procs, err, inst.PID())
		}
		if !strings.Contains(dir, filepath.Join(parent, "ok-jail")) {
			t.Errorf("cgroup %s is not <hierarchy>/%s/ok-jail", dir, parent)
		}
	}
	if !isOurVMM(inst.PID(), e.fc, e.d.opts.JailerPath, "ok-jail") {
		t.Errorf("the jailed firecracker (argv[0] /firecracker, --id=ok-jail) is not recognised")
	}
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-jail"); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	assertGone(t, e, "ok-jail", pid, inst.cgroups...)
}

// TestJailedRecover: after a crash (simulated: a second driver on the
// same state directory, the record without a pid), Recover kills the
// jailed VMM by its command line and anything left in its cgroups, and
// removes them.
func TestJailedRecover(t *testing.T) {
	e, _ := jailedEnv(t)
	inst := startFake(t, e, "ok-jrec")
	rec, err := hostproc.ReadRecord[record](inst.Dir())
	if err != nil {
		t.Fatal(err)
	}
	rec.PID, rec.StartTime = 0, 0
	hostproc.WriteRecord(inst.Dir(), rec)
	// A process the VM left in its cgroups (with the jailer's
	// --new-pid-ns, Firecracker itself is one the command line misses).
	var stray *int
	if len(inst.cgroups) > 0 {
		sl := vmmtest.StartSleeper(t)
		for _, dir := range inst.cgroups {
			if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(sl.Process.Pid)), 0); err != nil {
				t.Fatal(err)
			}
		}
		stray = &sl.Process.Pid
	}
	d2 := newTestDriver(t, Options{StateDir: e.StateDir, FirecrackerPath: e.fc, JailerPath: e.d.opts.JailerPath,
		KernelPath: e.Kernel, CgroupParent: e.d.opts.CgroupParent, Logger: hostproctest.Logger(t)}, e.Images)
	if _, err := d2.Recover(context.Background()); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Errorf("the jailed vm survived Recover")
	}
	if stray != nil && vmmtest.PIDAlive(*stray) {
		t.Errorf("a process in the vm's cgroups survived Recover")
	}
	assertGone(t, e, "ok-jrec", inst.PID(), inst.cgroups...)
	if err := e.d.Stop(context.Background(), "ok-jrec"); err != nil {
		t.Errorf("Stop after Recover: %v", err)
	}
}

// TestJailedStartFailure: a VM whose configuration Firecracker refuses
// leaves no cgroup, process or directory behind.
func TestJailedStartFailure(t *testing.T) {
	e, parent := jailedEnv(t)
	_, err := e.d.Start(context.Background(), e.Spec("apifail-j"))
	if err == nil || !strings.Contains(err.Error(), "fake failure of code") {
		t.Fatalf("Start = %v, want the refusal", err)
	}
	assertGone(t, e, "apifail-j", 0, e.d.cgroups.dirs(parent, "apifail-j")...)
}

// TestJailedSnapshot: jailed, Firecracker writes the snapshot in its
// chroot and the driver takes it out, the driver's and read-only; a
// restored VM's chroot holds links to the snapshot's state, memory and
// images and its own scratch disk (its user's), and every path the
// snapshot recorded or the load names is the chroot's own.
func TestJailedSnapshot(t *testing.T) {
	e, _ := jailedEnv(t)
	dir, st := takeSnapshot(t, e, "ok-jsnap")
	create := lastRequests(t, st.Requests, "PATCH /vm", "PUT /snapshot/create")[1]
	if create["snapshot_path"] != "/"+snapState || create["mem_file_path"] != "/"+snapMemory {
		t.Errorf("jailed PUT /snapshot/create %v, want the chroot's paths", create)
	}
	if want := map[string]string{"root": "/" + rootImage, "code": "/" + codeImage, "scratch": "/" + scratchImage}; !reflect.DeepEqual(st.Drives, want) || st.UDSPath != "/"+vsockSock {
		t.Errorf("the snapshot recorded drives %v and vsock %q, want the chroot's", st.Drives, st.UDSPath)
	}
	for _, name := range []string{snapState, snapMemory} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode().Perm() != 0o444 || fi.Sys().(*syscall.Stat_t).Uid != uint32(os.Geteuid()) {
			t.Errorf("%s: %v, %v; want the driver's, mode 0444", name, fi, err)
		}
	}
	if m := readMeta(t, dir); !m.Jailed {
		t.Errorf("vm.json %+v does not say jailed", m)
	}

	di, err := e.d.Restore(context.Background(), e.Spec("ok-jr1"), dir)
	if err != nil {
		t.Fatalf("Restore: %v", err)
	}
	inst := di.(*instance)
	if inst.jail == nil || inst.root != filepath.Join(e.StateDir, "ok-jr1", "jail", "firecracker", "ok-jr1", "root") {
		t.Fatalf("restored vm's root %s", inst.root)
	}
	echoes(t, inst)
	load := lastRequests(t, requests(t, inst), "PUT /snapshot/load")[0]
	want := map[string]any{
		"snapshot_path": "/" + snapState,
		"mem_backend":   map[string]any{"backend_type": "File", "backend_path": "/" + snapMemory},
		"resume_vm":     true,
	}
	if !reflect.DeepEqual(load, want) {
		t.Errorf("jailed PUT /snapshot/load %v, want %v", load, want)
	}
	for _, name := range []string{snapState, snapMemory, rootImage, codeImage, kernelFile} {
		if !sameFile(t, filepath.Join(inst.root, name), filepath.Join(dir, name)) {
			t.Errorf("%s in the jail is not a link of the snapshot's", name)
		}
	}
	scratch := filepath.Join(inst.root, scratchImage)
	fi, err := os.Stat(scratch)
	if err != nil || sameFile(t, scratch, filepath.Join(dir, scratchImage)) || fi.Sys().(*syscall.Stat_t).Uid != uint32(inst.jail.UID) {
		t.Errorf("the restored scratch disk is not the vm user's own copy: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(inst.root, vsockSock)); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("no vsock socket in the restored vm's chroot: %v", err)
	}
	pid := inst.PID()
	if err := e.d.Stop(context.Background(), "ok-jr1"); err != nil {
		t.Fatal(err)
	}
	assertGone(t, e, "ok-jr1", pid, inst.cgroups...)

	// The snapshot's paths are the chroot's: a driver without the jailer
	// cannot restore it.
	plain := newFakeEnv(t)
	if _, err := plain.d.Restore(context.Background(), plain.Spec("ok-plain"), dir); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("Restore of a jailed snapshot without the jailer: %v, want ErrInvalidParameter", err)
	}
}
