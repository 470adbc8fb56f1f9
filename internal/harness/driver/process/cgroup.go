package process

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Limits applied to every sandbox's cgroup.
const (
	// agentHeadroomMB is added to Spec.MemoryMB because the agent (and the
	// tiny init) live inside the sandbox's memory cgroup with the function:
	// without headroom a function using exactly its MemoryMB would push the
	// agent into the OOM killer's reach. The runtime's processes have
	// oom_score_adj 1000 (the agent's supervisor sets it), so the kernel
	// picks them first anyway.
	agentHeadroomMB = 32
	// pidsMax is Lambda's limit of 1,024 processes plus threads per
	// execution environment (the pids controller counts threads).
	pidsMax = 1024
)

// cgroupManager creates and removes the per-instance cgroups. It supports
// cgroup v2 (a unified hierarchy at Root) and v1 (one hierarchy per
// controller under Root/<controller>); on a hybrid host the v1 controllers
// are used. A controller that cannot be used is left out, and the reason is
// kept in degradations.
type cgroupManager struct {
	version int // 0 (no cgroups), 1 or 2
	// memDir and pidsDir are the absolute parent directories of the
	// instance cgroups for each controller; equal on v2; "" when the
	// controller is unavailable.
	memDir, pidsDir string
	memsw           bool // v1 memory.memsw.* exists: swap can be limited
	degradations    []string
}

// newCgroupManager prepares root/<parent> for instance cgroups. parent is a
// relative path such as "invokex/1a2b3c4d".
func newCgroupManager(root, parent string, privileged bool) *cgroupManager {
	m := &cgroupManager{}
	if !privileged {
		m.degrade("not root: no cgroups, so no memory or process limits")
		return m
	}
	if _, err := os.Stat(filepath.Join(root, "cgroup.controllers")); err == nil {
		m.setupV2(root, parent)
		return m
	}
	m.setupV1(root, parent)
	return m
}

func (m *cgroupManager) degrade(format string, args ...any) {
	m.degradations = append(m.degradations, fmt.Sprintf(format, args...))
}

func (m *cgroupManager) setupV2(root, parent string) {
	m.version = 2
	avail, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		m.degrade("cgroup v2: reading controllers: %v; no memory or process limits", err)
		m.version = 0
		return
	}
	var want []string
	for _, c := range []string{"memory", "pids"} {
		if hasField(string(avail), c) {
			want = append(want, c)
		} else {
			m.degrade("cgroup v2: %s controller unavailable", c)
		}
	}
	// Every level from the root down to parent must delegate the
	// controllers to its children; a level only holds child cgroups, never
	// processes, as v2's no-internal-processes rule requires.
	dir := root
	for _, elem := range strings.Split(parent, "/") {
		if len(want) > 0 {
			if err := enableControllers(dir, want); err != nil {
				m.degrade("cgroup v2: enabling %s in %s: %v", strings.Join(want, ","), dir, err)
				want = nil
			}
		}
		dir = filepath.Join(dir, elem)
		if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			m.degrade("cgroup v2: creating %s: %v; no memory or process limits", dir, err)
			m.version = 0
			return
		}
	}
	if len(want) > 0 {
		if err := enableControllers(dir, want); err != nil {
			m.degrade("cgroup v2: enabling %s in %s: %v", strings.Join(want, ","), dir, err)
			want = nil
		}
	}
	for _, c := range want {
		switch c {
		case "memory":
			m.memDir = dir
		case "pids":
			m.pidsDir = dir
		}
	}
	// The parent directory is also where instance cgroups go when no
	// controller is enabled: they still group the sandbox's processes so
	// that Stop and Recover can find and kill every one of them.
	if m.memDir == "" && m.pidsDir == "" {
		m.pidsDir = dir
	}
}

func (m *cgroupManager) setupV1(root, parent string) {
	m.version = 1
	if _, err := os.Stat(filepath.Join(root, "memory", "memory.limit_in_bytes")); err == nil {
		dir := filepath.Join(root, "memory", parent)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			m.degrade("cgroup v1: creating %s: %v; no memory limit", dir, err)
		} else {
			m.memDir = dir
			_, err := os.Stat(filepath.Join(root, "memory", "memory.memsw.limit_in_bytes"))
			m.memsw = err == nil
			if !m.memsw {
				m.degrade("cgroup v1: memory.memsw unavailable: swap use is not limited")
			}
		}
	} else {
		m.degrade("cgroup v1: memory controller unavailable: no memory limit")
	}
	if _, err := os.Stat(filepath.Join(root, "pids", "cgroup.procs")); err == nil {
		dir := filepath.Join(root, "pids", parent)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			m.degrade("cgroup v1: creating %s: %v; no process limit", dir, err)
		} else {
			m.pidsDir = dir
		}
	} else {
		m.degrade("cgroup v1: pids controller unavailable: no process limit")
	}
	if m.memDir == "" && m.pidsDir == "" {
		m.version = 0
	}
}

func enableControllers(dir string, ctrls []string) error {
	cur, err := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
	if err != nil {
		return err
	}
	var add []string
	for _, c := range ctrls {
		if !hasField(string(cur), c) {
			add = append(add, "+"+c)
		}
	}
	if len(add) == 0 {
		return nil
	}
	return os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte(strings.Join(add, " ")), 0)
}

func hasField(s, f string) bool {
	for _, x := range strings.Fields(s) {
		if x == f {
			return true
		}
	}
	return false
}

// paths returns the instance's cgroup directories, one per hierarchy.
func (m *cgroupManager) paths(id string) []string {
	var ps []string
	if m.memDir != "" {
		ps = append(ps, filepath.Join(m.memDir, id))
	}
	if m.pidsDir != "" && m.pidsDir != m.memDir {
		ps = append(ps, filepath.Join(m.pidsDir, id))
	}
	return ps
}

