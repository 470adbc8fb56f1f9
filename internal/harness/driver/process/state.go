package process

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// stateFile is the record of one instance in StateDir/<id>/.
const stateFile = "instance.json"

// record is what Recover needs to find an instance a crashed harness left
// behind. It is written before each resource is created, so it may name
// resources that never came to exist.
type record struct {
	ID         string `json:"id"`
	Function   string `json:"function,omitempty"`
	RevisionID string `json:"revision_id,omitempty"`
	// PID is the sandbox's init in the host's pid namespace (0 until it is
	// started); StartTime is field 22 of /proc/<pid>/stat, which tells a
	// recycled pid from the original.
	PID       int       `json:"pid,omitempty"`
	StartTime uint64    `json:"start_time,omitempty"`
	Cgroups   []string  `json:"cgroups,omitempty"`
	Created   time.Time `json:"created"`
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

// procStartTime returns the start time of pid in clock ticks since boot, or
// an error wrapping fs.ErrNotExist when there is no such process.
func procStartTime(pid int) (uint64, error) {
	st, _, err := procStat(pid)
	return st, err
}

// procStat returns pid's start time and state letter (R, S, Z ...).
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

// sameProcess reports whether pid is alive and is the process that was
// started at startTime.
func sameProcess(pid int, startTime uint64) bool {
	if pid <= 0 {
		return false
	}
	st, err := procStartTime(pid)
	return err == nil && st == startTime
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

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encoding sandbox config: %w", err)
	}
	return string(b), nil
}

// removeStateDir removes StateDir/<id>. The sandbox's root directory in it
// is removed with rmdir, never recursively: if a mount were ever left on
// it, a recursive removal could reach into the host directories bound
// there (the code directory, /usr ...). The mounts live in the sandbox's
// own mount namespace and vanish with it, so it is empty here.
func removeStateDir(dir string) error {
	if err := os.Remove(filepath.Join(dir, rootDirName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing sandbox root: %w", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing state directory: %w", err)
	}
	return nil
}

// capSysResource is CAP_SYS_RESOURCE's bit number.
const capSysResource = 24

// hasCapability reports whether this process has capability bit c in its
// effective set.
func hasCapability(c uint) bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			mask, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && mask&(1<<c) != 0
		}
	}
	return false
}
