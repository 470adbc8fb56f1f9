package vmm

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Record is what every VM driver records of an instance so that Recover
// finds the VM a crashed harness left behind (StateDir/<id>/, see
// hostproc.WriteRecord). A driver's record embeds it (its fields are
// flattened into the same JSON object) and adds its VMM's: the binary
// Recover may kill, sockets, cgroups. It is written before the VMM is
// started (Instance.Create) and again once its pid is known
// (Instance.Launch, then Instance.Record).
type Record struct {
	ID string `json:"id"`
	// Machine is the name the VMM was launched with when it differs from
	// ID: a spare VM's (see SpareMachine), assigned to instance ID later.
	Machine    string `json:"machine,omitempty"`
	Function   string `json:"function,omitempty"`
	RevisionID string `json:"revision_id,omitempty"`
	// PID is the VMM's pid (0 until started); StartTime is field 22 of
	// /proc/<pid>/stat, which tells a recycled pid from the original.
	PID       int    `json:"pid,omitempty"`
	StartTime uint64 `json:"start_time,omitempty"`
	// UID is the unprivileged user the VMM runs as (0: the driver's own).
	UID     int       `json:"uid,omitempty"`
	Created time.Time `json:"created"`
}

// NewRecord is the record of a VM about to be created for spec.
func NewRecord(spec driver.Spec) Record {
	return Record{ID: spec.ID, Function: spec.Function, RevisionID: spec.RevisionID, Created: time.Now().UTC()}
}

// MachineName is the name the VMM was launched with: Machine, or ID.
func (r *Record) MachineName() string {
	if r.Machine != "" {
		return r.Machine
	}
	return r.ID
}

// Proc is the recorded VMM process (PID 0 before it started).
func (r *Record) Proc() hostproc.Proc { return hostproc.Proc{PID: r.PID, StartTime: r.StartTime} }

// ReadLeftoverRecord reads the record of instance id from its directory
// dir for Recover: nil when there is none (a crash right after the
// directory was made) or it cannot be read, which is logged: the
// directory is removed all the same.
func ReadLeftoverRecord[T any](log *slog.Logger, id, dir string) *T {
	rec, err := hostproc.ReadRecord[T](dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("unreadable vm record; removing the directory", "instance", id, "err", err)
		}
		return nil
	}
	return rec
}

// KillLeftover kills the VMM of instance id that a crashed driver left
// running. isOurs(pid) reports whether pid is that VMM (by its command
// line: the right binary, the instance's name), so a recycled pid is
// never hit. The VMM is the process rec (nil: no record) names if it
// still runs and is ours; else every process isOurs recognises, since
// the pid is recorded only after the VMM started and a crash in between
// leaves a VMM only Pdeathsig should have killed.
func KillLeftover(ctx context.Context, log *slog.Logger, id string, rec *Record, isOurs func(pid int) bool) error {
	var pids []int
	if rec != nil && rec.Proc().Running() && isOurs(rec.PID) {
		pids = append(pids, rec.PID)
	} else {
		pids = FindProcs(isOurs)
	}
	for _, pid := range pids {
		p, err := hostproc.Lookup(pid)
		if err != nil {
			continue
		}
		log.Info("killing leftover vm", "instance", id, "pid", pid)
		if err := p.Kill(ctx, func() bool { return isOurs(pid) }); err != nil {
			return err
		}
	}
	return nil
}

// FindProcs returns the pids, other than this process's, for which match
// reports true.
func FindProcs(match func(pid int) bool) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err == nil && pid != os.Getpid() && match(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// Cmdline returns pid's command line (argv), nil if there is no such
// process.
func Cmdline(pid int) []string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}