// create makes the instance's cgroups and sets their limits. On error the
// caller removes paths(id) with destroyCgroups.
func (m *cgroupManager) create(id string, memoryMB int) error {
	memBytes := strconv.FormatInt(int64(memoryMB+agentHeadroomMB)<<20, 10)
	for _, p := range m.paths(id) {
		if err := os.Mkdir(p, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("creating cgroup: %w", err)
		}
	}
	var writes [][2]string
	if m.memDir != "" {
		p := filepath.Join(m.memDir, id)
		if m.version == 2 {
			writes = append(writes, [2]string{filepath.Join(p, "memory.max"), memBytes})
			// memory.swap.max exists only when the kernel has swap support.
			if exists(filepath.Join(p, "memory.swap.max")) {
				writes = append(writes, [2]string{filepath.Join(p, "memory.swap.max"), "0"})
			}
		} else {
			// memsw is memory+swap and must never be below the memory
			// limit, so the memory limit is written first.
			writes = append(writes, [2]string{filepath.Join(p, "memory.limit_in_bytes"), memBytes})
			if m.memsw {
				writes = append(writes, [2]string{filepath.Join(p, "memory.memsw.limit_in_bytes"), memBytes})
			}
		}
	}
	if m.pidsDir != "" {
		// On v2 without the pids controller the file is absent.
		if f := filepath.Join(m.pidsDir, id, "pids.max"); exists(f) {
			writes = append(writes, [2]string{f, strconv.Itoa(pidsMax)})
		}
	}
	for _, w := range writes {
		if err := os.WriteFile(w[0], []byte(w[1]), 0); err != nil {
			return fmt.Errorf("setting %s: %w", w[0], err)
		}
	}
	return nil
}

// setMemory changes the memory limit of an instance's cgroups (paths) from
// fromMB to toMB (both without agentHeadroomMB). On v1 memsw (memory+swap)
// may never be below the memory limit, so the order of the two writes
// depends on the direction.
func (m *cgroupManager) setMemory(paths []string, fromMB, toMB int) error {
	if m.memDir == "" {
		return nil
	}
	var dir string
	for _, p := range paths {
		if filepath.Dir(p) == m.memDir {
			dir = p
		}
	}
	if dir == "" {
		return fmt.Errorf("setting memory limit: no memory cgroup among %v", paths)
	}
	memBytes := []byte(strconv.FormatInt(int64(toMB+agentHeadroomMB)<<20, 10))
	var files []string
	switch {
	case m.version == 2:
		files = []string{"memory.max"}
	case !m.memsw:
		files = []string{"memory.limit_in_bytes"}
	case toMB > fromMB:
		files = []string{"memory.memsw.limit_in_bytes", "memory.limit_in_bytes"}
	default:
		files = []string{"memory.limit_in_bytes", "memory.memsw.limit_in_bytes"}
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(dir, f), memBytes, 0); err != nil {
			return fmt.Errorf("setting %s: %w", filepath.Join(dir, f), err)
		}
	}
	return nil
}

// joinCgroups moves pid (all its threads) into every cgroup of paths.
func joinCgroups(paths []string, pid int) error {
	for _, p := range paths {
		if err := os.WriteFile(filepath.Join(p, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("joining cgroup %s: %w", p, err)
		}
	}
	return nil
}

// destroyCgroups kills every process left in paths, waits until they are
// empty and removes them. Missing cgroups are fine. It gives up after
// timeout.
func destroyCgroups(ctx context.Context, paths []string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var errs []error
	for _, p := range paths {
		if err := destroyCgroup(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func destroyCgroup(ctx context.Context, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	// cgroup.kill (v2, Linux 5.14+) kills atomically, forks included; the
	// loop below covers v1 and catches anything cgroup.kill raced with.
	_ = os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		pids, err := cgroupPIDs(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("listing cgroup %s: %w", dir, err)
		}
		if len(pids) == 0 {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return nil
			}
			// EBUSY: an exiting task has not left the cgroup yet.
			if !errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("removing cgroup %s: %w", dir, err)
			}
		}
		for _, pid := range pids {
			killInCgroup(pid, dir)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("removing cgroup %s: processes left after kill: %w", dir, ctx.Err())
		case <-tick.C:
		}
	}
}

// killInCgroup SIGKILLs pid if it is still a member of dir. The pidfd pins
// the process so that a recycled pid is never signalled.
func killInCgroup(pid int, dir string) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return // gone
	}
	defer unix.Close(fd)
	pids, err := cgroupPIDs(dir)
	if err != nil {
		return
	}
	for _, p := range pids {
		if p == pid {
			_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			return
		}
	}
}

func cgroupPIDs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// removeParents removes the manager's parent cgroups if they are empty, so
// that closed drivers (each state directory has its own parent) leave
// nothing behind. The shared "invokex" level above is kept: another
// driver may be creating its parent in it right now.
func (m *cgroupManager) removeParents() {
	for i, parent := range []string{m.memDir, m.pidsDir} {
		if parent == "" || (i == 1 && parent == m.memDir) {
			continue
		}
		_ = unix.Rmdir(parent) // fails while instance cgroups remain: fine
	}
}

// children lists the instance cgroup names under the manager's parents.
func (m *cgroupManager) children() map[string][]string {
	out := map[string][]string{}
	for i, parent := range []string{m.memDir, m.pidsDir} {
		if parent == "" || (i == 1 && parent == m.memDir) {
			continue
		}
		ents, err := os.ReadDir(parent)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				out[e.Name()] = append(out[e.Name()], filepath.Join(parent, e.Name()))
			}
		}
	}
	return out
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
