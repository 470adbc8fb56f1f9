package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// takeSnapshot starts id, has its guest write data into its scratch disk
// (at 1 MiB, where the empty image has a hole), snapshots it into a new
// directory and checks that the VM is gone: SIGTERMed at once, never
// asked for Ctrl-Alt-Del while paused. It returns the directory and the
// stand-in's state file.
func takeSnapshot(t *testing.T, e *fakeEnv, id string) (string, fakeState) {
	t.Helper()
	inst := startFake(t, e, id)
	writeAt(t, filepath.Join(inst.root, scratchImage), 1<<20, "guest data")
	dir := filepath.Join(t.TempDir(), "snap")
	if err := e.d.Snapshot(context.Background(), id, dir); err != nil {
		t.Fatalf("Snapshot(%s): %v", id, err)
	}
	waitDone(t, inst)
	if st := inst.Cmd().ProcessState; st.ExitCode() != fakeTermExit {
		t.Errorf("the snapshot's firecracker ended with %v, want its exit on SIGTERM (%d; %d: it was sent Ctrl-Alt-Del while paused)",
			st, fakeTermExit, fakePausedCADExit)
	}
	assertGone(t, e, id, inst.PID(), inst.cgroups...)
	st, err := readFakeState(dir)
	if err != nil {
		t.Fatalf("reading the stand-in's state file: %v", err)
	}
	if st.ID != id {
		t.Errorf("the state file is of %q, want %q", st.ID, id)
	}
	return dir, st
}

func writeAt(t *testing.T, path string, off int64, data string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(data), off); err != nil {
		t.Fatal(err)
	}
}

func readAt(t *testing.T, path string, off int64, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func waitDone(t *testing.T, inst driver.Instance) {
	t.Helper()
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("%s still running", inst.ID())
	}
}

// lastRequests returns the bodies of the last n requests of reqs, checking
// their methods and paths.
func lastRequests(t *testing.T, reqs []loggedRequest, want ...string) []map[string]any {
	t.Helper()
	if len(reqs) < len(want) {
		t.Fatalf("%d requests, want at least %v", len(reqs), want)
	}
	var bodies []map[string]any
	for k, r := range reqs[len(reqs)-len(want):] {
		if got := r.Method + " " + r.Path; got != want[k] || r.ContentType != "application/json" {
			t.Errorf("request %s (%s), want %s", got, r.ContentType, want[k])
		}
		var b map[string]any
		if err := json.Unmarshal(r.Body, &b); err != nil {
			t.Fatalf("%s: %v", r.Path, err)
		}
		bodies = append(bodies, b)
	}
	return bodies
}

// dirDigest sums up every file of dir (name, inode, mode, size and
// modification time): a snapshot directory is never written by Restore.
func dirDigest(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range ents {
		fi, err := os.Lstat(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		fmt.Fprintf(&b, "%s %d %v %d %d.%d\n", e.Name(), st.Ino, fi.Mode(), fi.Size(), st.Mtim.Sec, st.Mtim.Nsec)
	}
	return b.String()
}

func readMeta(t *testing.T, dir string) snapMeta {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, snapMetaFile))
	if err != nil {
		t.Fatal(err)
	}
	var m snapMeta
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err1 := os.Stat(a)
	fb, err2 := os.Stat(b)
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// echoes fails t unless the restored instance's stream echoes at once:
// the restored agent is mid-session, nothing precedes the protocol (the
// driver consumed only the hybrid vsock's "OK" line).
func echoes(t *testing.T, inst driver.Instance) {
	t.Helper()
	c := inst.Conn().(net.Conn)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("restored %s answered %q, %v; want the echo", inst.ID(), b, err)
	}
}

