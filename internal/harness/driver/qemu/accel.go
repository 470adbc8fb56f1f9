package qemu

import (
	"context"
	"fmt"
	"os"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// chooseAccel resolves Options.Accel. It returns the accelerator and, for
// TCG chosen by "auto", why KVM was not used.
func chooseAccel(ctx context.Context, want, qemuPath string) (accel, string, error) {
	switch want {
	case "tcg":
		return accelTCG, "tcg requested", nil
	case "kvm":
		if err := vmm.ProbeKVM(ctx, qemuPath); err != nil {
			return "", "", fmt.Errorf("kvm requested but unusable: %w", err)
		}
		return accelKVM, "kvm requested", nil
	case "", "auto":
		if _, err := os.Stat("/dev/kvm"); err != nil {
			return accelTCG, "no /dev/kvm", nil
		}
		if err := vmm.ProbeKVM(ctx, qemuPath); err != nil {
			return accelTCG, err.Error(), nil
		}
		return accelKVM, "kvm usable", nil
	default:
		return "", "", fmt.Errorf("accel %q: want auto, kvm or tcg", want)
	}
}
