package firecracker

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// record is what Recover needs to find a VM a crashed harness left behind
// (StateDir/<id>/, see hostproc.WriteRecord). It is written before the
// VMM is started and again once its pid is known.
type record struct {
	ID         string `json:"id"`
	Function   string `json:"function,omitempty"`
	RevisionID string `json:"revision_id,omitempty"`
	// Firecracker is the VMM binary and Jailer the jailer ("" when not
	// jailed): Recover kills only a process running one of them for this
	// instance.
	Firecracker string `json:"firecracker"`
	Jailer      string `json:"jailer,omitempty"`
	// PID is the VMM's pid (0 until started; the jailer execs Firecracker
	// in place, so it is both); StartTime is field 22 of /proc/<pid>/stat,
	// which tells a recycled pid from the original.
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	// UID is the unprivileged user a jailed Firecracker runs as.
	UID int `json:"uid,omitempty"`
	// Cgroups are the directories the jailer creates for the VM (one per
	// hierarchy): Recover kills what is left in them and removes them.
	Cgroups []string `json:"cgroups,omitempty"`
	// Root is the directory Firecracker sees as its own (the instance
	// directory, or the jail's chroot): its API and vsock sockets are there.
	Root    string    `json:"root"`
	Created time.Time `json:"created"`
}

// isOurVMM reports whether pid is instance id's VMM: a process running
// firecrackerPath (argv[0]; jailed, the jail's copy of the same file
// name) or jailerPath, with "--id <id>" or "--id=<id>" among its
// arguments. So a recorded pid that was recycled is never taken for it.
func isOurVMM(pid int, firecrackerPath, jailerPath, id string) bool {
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
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

// findVMMs returns the pids of processes that are instance id's VMM.
func findVMMs(firecrackerPath, jailerPath, id string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && pid != os.Getpid() && isOurVMM(pid, firecrackerPath, jailerPath, id) {
			pids = append(pids, pid)
		}
	}
	return pids
}
