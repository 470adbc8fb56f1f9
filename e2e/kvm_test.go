package e2e

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// kvmRunsGuests reports whether /dev/kvm runs a standard x86 guest: some
// nested hosts open it and then refuse the MSRs every guest needs. It asks
// QEMU to reset a paused KVM microvm, which is where such a host fails;
// without QEMU it cannot tell, and says so.
func kvmRunsGuests() error {
	q, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return errors.New("cannot probe KVM without qemu-system-x86_64")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, q, "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel", "kvm",
		"-cpu", "host", "-m", "16M", "-nodefaults", "-no-user-config", "-display", "none", "-S", "-qmp", "stdio")
	cmd.Stdin = strings.NewReader(`{"execute":"qmp_capabilities"}` + "\n" + `{"execute":"quit"}` + "\n")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("a paused KVM test VM failed (%v): %s", err, strings.TrimSpace(lastLine(string(out))))
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}
