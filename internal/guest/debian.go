package guest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

// Recipe is how BuildRoot makes a runtime's root from Debian packages:
// debootstrap's minbase variant of Suite plus Packages.
type Recipe struct {
	Suite    string
	Packages []string
	// Interpreter is the interpreter's path in the root; the runtimes DB's
	// Interpreter must be the same path for the bootstrap command to work.
	Interpreter string
	// Package is the interpreter's package, whose version must start with
	// Version.
	Package string
	Version string
}

// debianRootVersion changes when BuildRoot's steps change.
const debianRootVersion = "debian-root-1"

// debianRecipes maps runtime identifiers to the Debian release that ships
// exactly that interpreter version. Other versions (python3.12, nodejs22.x
// ...) have no Debian package: import a root for them (ImportRoot).
var debianRecipes = map[string]Recipe{
	"python3.11": {Suite: "bookworm", Packages: []string{"python3.11", "ca-certificates"},
		Interpreter: "/usr/bin/python3.11", Package: "python3.11", Version: "3.11."},
	"python3.13": {Suite: "trixie", Packages: []string{"python3.13", "ca-certificates"},
		Interpreter: "/usr/bin/python3.13", Package: "python3.13", Version: "3.13."},
	"nodejs18.x": {Suite: "bookworm", Packages: []string{"nodejs", "ca-certificates"},
		Interpreter: "/usr/bin/node", Package: "nodejs", Version: "18."},
	"nodejs20.x": {Suite: "trixie", Packages: []string{"nodejs", "ca-certificates"},
		Interpreter: "/usr/bin/node", Package: "nodejs", Version: "20."},
}

// DebianRecipe returns the recipe BuildRoot uses for runtimeID.
func DebianRecipe(runtimeID string) (Recipe, bool) {
	r, ok := debianRecipes[runtimeID]
	return r, ok
}

// mirrorEnv overrides the Debian mirror taken from apt's sources.
const mirrorEnv = "INVOKEX_DEBIAN_MIRROR"

// aptSources are read for the host's Debian mirror.
var aptSources = []string{"/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"}

// debianMirror returns $INVOKEX_DEBIAN_MIRROR, else the first Debian
// archive URI in the host's apt sources: whatever mirror (or proxy) the
// host's own apt uses is the one known to be reachable.
func debianMirror() (string, error) {
	if m := os.Getenv(mirrorEnv); m != "" {
		return m, nil
	}
	var found []string
	for _, p := range aptSources {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		found = append(found, parseAptURIs(b)...)
	}
	if len(found) == 0 {
		matches, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources")
		for _, p := range matches {
			if b, err := os.ReadFile(p); err == nil {
				found = append(found, parseAptURIs(b)...)
			}
		}
	}
	for _, u := range found {
		pu, err := url.Parse(u)
		if err != nil || (pu.Scheme != "http" && pu.Scheme != "https") {
			continue
		}
		// The main archive, not debian-security or a third-party repo.
		if strings.TrimSuffix(pu.Path, "/") == "/debian" || strings.HasSuffix(strings.TrimSuffix(pu.Path, "/"), "/debian") {
			return strings.TrimSuffix(u, "/"), nil
		}
	}
	return "", fmt.Errorf("no Debian mirror in apt's sources; set %s: %w", mirrorEnv, errdefs.ErrNotFound)
}

// parseAptURIs returns the URIs of one-line ("deb URI suite ...") and
// deb822 ("URIs: ...") apt sources, in order.
func parseAptURIs(b []byte) []string {
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		if v, ok := strings.CutPrefix(line, "URIs:"); ok {
			out = append(out, strings.Fields(v)...)
			continue
		}
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "deb" {
			i := 1
			for i < len(f) && strings.HasPrefix(f[i], "[") { // [arch=... signed-by=...]
				for i < len(f) && !strings.HasSuffix(f[i], "]") {
					i++
				}
				i++
			}
			if i < len(f) {
				out = append(out, f[i])
			}
		}
	}
	return out
}

