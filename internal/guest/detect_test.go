package guest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/runtimes"
)

func detected(t *testing.T, cacheDir string) map[string]*runtimes.Runtime {
	t.Helper()
	m := map[string]*runtimes.Runtime{}
	for _, rt := range DetectRuntimes(context.Background(), cacheDir) {
		m[rt.ID] = rt
	}
	return m
}

func TestDetectRuntimes(t *testing.T) {
	cache := t.TempDir()
	rts := detected(t, cache)
	if rt := rts["provided.al2023"]; rt == nil || !rt.Available {
		t.Errorf("provided.al2023: %+v", rt)
	}
	// Debian packages it: available whatever the host has, with the
	// interpreter where the Debian root will have it.
	if rt := rts["nodejs18.x"]; rt == nil || !rt.Available || rt.Interpreter != "/usr/bin/node" ||
		len(rt.Bootstrap) != 2 || rt.Bootstrap[0] != "/usr/bin/node" || !strings.HasPrefix(rt.Bootstrap[1], "/var/runtime/") {
		t.Errorf("nodejs18.x: %+v", rt)
	}
	// Debian does not: unavailable until a root is imported.
	rt := rts["python3.12"]
	if rt == nil || rt.Available || !strings.Contains(rt.Reason, "import") {
		t.Fatalf("python3.12 without a root: %+v", rt)
	}

	// An imported root with the interpreter in /usr/local.
	tree := filepath.Join(cache, "roots", "python3.12", "imported-1")
	bin := filepath.Join(tree, "usr", "local", "bin", "python3.12")
	if err := os.MkdirAll(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, []byte("\x7fELF"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := setCurrentRoot(cache, "python3.12", tree); err != nil {
		t.Fatal(err)
	}
	if rt := detected(t, cache)["python3.12"]; !rt.Available || rt.Interpreter != "/usr/local/bin/python3.12" {
		t.Fatalf("python3.12 with an imported root: %+v", rt)
	}

	// A root without a usable interpreter says so.
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if rt := detected(t, cache)["python3.12"]; rt.Available || !strings.Contains(rt.Reason, "no python3.12 interpreter") {
		t.Fatalf("python3.12 with an empty root: %+v", rt)
	}
}
