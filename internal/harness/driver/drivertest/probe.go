package drivertest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// probePackage is the test function every driver test deploys.
const probePackage = "github.com/invokex/invokex/internal/testfunc/probe"

var probe struct {
	once sync.Once
	dir  string
	err  error
}

// BuildProbe builds internal/testfunc/probe as a static "bootstrap" and
// returns the directory holding it, usable as Spec.CodeDir. It builds once
// per test process. The directory is a content-addressed cache under the
// system temp dir (keyed by the probe's source, go.mod, go.sum and the Go
// version), so it is shared by test processes and never grows per run; it
// is world-readable because the sandbox user must execute the bootstrap.
func BuildProbe(t testing.TB) (codeDir string) {
	t.Helper()
	probe.once.Do(func() { probe.dir, probe.err = buildProbe() })
	if probe.err != nil {
		t.Fatalf("building the probe function: %v", probe.err)
	}
	return probe.dir
}

func buildProbe() (string, error) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}\n{{.Module.Dir}}", probePackage).Output()
	if err != nil {
		return "", fmt.Errorf("locating %s: %w", probePackage, err)
	}
	dirs := strings.Fields(string(out))
	if len(dirs) != 2 {
		return "", fmt.Errorf("locating %s: unexpected go list output %q", probePackage, out)
	}
	pkgDir, modDir := dirs[0], dirs[1]
	h := sha256.New()
	fmt.Fprintln(h, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	srcs, _ := filepath.Glob(filepath.Join(pkgDir, "*.go"))
	for _, f := range append(srcs, filepath.Join(modDir, "go.mod"), filepath.Join(modDir, "go.sum")) {
		b, err := os.ReadFile(f)
		if err != nil && !os.IsNotExist(err) {
			return "", fmt.Errorf("hashing probe sources: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	dir := filepath.Join(os.TempDir(), "invokex-probe", hex.EncodeToString(h.Sum(nil))[:16])
	bin := filepath.Join(dir, "bootstrap")
	if _, err := os.Stat(bin); err == nil {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating probe directory: %w", err)
	}
	// MkdirAll honours the umask; the sandbox user needs to enter both.
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			return "", fmt.Errorf("opening probe directory: %w", err)
		}
	}
	// Build next to the target and rename: concurrent test processes
	// never see a half-written bootstrap.
	tmp, err := os.CreateTemp(dir, ".bootstrap-*")
	if err != nil {
		return "", fmt.Errorf("creating probe binary: %w", err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name())
	cmd := exec.Command("go", "build", "-o", tmp.Name(), probePackage)
	cmd.Dir = modDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", probePackage, err, out)
	}
	if err := os.Chmod(tmp.Name(), 0o755); err != nil {
		return "", fmt.Errorf("making probe executable: %w", err)
	}
	if err := os.Rename(tmp.Name(), bin); err != nil {
		return "", fmt.Errorf("installing probe binary: %w", err)
	}
	return dir, nil
}
