package guest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

func TestParseAptURIs(t *testing.T) {
	deb822 := "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://mirror.example/debian\nSuites: bookworm\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
	if got := parseAptURIs([]byte(deb822)); len(got) != 2 || got[0] != "http://mirror.example/debian" {
		t.Errorf("deb822 URIs = %v", got)
	}
	legacy := "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://proxy.example/debian/ bookworm main\ndeb-src http://src.example/debian bookworm main\n"
	if got := parseAptURIs([]byte(legacy)); len(got) != 1 || got[0] != "http://proxy.example/debian/" {
		t.Errorf("one-line URIs = %v", got)
	}
}

func TestDebianMirror(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "debian.sources")
	os.WriteFile(src, []byte("Types: deb\nURIs: http://security.example/debian-security\n\nTypes: deb\nURIs: http://mirror.example/debian/\n"), 0o644)
	old := aptSources
	aptSources = []string{src}
	defer func() { aptSources = old }()
	t.Setenv(mirrorEnv, "")
	if m, err := debianMirror(); err != nil || m != "http://mirror.example/debian" {
		t.Errorf("mirror = %q, %v; want the main archive, not debian-security", m, err)
	}
	t.Setenv(mirrorEnv, "http://override.example/debian")
	if m, _ := debianMirror(); m != "http://override.example/debian" {
		t.Errorf("mirror = %q, want the override", m)
	}
	t.Setenv(mirrorEnv, "")
	aptSources = []string{filepath.Join(dir, "none")}
	if _, err := debianMirror(); err == nil && !hasSourcesD() {
		t.Error("no sources: want an error naming the variable")
	}
}

func hasSourcesD() bool {
	m, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
	return len(m) > 0
}

func TestDpkgVersion(t *testing.T) {
	status := "Package: python3.11\nStatus: install ok installed\nVersion: 3.11.2-6+deb12u6\n\nPackage: nodejs\nStatus: deinstall ok config-files\nVersion: 18.19.0\n"
	if v := dpkgVersion([]byte(status), "python3.11"); v != "3.11.2-6+deb12u6" {
		t.Errorf("python3.11 version %q", v)
	}
	if v := dpkgVersion([]byte(status), "nodejs"); v != "" {
		t.Errorf("a removed package has version %q, want none", v)
	}
}

func TestParseMountsUnder(t *testing.T) {
	mi := "22 1 254:0 / / rw - ext4 /dev/vda rw\n" +
		"30 22 0:5 / /stage/x/proc rw - proc proc rw\n" +
		"31 22 0:6 / /stage/x/my\\040dir rw - tmpfs t rw\n" +
		"32 22 0:7 / /stage/xy rw - tmpfs t rw\n"
	got, err := parseMountsUnder(strings.NewReader(mi), "/stage/x")
	if err != nil || len(got) != 2 || got[0] != "/stage/x/proc" || got[1] != "/stage/x/my dir" {
		t.Errorf("mounts under /stage/x = %q, %v", got, err)
	}
}

func TestBuildRootNoRecipe(t *testing.T) {
	rt := &runtimes.Runtime{ID: "python3.12", Family: runtimes.FamilyPython}
	_, err := BuildRoot(context.Background(), t.TempDir(), rt, nil)
	if !errors.Is(err, errdefs.ErrInvalidRuntime) || !strings.Contains(err.Error(), "import") {
		t.Errorf("BuildRoot without a recipe: %v, want ErrInvalidRuntime suggesting an import", err)
	}
}

// TestBuildRootDebian debootstraps real roots (minutes, network): only
// with INVOKEX_BUILD_ROOTS=1, into the shared cache so later runs and the
// QEMU driver reuse them.
func TestBuildRootDebian(t *testing.T) {
	if os.Getenv("INVOKEX_BUILD_ROOTS") != "1" {
		t.Skip("set INVOKEX_BUILD_ROOTS=1 to debootstrap the Debian runtime roots (minutes, needs the network)")
	}
	if os.Geteuid() != 0 {
		t.Skip("debootstrap needs root")
	}
	ids := strings.Fields(os.Getenv("INVOKEX_BUILD_ROOTS_IDS"))
	if len(ids) == 0 {
		ids = []string{"python3.11", "nodejs18.x"}
	}
	for _, id := range ids {
		t.Run(id, func(t *testing.T) {
			rec, _ := DebianRecipe(id)
			fam := runtimes.FamilyPython
			if strings.HasPrefix(id, "nodejs") {
				fam = runtimes.FamilyNode
			}
			rt := &runtimes.Runtime{ID: id, Family: fam, Interpreter: rec.Interpreter}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
			defer cancel()
			tree, err := BuildRoot(ctx, DefaultCacheDir(), rt, nil)
			if err != nil {
				t.Fatal(err)
			}
			r, err := openTree(tree)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if !r.isExecutable(rec.Interpreter) {
				t.Errorf("%s has no %s", tree, rec.Interpreter)
			}
			img, err := RootImage(ctx, DefaultCacheDir(), rt, buildStatic(t))
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := os.Stat(img)
			t.Logf("%s: tree %s, image %s (%d MiB)", id, tree, img, fi.Size()>>20)
		})
	}
}
