package process

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// loopFilesUnder lists the backing files of the host's loop devices that
// lie under dir.
func loopFilesUnder(t *testing.T, dir string) []string {
	t.Helper()
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var files []string
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // detached meanwhile
		}
		if f := strings.TrimSpace(string(b)); strings.HasPrefix(f, dir+"/") {
			files = append(files, f)
		}
	}
	return files
}

// newTmpDiskDriver is a driver with warm sandboxes on a fresh state
// directory, skipping t where the driver cannot make /tmp a disk.
func newTmpDiskDriver(t *testing.T, warm int) (*Driver, string) {
	t.Helper()
	requireRoot(t)
	stateDir := t.TempDir()
	d := newTestDriver(t, Options{StateDir: stateDir, WarmSandboxes: warm})
	if d.tmp == nil {
		t.Skipf("skipping: no disk-backed /tmp on this host: %v", d.Describe())
	}
	return d, stateDir
}

// TestTmpIsADisk: a sandbox's /tmp is an image in its state directory on
// a loop device, made from the size's template; Stop detaches the device
// and removes the image, and a new driver's Recover leaves the templates
// alone.
func TestTmpIsADisk(t *testing.T) {
	d, stateDir := newTmpDiskDriver(t, -1)
	spec := testSpec(t)
	spec.EphemeralMB = 64
	inst := startInstance(t, d, spec)
	image := filepath.Join(stateDir, spec.ID, tmpDiskName(64))
	if got := loopFilesUnder(t, stateDir); !slices.Equal(got, []string{image}) {
		t.Fatalf("loop devices over the state directory: %v, want [%s]", got, image)
	}
	if fi, err := os.Stat(image); err != nil || fi.Size() != 64<<20 {
		t.Fatalf("/tmp image: %v, %v; want a file of 64 MiB", fi, err)
	}
	// Seen through the sandbox init's root: an empty ext4 of mode 1777
	// (no lost+found).
	tmp := filepath.Join("/proc", strconv.Itoa(inst.PID()), "root", "tmp")
	var st unix.Statfs_t
	if err := unix.Statfs(tmp, &st); err != nil || st.Type != unix.EXT4_SUPER_MAGIC {
		t.Errorf("the sandbox's /tmp is of type %#x (%v), want ext4", st.Type, err)
	}
	if ents, err := os.ReadDir(tmp); err != nil || len(ents) != 0 {
		t.Errorf("the sandbox's /tmp holds %v (%v), want nothing", ents, err)
	}
	if fi, err := os.Stat(tmp); err != nil || fi.Mode()&(os.ModePerm|os.ModeSticky) != 0o777|os.ModeSticky {
		t.Errorf("the sandbox's /tmp: %v, %v; want mode 1777", fi, err)
	}
	template := filepath.Join(stateDir, tmpTemplatesDir, "64.ext4")
	if _, err := os.Stat(template); err != nil {
		t.Errorf("no template of the size: %v", err)
	}
	if err := d.Stop(context.Background(), inst.ID()); err != nil {
		t.Fatal(err)
	}
	// The device clears itself once the sandbox's mount namespace is gone,
	// which the kernel finishes in the background.
	for deadline := time.Now().Add(10 * time.Second); len(loopFilesUnder(t, stateDir)) > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("loop devices left after Stop: %v", loopFilesUnder(t, stateDir))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(image); !os.IsNotExist(err) {
		t.Errorf("/tmp image left after Stop: %v", err)
	}
	if _, err := d.Recover(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(template); err != nil {
		t.Errorf("Recover removed the template: %v", err)
	}
}

// TestWarmSandboxStagesTmp: a warm sandbox mounts its /tmp while it waits,
// and an instance of that size uses it as is; an instance of a size no
// warm sandbox has gets a sandbox started with an image of its size.
func TestWarmSandboxStagesTmp(t *testing.T) {
	d, stateDir := newTmpDiskDriver(t, 1)
	spec := testSpec(t)
	spec.EphemeralMB = 64
	startInstance(t, d, spec) // learns the shape; the pool fills
	warm := waitWarm(t, d, 1)[0]
	staged := filepath.Join(warm.dir, tmpDiskName(64))
	awaitLoops := func(want func([]string) bool, what string) []string {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; {
			got := loopFilesUnder(t, stateDir)
			if want(got) {
				return got
			}
			if time.Now().After(deadline) {
				t.Fatalf("loop devices %v: want %s", got, what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	awaitLoops(func(l []string) bool { return slices.Contains(l, staged) }, "the warm sandbox's staged /tmp "+staged)

	// Same size: the warm sandbox's device, now under the instance's name.
	same := testSpec(t)
	same.EphemeralMB = 64
	inst := startInstance(t, d, same)
	if inst.sb.name != same.ID || inst.sb.tmpMB != 64 {
		t.Fatalf("instance %s runs in %s with a %d MiB staged /tmp, want the warm sandbox's 64", same.ID, inst.sb.name, inst.sb.tmpMB)
	}
	awaitLoops(func(l []string) bool {
		return slices.Contains(l, filepath.Join(stateDir, same.ID, tmpDiskName(64))) && !slices.Contains(l, staged)
	}, "the staged device under "+same.ID)

	// Another size, which no warm sandbox has: a sandbox of its own,
	// started with its image.
	other := testSpec(t)
	other.EphemeralMB = 32
	inst2 := startInstance(t, d, other)
	img := filepath.Join(stateDir, other.ID, tmpDiskName(32))
	if fi, err := os.Stat(img); err != nil || fi.Size() != 32<<20 || inst2.sb.tmpMB != 32 {
		t.Fatalf("/tmp image of the 32 MiB instance: %v, %v (staged %d MiB)", fi, err, inst2.sb.tmpMB)
	}
	awaitLoops(func(l []string) bool { return slices.Contains(l, img) }, "a device over "+img)
}

// TestSmallTmpIsATmpfs: a /tmp under minTmpDiskMB is a tmpfs (mkfs's
// floor); it takes no loop device.
func TestSmallTmpIsATmpfs(t *testing.T) {
	d, stateDir := newTmpDiskDriver(t, -1)
	spec := testSpec(t)
	spec.EphemeralMB = minTmpDiskMB - 1
	inst := startInstance(t, d, spec)
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Join("/proc", strconv.Itoa(inst.PID()), "root", "tmp"), &st); err != nil || st.Type != unix.TMPFS_MAGIC {
		t.Errorf("a %d MiB /tmp is of type %#x (%v), want a tmpfs", spec.EphemeralMB, st.Type, err)
	}
	if l := loopFilesUnder(t, stateDir); len(l) != 0 {
		t.Errorf("loop devices over the state directory: %v", l)
	}
}
