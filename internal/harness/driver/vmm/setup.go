package vmm

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
)

// Slots is how many VMs one driver can have at a time. Each running VM
// holds one slot (Instance.Slot), which drivers turn into what must be
// unique among their VMs: a user, a tap device, a MAC address.
const Slots = 4096

// MinMemoryMB is Lambda's smallest memory size, which the guest kernel
// and agent fit in with room for a runtime.
const MinMemoryMB = 128

// ReadyLine is what the guest's agent writes on its stream when it is
// about to serve; protocol frames follow it. Package vminit writes it.
const ReadyLine = "INVOKEX-AGENT-READY\n"

// Hostname is the guest's hostname for instance id (at most 64 bytes:
// IDs have at most 40), which the drivers pass on the kernel command line
// (invokex.hostname).
func Hostname(id string) string { return "sandbox-" + id }

// Validate checks spec as every VM driver must: driver.Spec.Validate and
// a VM's memory minimum. Errors are ErrInvalidParameter.
func Validate(spec driver.Spec) error {
	if err := spec.Validate(); err != nil {
		return err
	}
	if spec.MemoryMB < MinMemoryMB {
		return errdefs.Invalid("sandbox %s: a vm needs at least %d MB of memory, got %d", spec.ID, MinMemoryMB, spec.MemoryMB)
	}
	return nil
}

// GuestFiles are what every VM of a driver boots, as a driver's Options
// name them.
type GuestFiles struct {
	// CacheDir is package guest's cache (kernel, root and code images);
	// default guest.DefaultCacheDir().
	CacheDir string
	// KernelPath is the guest kernel; default the one `invokex guest
	// kernel` built into CacheDir.
	KernelPath string
	// AgentBin is the statically linked binary that becomes the guest's
	// /sbin/init; default this executable.
	AgentBin string
}

// ResolveGuest fills in g's defaults and checks that the agent binary can
// be a guest's init. driverName prefixes its errors, which wrap
// ErrUnavailable when there is no kernel.
func ResolveGuest(driverName string, g GuestFiles) (GuestFiles, error) {
	if g.CacheDir == "" {
		g.CacheDir = guest.DefaultCacheDir()
	}
	if g.KernelPath == "" {
		k, ok := guest.KernelPath(g.CacheDir)
		if !ok {
			return g, fmt.Errorf("%s driver: no guest kernel in %s: run `invokex guest kernel`: %w",
				driverName, g.CacheDir, errdefs.ErrUnavailable)
		}
		g.KernelPath = k
	}
	if g.AgentBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return g, fmt.Errorf("%s driver: finding own executable: %w", driverName, err)
		}
		g.AgentBin = exe
	}
	if err := guest.CheckStatic(g.AgentBin); err != nil {
		return g, fmt.Errorf("%s driver: agent binary: %w", driverName, err)
	}
	return g, nil
}

// ResolveBinary returns path made absolute, if it is an existing file;
// else an error wrapping ErrUnavailable that calls it not a what binary.
func ResolveBinary(driverName, path, what string) (string, error) {
	if p, err := filepath.Abs(path); err == nil {
		path = p
	}
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return "", fmt.Errorf("%s driver: %s is not a %s binary: %w", driverName, path, what, errdefs.ErrUnavailable)
	}
	return path, nil
}

// CheckKernel fails with ErrUnavailable unless the guest kernel exists.
func CheckKernel(driverName, path string) error {
	if fi, err := os.Stat(path); err != nil || fi.IsDir() {
		return fmt.Errorf("%s driver: guest kernel %s missing: run `invokex guest kernel`: %w", driverName, path, errdefs.ErrUnavailable)
	}
	return nil
}

// DefaultUIDBase is the first uid of the VMs' users of a driver whose
// state directory is stateDir: 1<<30 plus a multiple of Slots derived
// from stateDir, so that drivers with different state directories (and
// so different VMs) use different users.
func DefaultUIDBase(stateDir string) int {
	sum := sha256.Sum256([]byte(stateDir))
	return 1<<30 + int(binary.BigEndian.Uint16(sum[:2])%4096)*Slots
}
