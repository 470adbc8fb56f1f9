package vmm

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// KVMProbeTimeout bounds the probe VM of ProbeKVM.
const KVMProbeTimeout = 10 * time.Second

// kvmProbes caches ProbeKVM per QEMU binary: the answer does not change
// while the process runs, and every driver (tests make many) would pay
// for the probe VM otherwise.
var kvmProbes struct {
	mu  sync.Mutex
	res map[string]error
}

// OpenKVM reports whether /dev/kvm opens read-write: nil if so, else why
// not. It is necessary for any KVM guest, not sufficient (see ProbeKVM).
func OpenKVM() error {
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/kvm: %w", err)
	}
	unix.Close(fd)
	return nil
}

// ProbeKVM reports whether KVM can run a standard x86 guest, tried with
// the QEMU at qemuPath: nil if so, else why not. /dev/kvm opening is not
// enough: nested under some hypervisors it opens, creates VMs, and then
// refuses the MSRs every x86 guest needs (QEMU aborts with "failed to set
// MSR"). So the probe starts a tiny microvm with -accel kvm, paused (-S,
// no kernel), and asks it to quit over QMP on stdio: QEMU resets the
// vCPUs before serving QMP, which is where an unusable KVM fails. The
// answer is cached per qemuPath, except when ctx ended the probe.
func ProbeKVM(ctx context.Context, qemuPath string) error {
	kvmProbes.mu.Lock()
	defer kvmProbes.mu.Unlock()
	if err, ok := kvmProbes.res[qemuPath]; ok {
		return err
	}
	err := runKVMProbe(ctx, qemuPath)
	if ctx.Err() != nil {
		return err // not cached: the caller gave up, the host did not answer
	}
	if kvmProbes.res == nil {
		kvmProbes.res = map[string]error{}
	}
	kvmProbes.res[qemuPath] = err
	return err
}

func runKVMProbe(ctx context.Context, qemuPath string) error {
	if err := OpenKVM(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, KVMProbeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, qemuPath,
		"-M", "microvm,x-option-roms=off,rtc=off,acpi=off",
		"-accel", "kvm", "-cpu", "host", "-m", "16M",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-S", "-qmp", "stdio")
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		// The first line says why; the rest is QEMU's assertion.
		msg, _, _ := strings.Cut(strings.TrimSpace(stderr.String()), "\n")
		if msg == "" {
			msg = "no message"
		}
		return fmt.Errorf("a kvm test vm failed (%v): %s", err, msg)
	}
	return nil
}
