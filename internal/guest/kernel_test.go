package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/guest/kernel"
	"github.com/invokex/invokex/internal/errdefs"
)

func TestParseKconfig(t *testing.T) {
	m := parseKconfig([]byte("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=n\nnoise\n"))
	want := map[string]string{"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": `"x y"`, "CONFIG_D": "n"}
	if len(m) != len(want) {
		t.Fatalf("parsed %v, want %v", m, want)
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %q, want %q", k, m[k], v)
		}
	}
}

func TestUnmetOptions(t *testing.T) {
	frag := []byte("CONFIG_VIRTIO_MMIO=y\nCONFIG_PCI=n\nCONFIG_MODULES=n\nCONFIG_NAME=\"x\"\n")
	good := []byte("CONFIG_VIRTIO_MMIO=y\n# CONFIG_PCI is not set\nCONFIG_NAME=\"x\"\n") // MODULES absent = n
	if bad := unmetOptions(frag, good); len(bad) != 0 {
		t.Errorf("unmet in a matching config: %v", bad)
	}
	worse := []byte("# CONFIG_VIRTIO_MMIO is not set\nCONFIG_PCI=y\nCONFIG_NAME=\"y\"\n")
	bad := unmetOptions(frag, worse)
	if len(bad) != 3 {
		t.Fatalf("unmet = %v, want VIRTIO_MMIO, PCI and NAME", bad)
	}
	if !strings.Contains(strings.Join(bad, " "), "CONFIG_VIRTIO_MMIO=y (got n)") {
		t.Errorf("unmet = %v, want the dropped option named with what it became", bad)
	}
}

// TestFragmentEssentials guards the options without which the guest does
// not boot under QEMU microvm and Firecracker, or the agent cannot run.
func TestFragmentEssentials(t *testing.T) {
	m := parseKconfig(kernel.Config())
	for _, k := range []string{
		"CONFIG_64BIT", "CONFIG_PVH", "CONFIG_VIRTIO_MMIO", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
		"CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_VSOCKETS",
		"CONFIG_HW_RANDOM_VIRTIO", "CONFIG_EXT4_FS", "CONFIG_TMPFS", "CONFIG_DEVTMPFS_MOUNT",
		"CONFIG_SERIAL_8250_CONSOLE", "CONFIG_UNIX", "CONFIG_INET", "CONFIG_EPOLL", "CONFIG_FUTEX",
		"CONFIG_BINFMT_ELF", "CONFIG_BINFMT_SCRIPT", "CONFIG_KERNEL_LZ4", "CONFIG_MULTIUSER",
	} {
		if m[k] != "y" {
			t.Errorf("%s = %q in the fragment, want y", k, m[k])
		}
	}
	for _, k := range []string{"CONFIG_MODULES", "CONFIG_PCI"} {
		if m[k] != "n" {
			t.Errorf("%s = %q in the fragment, want n", k, m[k])
		}
	}
	// Each patch, by what it changes.
	want := map[string]string{
		"no-initmem-poison.patch":     "POISON_FREE_INITMEM",
		"virtio-console-inbufs.patch": "VIRTCONS_MAX_INBUFS",
		"lapic-timer-period.patch":    `early_param("lapic_timer_period"`,
	}
	var names []string
	for _, p := range kernel.Patches() {
		names = append(names, p.Name)
		if marker, ok := want[p.Name]; ok {
			if !strings.Contains(string(p.Data), marker) {
				t.Errorf("%s lacks %q", p.Name, marker)
			}
			delete(want, p.Name)
		}
	}
	for name := range want {
		t.Errorf("patches %q: want %s", names, name)
	}
}

func TestKernelHash(t *testing.T) {
	a := kernelHash(source{path: "x", version: "6.1.1"})
	if a != kernelHash(source{path: "y", version: "6.1.1"}) {
		t.Error("the hash depends on the tarball's path, want only on its version")
	}
	if a == kernelHash(source{path: "x", version: "6.1.2"}) {
		t.Error("a new kernel source version kept the old hash")
	}
}

