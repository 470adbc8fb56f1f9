package e2e

import (
	"context"
	"errors"
	"os/exec"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// kvmRunsGuests reports whether /dev/kvm runs a standard x86 guest (some
// nested hosts open it and then refuse every guest), with the drivers'
// own probe; without QEMU it cannot tell, and says so.
func kvmRunsGuests() error {
	if err := vmm.OpenKVM(); err != nil {
		return err
	}
	q, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return errors.New("cannot probe KVM without qemu-system-x86_64")
	}
	return vmm.ProbeKVM(context.Background(), q)
}
