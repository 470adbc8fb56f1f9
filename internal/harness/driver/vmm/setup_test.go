package vmm

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver"
)

// TestVCPUsFor checks driver.VCPUsFor, the rule Host.VCPUs applies:
// Lambda's vCPU per 1,769 MB, 1 to 6, capped by the host's cores.
func TestVCPUsFor(t *testing.T) {
	for _, tc := range []struct{ mem, host, want int }{
		{128, 2, 1}, {128, 8, 1}, {1769, 8, 1}, {1770, 8, 2}, {3008, 8, 2}, {4000, 0, 3},
		{10240, 8, 6}, {10240, 2, 2}, {10240, 0, 6}, {1, 1, 1},
	} {
		if got := driver.VCPUsFor(tc.mem, tc.host); got != tc.want {
			t.Errorf("VCPUsFor(%d MB, %d cores) = %d, want %d", tc.mem, tc.host, got, tc.want)
		}
	}
}

func TestValidate(t *testing.T) {
	sp := driver.Spec{ID: "vm-1", CodeDir: t.TempDir(), MemoryMB: MinMemoryMB, EphemeralMB: 16}
	if err := Validate(sp); err != nil {
		t.Errorf("Validate(%+v) = %v", sp, err)
	}
	sp.MemoryMB = MinMemoryMB - 1
	if err := Validate(sp); !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "at least 128 MB") {
		t.Errorf("too little memory: %v", err)
	}
	sp.MemoryMB, sp.ID = MinMemoryMB, "Bad_ID"
	if err := Validate(sp); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("bad ID: %v", err)
	}
}

func TestResolveBinaryAndKernel(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "vmm")
	os.WriteFile(bin, nil, 0o755)
	t.Chdir(dir)
	if p, err := ResolveBinary("x", "vmm", "vmm"); err != nil || p != bin {
		t.Errorf("ResolveBinary(relative) = %q, %v; want %q", p, err, bin)
	}
	if _, err := ResolveBinary("x", dir, "vmm"); !errors.Is(err, errdefs.ErrUnavailable) || !strings.HasPrefix(err.Error(), "x driver: "+dir+" is not a vmm binary: ") {
		t.Errorf("ResolveBinary(directory) = %v", err)
	}
	if err := CheckKernel("x", bin); err != nil {
		t.Errorf("CheckKernel(file) = %v", err)
	}
	if err := CheckKernel("x", filepath.Join(dir, "absent")); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "invokex guest kernel") {
		t.Errorf("CheckKernel(missing) = %v", err)
	}
}

func TestResolveGuest(t *testing.T) {
	cache := t.TempDir()
	if _, err := ResolveGuest("x", GuestFiles{CacheDir: cache}); !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "x driver: no guest kernel in "+cache) {
		t.Errorf("no kernel in the cache: %v", err)
	}
	// The test binary is not static: it cannot be a guest's init.
	exe, _ := os.Executable()
	if _, err := ResolveGuest("x", GuestFiles{CacheDir: cache, KernelPath: "/k", AgentBin: exe}); err == nil || !strings.Contains(err.Error(), "x driver: agent binary") {
		t.Errorf("a dynamic agent binary: %v", err)
	}
}

func TestDefaultUIDBase(t *testing.T) {
	a, b := DefaultUIDBase("/var/lib/invokex/vms"), DefaultUIDBase("/var/lib/invokex/firecracker")
	for _, u := range []int{a, b} {
		if u < 1<<30 || u+Slots > 1<<30+4096*Slots || (u-1<<30)%Slots != 0 {
			t.Errorf("uid base %d is not 1<<30 plus a multiple of %d", u, Slots)
		}
	}
	if a == b || a != DefaultUIDBase("/var/lib/invokex/vms") {
		t.Errorf("uid bases %d and %d: want stable and distinct per state directory", a, b)
	}
	if h := Hostname("vm-1"); h != "sandbox-vm-1" {
		t.Errorf("Hostname = %q", h)
	}
}
