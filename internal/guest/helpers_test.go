package guest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

var staticBin struct {
	once sync.Once
	path string
	err  error
	out  []byte
}

// buildStatic builds testdata/static with CGO_ENABLED=0, once per test
// process, and returns the binary.
func buildStatic(t *testing.T) string {
	t.Helper()
	staticBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "guest-static-")
		if err != nil {
			staticBin.err = err
			return
		}
		staticBin.path = filepath.Join(dir, "static")
		cmd := exec.Command("go", "build", "-o", staticBin.path, "./testdata/static")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		staticBin.out, staticBin.err = cmd.CombinedOutput()
	})
	if staticBin.err != nil {
		t.Fatalf("building the static test binary: %v\n%s", staticBin.err, staticBin.out)
	}
	return staticBin.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if staticBin.path != "" {
		os.RemoveAll(filepath.Dir(staticBin.path))
	}
	os.Exit(code)
}

// requireTools skips unless the e2fsprogs tools the images need exist.
func requireTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (e2fsprogs)", tool)
		}
	}
}

// debugfs runs one debugfs request against an image, read-only, and
// returns its output (the banner on stderr is dropped).
func debugfs(t *testing.T, image, request string) string {
	t.Helper()
	cmd := exec.Command("debugfs", "-R", request, image)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("debugfs -R %q %s: %v", request, image, err)
	}
	return string(out)
}

// imageNames lists the names in a directory of an image.
func imageNames(t *testing.T, image, dir string) []string {
	t.Helper()
	out := debugfs(t, image, "ls -p "+dir)
	var names []string
	// ls -p prints /inode/mode/uid/gid/name/size/ per entry.
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "/")
		if len(f) >= 6 && f[5] != "." && f[5] != ".." {
			names = append(names, f[5])
		}
	}
	return names
}

// imageStat returns "mode uid gid size" style facts of one path.
type imageEntry struct {
	mode, uid, gid, size string
}

func imageStat(t *testing.T, image, dir, name string) (imageEntry, bool) {
	t.Helper()
	out := debugfs(t, image, "ls -p "+dir)
	for _, line := range strings.Split(out, "\n") {
		f := strings.Split(line, "/")
		if len(f) >= 7 && f[5] == name {
			return imageEntry{mode: f[2], uid: f[3], gid: f[4], size: f[6]}, true
		}
	}
	return imageEntry{}, false
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