func TestKernelOverride(t *testing.T) {
	cache := t.TempDir()
	vmlinux := filepath.Join(t.TempDir(), "vmlinux")
	if err := os.WriteFile(vmlinux, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(kernelEnv, vmlinux)
	if p, ok := KernelPath(cache); !ok || p != vmlinux {
		t.Errorf("KernelPath = %q, %v; want the override %q", p, ok, vmlinux)
	}
	p, err := EnsureKernel(context.Background(), cache, nil)
	if err != nil || p != vmlinux {
		t.Errorf("EnsureKernel = %q, %v; want the override", p, err)
	}
	t.Setenv(kernelEnv, vmlinux+".missing")
	if _, ok := KernelPath(cache); ok {
		t.Error("KernelPath reported a missing override as present")
	}
	if _, err := EnsureKernel(context.Background(), cache, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("EnsureKernel with a missing override: %v, want ErrNotFound", err)
	}
}

func TestKernelPathCached(t *testing.T) {
	t.Setenv(kernelEnv, "")
	dir := t.TempDir()
	tarball := filepath.Join(dir, "linux.tar.xz")
	if err := os.WriteFile(tarball, []byte("source"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv(kernelSourceEnv, tarball)
	cache := t.TempDir()
	p, ok := KernelPath(cache)
	if ok {
		t.Fatalf("KernelPath found %s in an empty cache", p)
	}
	if !strings.HasPrefix(p, filepath.Join(cache, "kernel")+"/") || filepath.Base(p) != "vmlinux" {
		t.Fatalf("KernelPath = %s, want cache/kernel/<hash>/vmlinux", p)
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, ok := KernelPath(cache); !ok || got != p {
		t.Errorf("KernelPath = %s, %v after the build, want %s", got, ok, p)
	}
	// EnsureKernel returns the cached kernel without building (the fake
	// tarball could not be built).
	if got, err := EnsureKernel(context.Background(), cache, nil); err != nil || got != p {
		t.Errorf("EnsureKernel = %s, %v; want the cached %s", got, err, p)
	}
	t.Setenv(kernelSourceEnv, filepath.Join(dir, "missing.tar.xz"))
	if _, err := EnsureKernel(context.Background(), cache, nil); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("EnsureKernel without a source: %v, want ErrNotFound", err)
	}
}

// TestEnsureKernelCancelled starts a real build and cancels it: the build
// tree must be gone afterwards. It needs the kernel source.
func TestEnsureKernelCancelled(t *testing.T) {
	t.Setenv(kernelEnv, "")
	if _, err := os.Stat(kernelSource); err != nil {
		t.Skipf("no kernel source at %s", kernelSource)
	}
	cache := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := EnsureKernel(ctx, cache, nil)
		done <- err
	}()
	// Cancel once the build tree exists (extraction has started).
	for {
		if m, _ := filepath.Glob(filepath.Join(cache, "kernel", "build-*")); len(m) > 0 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("EnsureKernel ended before building: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	err := <-done
	if !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled build: %v, want context.Canceled", err)
	}
	if m, _ := filepath.Glob(filepath.Join(cache, "kernel", "build-*")); len(m) != 0 {
		t.Errorf("build tree left behind: %v", m)
	}
	if _, ok := KernelPath(cache); ok {
		t.Error("a cancelled build left a kernel")
	}
}

// TestKernelConfigApplies configures the real kernel source with the
// fragment (no compile: about a minute, mostly unpacking) and fails if
// Kconfig dropped any of its options.
func TestKernelConfigApplies(t *testing.T) {
	if testing.Short() {
		t.Skip("unpacks the kernel source (about a minute)")
	}
	src, err := sourceTarball()
	if err != nil {
		t.Skip(err)
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed")
	}
	work := t.TempDir()
	var log bytes.Buffer
	_, cfg, err := configureKernel(context.Background(), work, src, &log)
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	got := parseKconfig(cfg)
	for _, k := range []string{"CONFIG_PVH", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES", "CONFIG_EXT4_FS"} {
		if got[k] != "y" {
			t.Errorf("%s = %q in the generated .config", k, got[k])
		}
	}
}
