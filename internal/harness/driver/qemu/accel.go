package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// kvmProbeTimeout bounds the probe VM.
const kvmProbeTimeout = 10 * time.Second

// kvmProbes caches probeKVM per QEMU binary: the answer does not change
// while the process runs, and every driver (tests make many) would pay
// for the probe VM otherwise.
var kvmProbes struct {
	mu  sync.Mutex
	res map[string]error
}

// probeKVM reports whether KVM can run a standard guest with this QEMU:
// nil if so, else why not. /dev/kvm existing is not enough: nested under
// some hypervisors it opens, creates VMs, and then refuses the MSRs every
// x86 guest needs (QEMU aborts with "failed to set MSR"). So the probe
// starts a tiny microvm with -accel kvm, paused (-S, no kernel), and asks
// it to quit over QMP on stdio: QEMU resets the vCPUs before serving QMP,
// which is where an unusable KVM fails.
func probeKVM(ctx context.Context, qemuPath string) error {
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
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/kvm: %w", err)
	}
	unix.Close(fd)
	ctx, cancel := context.WithTimeout(ctx, kvmProbeTimeout)
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
		msg := strings.TrimSpace(stderr.String())
		if i := strings.IndexByte(msg, '\n'); i >= 0 {
			msg = msg[:i] // the first line says why; the rest is QEMU's assertion
		}
		if msg == "" {
			msg = "no message"
		}
		return fmt.Errorf("a kvm test vm failed (%v): %s", err, msg)
	}
	return nil
}

// chooseAccel resolves Options.Accel. It returns the accelerator and, for
// TCG chosen by "auto", why KVM was not used.
func chooseAccel(ctx context.Context, want, qemuPath string) (accel, string, error) {
	switch want {
	case "tcg":
		return accelTCG, "tcg requested", nil
	case "kvm":
		if err := probeKVM(ctx, qemuPath); err != nil {
			return "", "", fmt.Errorf("kvm requested but unusable: %w", err)
		}
		return accelKVM, "kvm requested", nil
	case "", "auto":
		if _, err := os.Stat("/dev/kvm"); err != nil {
			return accelTCG, "no /dev/kvm", nil
		}
		if err := probeKVM(ctx, qemuPath); err != nil {
			return accelTCG, err.Error(), nil
		}
		return accelKVM, "kvm usable", nil
	default:
		return "", "", fmt.Errorf("accel %q: want auto, kvm or tcg", want)
	}
}
