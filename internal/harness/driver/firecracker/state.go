package firecracker

import (
	"path/filepath"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// record is what Recover needs to find a VM a crashed harness left behind
// (see vmm.Record): the shared fields and Firecracker's own. Record.UID
// is the user a jailed Firecracker runs as.
type record struct {
	vmm.Record
	// Firecracker is the VMM binary and Jailer the jailer ("" when not
	// jailed): Recover kills only a process running one of them for this
	// instance. The jailer execs Firecracker in place, so Record.PID is
	// both.
	Firecracker string `json:"firecracker"`
	Jailer      string `json:"jailer,omitempty"`
	// Cgroups are the directories the jailer creates for the VM (one per
	// hierarchy): Recover kills what is left in them and removes them.
	Cgroups []string `json:"cgroups,omitempty"`
	// Root is the directory Firecracker sees as its own (the instance
	// directory, or the jail's chroot): its API and vsock sockets are there.
	Root string `json:"root"`
}

// isOurVMM reports whether pid is instance id's VMM: a process running
// firecrackerPath (argv[0]; jailed, the jail's copy of the same file
// name) or jailerPath, with "--id <id>" or "--id=<id>" among its
// arguments. So a recorded pid that was recycled is never taken for it.
func isOurVMM(pid int, firecrackerPath, jailerPath, id string) bool {
	args := vmm.Cmdline(pid)
	if len(args) == 0 {
		return false
	}
	argv0 := args[0]
	switch {
	case argv0 == firecrackerPath:
	case jailerPath != "" && argv0 == jailerPath:
	case jailerPath != "" && filepath.Base(argv0) == filepath.Base(firecrackerPath):
	default:
		return false
	}
	for i, a := range args[1:] {
		if a == "--id="+id || (a == "--id" && i+2 < len(args) && args[i+2] == id) {
			return true
		}
	}
	return false
}
