package guest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/guest/kernel"
	"github.com/invokex/invokex/internal/errdefs"
)

// Kernel sources and overrides.
const (
	// kernelEnv names a prebuilt vmlinux that replaces the built one.
	kernelEnv = "INVOKEX_KERNEL"
	// kernelSourceEnv names a kernel source tarball other than Debian's.
	kernelSourceEnv = "INVOKEX_KERNEL_SOURCE"
	// kernelSourcePackage is the Debian package that ships the default tarball.
	kernelSourcePackage = "linux-source-6.1"
	// kernelRecipeVersion changes whenever the build steps below change in a
	// way that changes the kernel, so old cache entries are not reused.
	kernelRecipeVersion = "invokex-kernel-1"
)

// kernelSource is the default tarball; a variable so tests can point
// elsewhere.
var kernelSource = "/usr/src/linux-source-6.1.tar.xz"

// KernelPath returns the guest kernel without building it: $INVOKEX_KERNEL
// when set, else the cached build for the current recipe and kernel source.
// ok is false when there is none (or $INVOKEX_KERNEL names no file).
func KernelPath(cacheDir string) (vmlinux string, ok bool) {
	if p := os.Getenv(kernelEnv); p != "" {
		return p, exists(p)
	}
	src, err := sourceTarball()
	if err != nil {
		return "", false
	}
	p := filepath.Join(cacheDir, "kernel", kernelHash(src), "vmlinux")
	return p, exists(p)
}

// EnsureKernel returns the guest kernel, building it into
// cacheDir/kernel/<hash>/vmlinux first if it is not cached. The hash covers
// the embedded config fragment and patches (package guest/kernel), the
// build recipe and the kernel source's version, so changing any of them
// builds a new kernel. A build takes minutes; a concurrent caller waits for
// it instead of building again. Cancelling ctx stops the build and removes
// its tree. $INVOKEX_KERNEL, when set, is returned instead (it must exist).
//
// Errors: ErrNotFound when the kernel source is not installed (Debian:
// apt-get install linux-source-6.1) or $INVOKEX_KERNEL is missing.
func EnsureKernel(ctx context.Context, cacheDir string, log *slog.Logger) (vmlinux string, err error) {
	if p := os.Getenv(kernelEnv); p != "" {
		if !exists(p) {
			return "", fmt.Errorf("%s=%s: no such file: %w", kernelEnv, p, errdefs.ErrNotFound)
		}
		return p, nil
	}
	if log == nil {
		log = slog.Default()
	}
	src, err := sourceTarball()
	if err != nil {
		return "", err
	}
	if runtime.GOARCH != "amd64" {
		return "", fmt.Errorf("building the guest kernel: only x86_64 hosts are supported, this is %s: %w",
			runtime.GOARCH, errdefs.ErrInvalidParameter)
	}
	hash := kernelHash(src)
	dir := filepath.Join(cacheDir, "kernel", hash)
	out := filepath.Join(dir, "vmlinux")
	if exists(out) {
		return out, nil
	}
	unlock, err := lock(ctx, cacheDir, "kernel-"+hash)
	if err != nil {
		return "", err
	}
	defer unlock()
	if exists(out) { // built by whoever held the lock
		return out, nil
	}
	log.Info("building the guest kernel (once; takes minutes)", "source", src.path, "version", src.version, "cache", dir)
	start := time.Now()
	if err := buildKernel(ctx, cacheDir, src, dir, log); err != nil {
		return "", fmt.Errorf("building the guest kernel in %s: %w", dir, err)
	}
	log.Info("built the guest kernel", "vmlinux", out, "duration", time.Since(start).Round(time.Second))
	return out, nil
}

// source is a kernel source tarball and the version that identifies it.
type source struct {
	path    string
	version string
}

func sourceTarball() (source, error) {
	if p := os.Getenv(kernelSourceEnv); p != "" {
		fi, err := os.Stat(p)
		if err != nil {
			return source{}, fmt.Errorf("kernel source %s=%s: %w", kernelSourceEnv, p, errdefs.ErrNotFound)
		}
		// No package manager vouches for it: its name, size and mtime stand
		// in for a version.
		return source{p, fmt.Sprintf("%s:%d:%d", filepath.Base(p), fi.Size(), fi.ModTime().Unix())}, nil
	}
	fi, err := os.Stat(kernelSource)
	if err != nil {
		return source{}, fmt.Errorf("kernel source %s missing (install the Debian package %s, or set %s or %s): %w",
			kernelSource, kernelSourcePackage, kernelSourceEnv, kernelEnv, errdefs.ErrNotFound)
	}
	v, err := exec.Command("dpkg-query", "-W", "-f=${Version}", kernelSourcePackage).Output()
	if err != nil || len(v) == 0 {
		return source{kernelSource, fmt.Sprintf("%d:%d", fi.Size(), fi.ModTime().Unix())}, nil
	}
	return source{kernelSource, kernelSourcePackage + "=" + string(v)}, nil
}

