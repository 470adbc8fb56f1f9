package qemu

import (
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// record is what Recover needs to find a VM a crashed harness left behind
// (see vmm.Record): the shared fields and QEMU's own.
type record struct {
	vmm.Record
	// QEMU is the VMM binary: Recover kills only a process running it.
	QEMU string `json:"qemu"`
	// Sockets are the agent's and QMP's, relative to the instance
	// directory; a future driver could re-adopt the VM through them.
	AgentSocket string `json:"agent_socket"`
	QMPSocket   string `json:"qmp_socket"`
}

// isOurQEMU reports whether pid runs the binary qemuPath (argv[0]) for
// instance id (the "-name invokex-<id>" the driver gives every VM): the
// instance's VMM and nothing else, even if a recorded pid was recycled.
func isOurQEMU(pid int, qemuPath, id string) bool {
	args := vmm.Cmdline(pid)
	if len(args) == 0 || args[0] != qemuPath {
		return false
	}
	for i := 1; i+1 < len(args); i++ {
		if args[i] == "-name" && args[i+1] == vmName(id) {
			return true
		}
	}
	return false
}
