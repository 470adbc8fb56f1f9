package qemu

import (
	"os"
	"strconv"
	"strings"
	"time"
)

// record is what Recover needs to find a VM a crashed harness left behind
// (StateDir/<id>/, see hostproc.WriteRecord). It is written before QEMU is
// started and again once its pid is known.
type record struct {
	ID         string `json:"id"`
	Function   string `json:"function,omitempty"`
	RevisionID string `json:"revision_id,omitempty"`
	// QEMU is the VMM binary: Recover kills only a process running it.
	QEMU string `json:"qemu"`
	// PID is QEMU's pid (0 until started); StartTime is field 22 of
	// /proc/<pid>/stat, which tells a recycled pid from the original.
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	// UID is the unprivileged user QEMU runs as (0: the driver's own).
	UID int `json:"uid,omitempty"`
	// Sockets are the agent's and QMP's, relative to the instance
	// directory; a future driver could re-adopt the VM through them.
	AgentSocket string    `json:"agent_socket"`
	QMPSocket   string    `json:"qmp_socket"`
	Created     time.Time `json:"created"`
}

// isOurQEMU reports whether pid runs the binary qemuPath (argv[0]) for
// instance id (the "-name invokex-<id>" the driver gives every VM): the
// instance's VMM and nothing else, even if a recorded pid was recycled.
func isOurQEMU(pid int, qemuPath, id string) bool {
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	args := strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
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

// findQEMU returns the pids of processes that are instance id's QEMU.
func findQEMU(qemuPath, id string) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && pid != os.Getpid() && isOurQEMU(pid, qemuPath, id) {
			pids = append(pids, pid)
		}
	}
	return pids
}