// kernelHash names the cache entry for the embedded recipe and src.
func kernelHash(src source) string {
	parts := [][]byte{[]byte(kernelRecipeVersion), []byte(src.version), kernel.Config()}
	for _, p := range kernel.Patches() {
		parts = append(parts, []byte(p.Name), p.Data)
	}
	return digest(parts...)[:16]
}

// buildKernel extracts src under cacheDir, configures, builds and copies
// vmlinux and .config into dir. The build tree is removed on every path.
func buildKernel(ctx context.Context, cacheDir string, src source, dir string, log *slog.Logger) error {
	if err := os.MkdirAll(filepath.Join(cacheDir, "kernel"), 0o755); err != nil {
		return fmt.Errorf("creating kernel cache: %w", err)
	}
	work, err := os.MkdirTemp(filepath.Join(cacheDir, "kernel"), "build-")
	if err != nil {
		return fmt.Errorf("creating build directory: %w", err)
	}
	defer os.RemoveAll(work)
	buildLog, err := os.Create(filepath.Join(work, "build.log"))
	if err != nil {
		return err
	}
	defer buildLog.Close()

	log.Info("extracting and configuring the kernel source", "dir", work)
	tree, cfg, err := configureKernel(ctx, work, src, buildLog)
	if err != nil {
		return err
	}
	log.Info("compiling the guest kernel", "jobs", runtime.NumCPU())
	if err := run(ctx, buildLog, tree, kbuildEnv(), "make", "-j"+strconv.Itoa(runtime.NumCPU()), "vmlinux"); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(dir, "config"), cfg, 0o644); err != nil {
		return err
	}
	// vmlinux last: its presence marks the entry complete.
	return copyFile(filepath.Join(tree, "vmlinux"), filepath.Join(dir, "vmlinux"), 0o644)
}

// kbuildEnv is the environment of every make: x86_64, and a reproducible
// build (no host name, user or time in the image).
func kbuildEnv() []string {
	return append(os.Environ(), "ARCH=x86_64", "KBUILD_BUILD_USER=invokex",
		"KBUILD_BUILD_HOST=invokex", "KBUILD_BUILD_TIMESTAMP=2024-01-01")
}

// configureKernel extracts src into work/linux, applies the patches and
// makes the .config (tinyconfig + fragment + olddefconfig). It fails if an
// option of the fragment did not take effect.
func configureKernel(ctx context.Context, work string, src source, buildLog io.Writer) (tree string, config []byte, err error) {
	if err := run(ctx, buildLog, work, nil, "tar", "-xf", src.path, "--strip-components=1", "--one-top-level=linux"); err != nil {
		return "", nil, err
	}
	tree = filepath.Join(work, "linux")
	for _, p := range kernel.Patches() {
		pf := filepath.Join(work, p.Name)
		if err := os.WriteFile(pf, p.Data, 0o644); err != nil {
			return "", nil, err
		}
		if err := run(ctx, buildLog, tree, nil, "patch", "-p1", "--forward", "-i", pf); err != nil {
			return "", nil, fmt.Errorf("applying %s: %w", p.Name, err)
		}
	}
	frag := filepath.Join(work, kernel.ConfigName)
	if err := os.WriteFile(frag, kernel.Config(), 0o644); err != nil {
		return "", nil, err
	}
	steps := [][]string{
		{"make", "tinyconfig"},
		{"scripts/kconfig/merge_config.sh", "-m", ".config", frag},
		{"make", "olddefconfig"},
	}
	for _, s := range steps {
		if err := run(ctx, buildLog, tree, kbuildEnv(), s[0], s[1:]...); err != nil {
			return "", nil, err
		}
	}
	cfg, err := os.ReadFile(filepath.Join(tree, ".config"))
	if err != nil {
		return "", nil, err
	}
	if missing := unmetOptions(kernel.Config(), cfg); len(missing) > 0 {
		// Kconfig silently drops options whose dependencies are unmet; a
		// kernel without virtio-mmio would boot to nothing, so fail here.
		return "", nil, fmt.Errorf("the config fragment did not take effect (unmet dependencies?): %s: %w",
			strings.Join(missing, ", "), errdefs.ErrInvalidParameter)
	}
	return tree, cfg, nil
}

// unmetOptions returns the fragment's settings that the final .config does
// not have, as "CONFIG_X=y (got n)".
func unmetOptions(fragment, config []byte) []string {
	got := parseKconfig(config)
	want := parseKconfig(fragment)
	var bad []string
	for _, k := range slices.Sorted(maps.Keys(want)) {
		w, g := want[k], got[k]
		if g == "" {
			g = "n"
		}
		if w != g {
			bad = append(bad, fmt.Sprintf("%s=%s (got %s)", k, w, g))
		}
	}
	return bad
}

// parseKconfig reads CONFIG_X=v and "# CONFIG_X is not set" (as "n") lines.
func parseKconfig(b []byte) map[string]string {
	m := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, ok := strings.CutPrefix(line, "# "); ok {
			if name, ok := strings.CutSuffix(k, " is not set"); ok && strings.HasPrefix(name, "CONFIG_") {
				m[name] = "n"
			}
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			m[k] = v
		}
	}
	return m
}
