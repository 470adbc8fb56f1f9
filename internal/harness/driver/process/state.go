package process

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"
)

// record is what Recover needs to find an instance a crashed harness left
// behind (StateDir/<id>/, see hostproc.WriteRecord). It is written before
// each resource is created, so it may name resources that never came to
// exist.
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