// TestSnapshot: the VM is paused, Firecracker writes a full snapshot
// into the directory, which gets the scratch disk (sparse, with what the
// guest wrote), the images (hard links) and vm.json; the VM is stopped.
func TestSnapshot(t *testing.T) {
	e := newFakeEnv(t)
	dir, st := takeSnapshot(t, e, "ok-snap")
	bodies := lastRequests(t, st.Requests, "PUT /actions", "PATCH /vm", "PUT /snapshot/create")
	if bodies[0]["action_type"] != "InstanceStart" {
		t.Errorf("the VM was not booted before the snapshot: %v", bodies[0])
	}
	if !reflect.DeepEqual(bodies[1], map[string]any{"state": "Paused"}) {
		t.Errorf("PATCH /vm %v, want Paused", bodies[1])
	}
	want := map[string]any{"snapshot_type": "Full", "snapshot_path": filepath.Join(dir, snapState), "mem_file_path": filepath.Join(dir, snapMemory)}
	if !reflect.DeepEqual(bodies[2], want) {
		t.Errorf("PUT /snapshot/create %v, want %v", bodies[2], want)
	}
	// What the state recorded resolves per instance: relative paths.
	if want := map[string]string{"root": rootImage, "code": codeImage, "scratch": scratchImage}; !reflect.DeepEqual(st.Drives, want) || st.UDSPath != vsockSock {
		t.Errorf("the snapshot recorded drives %v and vsock %q, want %v and %q", st.Drives, st.UDSPath, want, vsockSock)
	}

	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	wantNames := append([]string{snapMetaFile}, snapFiles...)
	sort.Strings(wantNames)
	if !reflect.DeepEqual(names, wantNames) {
		t.Errorf("snapshot directory holds %v, want %v", names, wantNames)
	}
	if m := readMeta(t, dir); m.Format != snapFormat || m.Jailed || m.MemoryMB != 128 || m.EphemeralMB != 16 || m.VCPUs != e.d.host.VCPUs(128) || m.Firecracker != e.fc {
		t.Errorf("vm.json %+v", m)
	}
	for _, name := range []string{snapState, snapMemory} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode().Perm() != 0o444 {
			t.Errorf("%s: %v, %v; want mode 0444", name, fi, err)
		}
	}
	scratch := filepath.Join(dir, scratchImage)
	fi, err := os.Stat(scratch)
	if err != nil || fi.Size() != 16<<20 {
		t.Fatalf("saved scratch disk: %v, %v", fi, err)
	}
	if got := readAt(t, scratch, 1<<20, 10); got != "guest data" {
		t.Errorf("saved scratch disk holds %q where the guest wrote", got)
	}
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used >= fi.Size()/2 {
		t.Errorf("saved scratch disk uses %d bytes of %d: not sparse", used, fi.Size())
	}
	rt := e.Spec("x").Runtime
	rootSrc, _ := e.Images.Root(context.Background(), &rt)
	if !sameFile(t, filepath.Join(dir, rootImage), rootSrc) || !sameFile(t, filepath.Join(dir, kernelFile), e.Kernel) {
		t.Errorf("the images in the snapshot are not hard links of the cache's")
	}
}