// BuildRoot builds (or finds cached) the Debian root tree for rt with
// debootstrap and makes it the tree RootImage uses for rt.ID. It needs
// root, debootstrap and the network; it takes minutes once per recipe.
// The tree's interpreter package must have the runtime's version.
//
// Errors: ErrInvalidRuntime when there is no Debian recipe for rt (import a
// root instead), ErrUnavailable when debootstrap or root is missing.
func BuildRoot(ctx context.Context, cacheDir string, rt *runtimes.Runtime, log *slog.Logger) (string, error) {
	if log == nil {
		log = slog.Default()
	}
	rec, ok := DebianRecipe(rt.ID)
	if !ok {
		return "", fmt.Errorf("no Debian recipe for runtime %s (have %s); import a root tree or OCI image for it: %w",
			rt.ID, strings.Join(slices.Sorted(maps.Keys(debianRecipes)), ", "), errdefs.ErrInvalidRuntime)
	}
	parts := [][]byte{[]byte(debianRootVersion), []byte(rt.ID), []byte(rec.Suite)}
	for _, p := range rec.Packages {
		parts = append(parts, []byte(p))
	}
	dir := filepath.Join(cacheDir, "roots", rt.ID)
	tree := filepath.Join(dir, "debian-"+digest(parts...)[:16])
	if treeDirExists(tree) {
		return tree, setCurrentRoot(cacheDir, rt.ID, tree)
	}
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("building the %s root with debootstrap needs root: %w", rt.ID, errdefs.ErrUnavailable)
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", fmt.Errorf("building the %s root: debootstrap is not installed: %w", rt.ID, errdefs.ErrUnavailable)
	}
	mirror, err := debianMirror()
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	unlock, err := lock(ctx, cacheDir, "root-"+rt.ID)
	if err != nil {
		return "", err
	}
	defer unlock()
	if treeDirExists(tree) {
		return tree, setCurrentRoot(cacheDir, rt.ID, tree)
	}
	log.Info("building a runtime root with debootstrap (once; takes minutes)", "runtime", rt.ID, "suite", rec.Suite, "packages", rec.Packages)
	start := time.Now()
	stage, err := os.MkdirTemp(dir, ".stage-")
	if err != nil {
		return "", err
	}
	defer removeStage(stage)
	// MkdirTemp's 0700 would make / untraversable for the sandbox user.
	if err := os.Chmod(stage, 0o755); err != nil {
		return "", err
	}
	if err := debootstrap(ctx, rec, mirror, stage); err != nil {
		return "", fmt.Errorf("building the %s root: %w", rt.ID, err)
	}
	if err := finishDebianRoot(stage, rec); err != nil {
		return "", fmt.Errorf("building the %s root: %w", rt.ID, err)
	}
	if err := os.Rename(stage, tree); err != nil {
		return "", fmt.Errorf("installing the %s root: %w", rt.ID, err)
	}
	log.Info("built a runtime root", "runtime", rt.ID, "tree", tree, "duration", time.Since(start).Round(time.Second))
	return tree, setCurrentRoot(cacheDir, rt.ID, tree)
}

// debootstrap runs debootstrap in a private mount namespace: the /proc
// and /sys it mounts in the target vanish with it even when it is killed,
// so removing a failed tree can never reach into the host's /proc or /dev.
func debootstrap(ctx context.Context, rec Recipe, mirror, target string) error {
	args := []string{"--mount", "--propagation", "private", "--",
		"debootstrap", "--variant=minbase", "--components=main",
		"--include=" + strings.Join(rec.Packages, ","),
		rec.Suite, target, mirror}
	env := append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	return run(ctx, nil, "", env, "unshare", args...)
}

// debianTrim is what a function never needs from a Debian root.
var debianTrim = []string{
	"var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
	"usr/share/info", "usr/share/locale", "var/log", "debootstrap",
}

// finishDebianRoot checks the interpreter, trims the tree and prepares it
// for vminit.
func finishDebianRoot(stage string, rec Recipe) error {
	r, err := openTree(stage)
	if err != nil {
		return err
	}
	defer r.Close()
	status, err := r.readFile("var/lib/dpkg/status")
	if err != nil {
		return err
	}
	v := dpkgVersion(status, rec.Package)
	if !strings.HasPrefix(v, rec.Version) {
		return fmt.Errorf("debootstrap installed %s %q, want version %s*: %w", rec.Package, v, rec.Version, errdefs.ErrInvalidRuntime)
	}
	if !r.isExecutable(rec.Interpreter) {
		return fmt.Errorf("the tree has no executable %s: %w", rec.Interpreter, errdefs.ErrInvalidRuntime)
	}
	for _, d := range debianTrim {
		fd, err := r.open(d, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil {
			continue // absent
		}
		err = clearDir(fd)
		closeFD(fd)
		if err != nil {
			return fmt.Errorf("trimming /%s: %w", d, err)
		}
	}
	return prepareTree(r)
}

// dpkgVersion returns pkg's Version in a dpkg status file ("" if absent).
func dpkgVersion(status []byte, pkg string) string {
	for _, para := range strings.Split(string(status), "\n\n") {
		var name, version string
		installed := false
		for _, l := range strings.Split(para, "\n") {
			switch {
			case strings.HasPrefix(l, "Package: "):
				name = strings.TrimSpace(l[len("Package: "):])
			case strings.HasPrefix(l, "Version: "):
				version = strings.TrimSpace(l[len("Version: "):])
			case strings.HasPrefix(l, "Status: "):
				installed = strings.HasSuffix(strings.TrimSpace(l), " installed")
			}
		}
		if name == pkg && installed {
			return version
		}
	}
	return ""
}

// removeStage removes a build tree, first detaching anything still mounted
// inside it (defence in depth: debootstrap runs in its own mount
// namespace), so that removal never descends into a mounted file system.
func removeStage(stage string) {
	if mounts, err := mountsUnder(stage); err == nil {
		for i := len(mounts) - 1; i >= 0; i-- {
			_ = unix.Unmount(mounts[i], unix.MNT_DETACH)
		}
		if len(mounts) > 0 {
			if again, _ := mountsUnder(stage); len(again) > 0 {
				return // leave it rather than risk the host
			}
		}
	}
	_ = os.RemoveAll(stage)
}

// mountsUnder lists mount points at or below dir, in mount order.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseMountsUnder(f, dir)
}

func parseMountsUnder(r io.Reader, dir string) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// treeDirExists reports whether dir exists and is a directory.
func treeDirExists(dir string) bool {
	fi, err := os.Stat(dir)
	return err == nil && fi.IsDir()
}
