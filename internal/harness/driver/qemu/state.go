package qemu

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// stateFile is the record of one instance in StateDir/<id>/.
const stateFile = "instance.json"

// record is what Recover needs to find a VM a crashed harness left behind.
// It is written before QEMU is started and again once its pid is known.
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

func writeRecord(dir string, r *record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding instance record: %w", err)
	}
	tmp := filepath.Join(dir, stateFile+".tmp")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("writing instance record: %w", err)
	}
	// rename is atomic: Recover sees the old record or the new one.
	if err := os.Rename(tmp, filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("writing instance record: %w", err)
	}
	return nil
}

func readRecord(dir string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", filepath.Join(dir, stateFile), err)
	}
	return &r, nil
}

// procStat returns pid's start time (clock ticks since boot) and state
// letter (R, S, Z ...).
func procStat(pid int) (uint64, byte, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// comm (field 2) may contain spaces and parentheses: fields are
	// counted after its last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); start time is field 22.
	if len(f) < 20 || len(f[0]) != 1 {
		return 0, 0, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	return st, f[0][0], err
}

func procStartTime(pid int) (uint64, error) {
	st, _, err := procStat(pid)
	return st, err
}

// processRunning reports whether the process started at startTime is
// alive; a zombie has released everything but its pid and counts as gone.
func processRunning(pid int, startTime uint64) bool {
	if pid <= 0 {
		return false
	}
	st, state, err := procStat(pid)
	return err == nil && st == startTime && state != 'Z' && state != 'X'
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