// TestRestore: two VMs restored at once from one snapshot, each in its
// own directory with its own scratch disk and vsock socket at the path
// the snapshot recorded, loaded with one request and attached without a
// ready line; the snapshot directory is not written.
func TestRestore(t *testing.T) {
	e := newFakeEnv(t)
	dir, _ := takeSnapshot(t, e, "ok-base")
	before := dirDigest(t, dir)
	var insts []*instance
	for _, id := range []string{"ok-r1", "ok-r2"} {
		di, err := e.d.Restore(context.Background(), e.Spec(id), dir)
		if err != nil {
			t.Fatalf("Restore(%s): %v", id, err)
		}
		insts = append(insts, di.(*instance))
	}
	for _, inst := range insts {
		echoes(t, inst)
		bodies := lastRequests(t, requests(t, inst), "PUT /snapshot/load")
		var sent []string
		for _, r := range requests(t, inst) {
			sent = append(sent, r.Method+" "+r.Path)
		}
		// The logger and metrics are not in a snapshot, and the one
		// configuration Firecracker takes before a load.
		if want := []string{"PUT /logger", "PUT /metrics", "PUT /snapshot/load"}; !slices.Equal(sent, want) {
			t.Errorf("%s was sent %v, want %v", inst.ID(), sent, want)
		}
		want := map[string]any{
			"snapshot_path": filepath.Join(dir, snapState),
			"mem_backend":   map[string]any{"backend_type": "File", "backend_path": filepath.Join(dir, snapMemory)},
			"resume_vm":     true,
		}
		if !reflect.DeepEqual(bodies[0], want) {
			t.Errorf("PUT /snapshot/load %v, want %v", bodies[0], want)
		}
		if fi, err := os.Stat(filepath.Join(inst.Dir(), vsockSock)); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("%s has no vsock socket of its own: %v", inst.ID(), err)
		}
		scratch := filepath.Join(inst.Dir(), scratchImage)
		if sameFile(t, scratch, filepath.Join(dir, scratchImage)) || readAt(t, scratch, 1<<20, 10) != "guest data" {
			t.Errorf("%s's scratch disk is not its own copy of the snapshot's", inst.ID())
		}
		if got, err := os.Readlink(filepath.Join(inst.Dir(), rootImage)); err != nil || got != filepath.Join(dir, rootImage) {
			t.Errorf("%s's root image links to %q, %v", inst.ID(), got, err)
		}
		if rec, err := hostproc.ReadRecord[record](inst.Dir()); err != nil || rec.PID != inst.PID() || rec.Root != inst.Dir() {
			t.Errorf("%s's record %+v, %v", inst.ID(), rec, err)
		}
		writeAt(t, scratch, 1<<20, "later data")
	}
	for _, inst := range insts {
		if err := e.d.Stop(context.Background(), inst.ID()); err != nil {
			t.Errorf("Stop(%s): %v", inst.ID(), err)
		}
		assertGone(t, e, inst.ID(), inst.PID())
	}
	if dirDigest(t, dir) != before {
		t.Errorf("restoring changed the snapshot directory")
	}
}

// TestSnapshotFailures: a snapshot that fails at any step stops the VM,
// removes the directory, and says why (Firecracker's fault_message).
func TestSnapshotFailures(t *testing.T) {
	e := newFakeEnv(t)
	for _, c := range []struct {
		id, want string
		cancel   bool
	}{
		{id: "pausefail-1", want: "firecracker PATCH /vm: 400 Bad Request: Failed to pause the microVM: fake failure"},
		{id: "snapfail-1", want: "firecracker PUT /snapshot/create: 400 Bad Request: Cannot create snapshot: fake failure"},
		{id: "snapnomem-1", want: "owning the snapshot"},
		{id: "ok-cancelled", want: context.Canceled.Error(), cancel: true},
	} {
		inst := startFake(t, e, c.id)
		dir := filepath.Join(t.TempDir(), "snap")
		ctx, cancel := context.WithCancel(context.Background())
		if c.cancel {
			cancel()
		}
		err := e.d.Snapshot(ctx, c.id, dir)
		cancel()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Snapshot(%s) = %v, want an error saying %q", c.id, err, c.want)
		}
		if _, serr := os.Stat(dir); !errors.Is(serr, os.ErrNotExist) {
			t.Errorf("Snapshot(%s) failed but left its directory: %v", c.id, serr)
		}
		assertGone(t, e, c.id, inst.PID())
	}

	if err := e.d.Snapshot(context.Background(), "ok-unknown", filepath.Join(t.TempDir(), "snap")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Snapshot of an unknown id: %v, want ErrNotFound", err)
	}
	// A directory that exists is refused and left alone; the VM is
	// stopped all the same.
	inst := startFake(t, e, "ok-exists")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "keep"), []byte("x"), 0o600)
	if err := e.d.Snapshot(context.Background(), "ok-exists", dir); !errors.Is(err, os.ErrExist) {
		t.Errorf("Snapshot into an existing directory: %v, want ErrExist", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "keep")); err != nil {
		t.Errorf("Snapshot removed a directory it did not make: %v", err)
	}
	assertGone(t, e, "ok-exists", inst.PID())
}

