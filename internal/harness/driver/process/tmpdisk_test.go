package process

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
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

// TestTmpIsADisk: a sandbox's /tmp is an image in its state directory on
// a loop device, made from the size's template; Stop detaches the device
// and removes the image, and a new driver's Recover leaves the templates
// alone.
func TestTmpIsADisk(t *testing.T) {
	requireRoot(t)
	stateDir := t.TempDir()
	d := newTestDriver(t, Options{StateDir: stateDir, WarmSandboxes: -1})
	if d.tmp == nil {
		t.Skipf("skipping: no disk-backed /tmp on this host: %v", d.Describe())
	}
	spec := testSpec(t)
	spec.EphemeralMB = 64
	inst := startInstance(t, d, spec)
	image := filepath.Join(stateDir, spec.ID, tmpDiskFile)
	if got := loopFilesUnder(t, stateDir); !slices.Equal(got, []string{image}) {
		t.Fatalf("loop devices over the state directory: %v, want [%s]", got, image)
	}
	if fi, err := os.Stat(image); err != nil || fi.Size() != 64<<20 {
		t.Fatalf("/tmp image: %v, %v; want a file of 64 MiB", fi, err)
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
