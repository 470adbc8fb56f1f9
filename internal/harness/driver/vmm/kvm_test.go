package vmm

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestProbeKVM runs the probe against a stand-in QEMU that fails as QEMU
// does where KVM opens but cannot run a guest: the error carries QEMU's
// first line, not its assertion, and the answer is cached.
func TestProbeKVM(t *testing.T) {
	if err := OpenKVM(); err != nil {
		if !strings.Contains(err.Error(), "opening /dev/kvm") {
			t.Errorf("OpenKVM = %v", err)
		}
		t.Skipf("skipping: %v", err)
	}
	qemu := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	script := "#!/bin/sh\n" +
		"echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69' >&2\n" +
		"echo 'qemu-system-x86_64: kvm.c:3183: Assertion failed.' >&2\n" +
		"exit 134\n"
	if err := os.WriteFile(qemu, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	err := ProbeKVM(context.Background(), qemu)
	if err == nil || !strings.Contains(err.Error(), "failed to set MSR") || strings.Contains(err.Error(), "Assertion") {
		t.Fatalf("ProbeKVM = %v, want QEMU's first line", err)
	}
	os.Remove(qemu)
	if again := ProbeKVM(context.Background(), qemu); again == nil || again.Error() != err.Error() {
		t.Errorf("second ProbeKVM = %v, want the cached %v", again, err)
	}
}