// TestSnapshotNetworked: a VM with a network interface is not
// snapshotted (its tap and address are its slot's); it is stopped.
func TestSnapshotNetworked(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) {
		o.TapName, o.GuestIP = "fc{slot}", "10.0.{slot}.2::10.0.{slot}.1:255.255.255.0::eth0:off"
	})
	sp := e.Spec("ok-net")
	sp.Network = true
	inst := startSpec(t, e, sp)
	dir := filepath.Join(t.TempDir(), "snap")
	if err := e.d.Snapshot(context.Background(), "ok-net", dir); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("Snapshot of a networked vm: %v, want ErrInvalidParameter", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("directory made: %v", err)
	}
	assertGone(t, e, "ok-net", inst.PID())
	if _, err := e.d.Restore(context.Background(), sp, dir); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Restore without a snapshot: %v, want ErrNotFound", err)
	}
}

// TestRestoreFailures: a missing or incomplete snapshot is ErrNotFound,
// a spec or driver it does not fit is refused, and a restore that fails
// in Firecracker or in the guest leaves nothing behind; the snapshot
// still restores afterwards.
func TestRestoreFailures(t *testing.T) {
	e := newFakeEnv(t, func(o *Options) { o.ReadyTimeout = time.Second })
	ctx := context.Background()
	if _, err := e.d.Restore(ctx, e.Spec("ok-none"), filepath.Join(t.TempDir(), "none")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Restore from a missing directory: %v, want ErrNotFound", err)
	}
	if _, err := e.d.Restore(ctx, e.Spec("ok-empty"), t.TempDir()); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Restore from an empty directory: %v, want ErrNotFound", err)
	}
	dir, _ := takeSnapshot(t, e, "ok-base")
	meta, _ := os.ReadFile(filepath.Join(dir, snapMetaFile))
	mem := filepath.Join(dir, snapMemory)

	os.Rename(mem, mem+".away")
	_, err := e.d.Restore(ctx, e.Spec("ok-nomem"), dir)
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), snapMemory) {
		t.Errorf("Restore without the memory file: %v, want ErrNotFound naming it", err)
	}
	os.Rename(mem+".away", mem)
	os.WriteFile(filepath.Join(dir, snapMetaFile), meta[:len(meta)/2], 0o600)
	if _, err := e.d.Restore(ctx, e.Spec("ok-torn"), dir); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Restore with a torn vm.json: %v, want ErrNotFound", err)
	}
	os.WriteFile(filepath.Join(dir, snapMetaFile), []byte(strings.Replace(string(meta), `"jailed":false`, `"jailed":true`, 1)), 0o600)
	if _, err := e.d.Restore(ctx, e.Spec("ok-jailed"), dir); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("Restore of a jailed snapshot without the jailer: %v, want ErrInvalidParameter", err)
	}
	os.WriteFile(filepath.Join(dir, snapMetaFile), meta, 0o600)
	big := e.Spec("ok-big")
	big.MemoryMB = 256
	if _, err := e.d.Restore(ctx, big, dir); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("Restore with another memory size: %v, want ErrInvalidParameter", err)
	}
	for id := range map[string]bool{"ok-none": true, "ok-empty": true, "ok-nomem": true, "ok-torn": true, "ok-jailed": true, "ok-big": true} {
		assertGone(t, e, id, 0)
	}

	for id, want := range map[string]string{
		"loadfail-1": "firecracker PUT /snapshot/load: 400 Bad Request: Load snapshot error: fake failure",
		"nolisten-1": "vm not ready within 1s",
		"exit-1":     "fake failure for exit-1",
	} {
		_, err := e.d.Restore(ctx, e.Spec(id), dir)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Restore(%s) = %v, want an error saying %q", id, err, want)
		}
		var ae *APIError
		if id == "loadfail-1" && (!errors.As(err, &ae) || !errors.Is(err, errdefs.ErrInvalidParameter)) {
			t.Errorf("refused load: %v, want an *APIError wrapping ErrInvalidParameter", err)
		}
		assertGone(t, e, id, 0)
	}
	inst, err := e.d.Restore(ctx, e.Spec("ok-after"), dir)
	if err != nil {
		t.Fatalf("Restore after failed ones: %v", err)
	}
	echoes(t, inst)
}
