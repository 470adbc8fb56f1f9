package firecracker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// Limits a jailed VM's cgroup gets on top of its guest memory: the VMM's
// own memory (its threads, page tables, I/O buffers and the page cache of
// the scratch disk it writes) and its tasks (Firecracker has a handful of
// threads plus one per vCPU).
const (
	vmmOverheadMB = 64
	vmmPids       = 64
)

// cgroupSetup is where the jailer puts a VM's cgroups (docs/jailer.md):
// <hierarchy>/<parent>/<id> in the cgroup v2 hierarchy, or in each cgroup
// v1 hierarchy of a controller the driver limits. Version 0 means no
// cgroup limits (why says why).
type cgroupSetup struct {
	Version int
	// MemoryRoot and PidsRoot are the hierarchies of the memory and pids
	// controllers (the same directory on v2).
	MemoryRoot, PidsRoot string
	why                  string
}

// detectCgroups reads mounts (/proc/mounts) as the jailer does: cgroup v2
// when its hierarchy offers the memory and pids controllers, else v1 when
// both have a hierarchy of their own, else none.
func detectCgroups(mounts string) cgroupSetup {
	f, err := os.Open(mounts)
	if err != nil {
		return cgroupSetup{why: "reading " + mounts + ": " + err.Error()}
	}
	defer f.Close()
	var unified string
	v1 := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 4 {
			continue
		}
		dir, fstype := fields[1], fields[2]
		switch fstype {
		case "cgroup2":
			if unified == "" {
				unified = dir
			}
		case "cgroup":
			for _, o := range strings.Split(fields[3], ",") {
				if o == "memory" || o == "pids" {
					if _, ok := v1[o]; !ok {
						v1[o] = dir
					}
				}
			}
		}
	}
	if unified != "" {
		b, _ := os.ReadFile(filepath.Join(unified, "cgroup.controllers"))
		ctrls := strings.Fields(string(b))
		if contains(ctrls, "memory") && contains(ctrls, "pids") {
			return cgroupSetup{Version: 2, MemoryRoot: unified, PidsRoot: unified}
		}
	}
	if v1["memory"] != "" && v1["pids"] != "" {
		return cgroupSetup{Version: 1, MemoryRoot: v1["memory"], PidsRoot: v1["pids"]}
	}
	return cgroupSetup{why: "neither a cgroup v2 hierarchy with the memory and pids controllers nor v1 hierarchies of both"}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

// files are the jailer's --cgroup settings for a VM of memoryMB.
func (c cgroupSetup) files(memoryMB int) []string {
	mem := strconv.FormatInt(int64(memoryMB+vmmOverheadMB)<<20, 10)
	pids := strconv.Itoa(vmmPids)
	switch c.Version {
	case 2:
		return []string{"memory.max=" + mem, "pids.max=" + pids}
	case 1:
		return []string{"memory.limit_in_bytes=" + mem, "pids.max=" + pids}
	}
	return nil
}

// dirs are the cgroup directories the jailer creates for VM id.
func (c cgroupSetup) dirs(parent, id string) []string {
	switch c.Version {
	case 2:
		return []string{filepath.Join(c.MemoryRoot, parent, id)}
	case 1:
		return []string{filepath.Join(c.MemoryRoot, parent, id), filepath.Join(c.PidsRoot, parent, id)}
	}
	return nil
}

// jail is one jailed VM's jailer invocation.
type jail struct {
	Jailer, Firecracker string
	ID                  string
	UID, GID            int
	// ChrootBase is --chroot-base-dir; the chroot is
	// <ChrootBase>/<file name of Firecracker>/<ID>/root.
	ChrootBase string
	// NetNS, if set, is a network namespace (a path such as
	// /var/run/netns/NAME) the jailer joins.
	NetNS    string
	Cgroups  cgroupSetup
	Parent   string // --parent-cgroup
	MemoryMB int
}

// chroot is the directory the jailed Firecracker sees as /.
func (j jail) chroot() string {
	return filepath.Join(j.ChrootBase, filepath.Base(j.Firecracker), j.ID, "root")
}

// args is the jailer's command line (argv[1:]), per docs/jailer.md: it
// copies Firecracker into the chroot, sets the cgroup limits, joins the
// network namespace, drops to UID:GID and execs Firecracker with the
// arguments after "--". Firecracker then creates its API socket in the
// chroot.
func (j jail) args() []string {
	a := []string{
		"--id", j.ID,
		"--exec-file", j.Firecracker,
		"--uid", strconv.Itoa(j.UID),
		"--gid", strconv.Itoa(j.GID),
		"--chroot-base-dir", j.ChrootBase,
	}
	if files := j.Cgroups.files(j.MemoryMB); len(files) > 0 {
		a = append(a, "--cgroup-version", strconv.Itoa(j.Cgroups.Version), "--parent-cgroup", j.Parent)
		for _, f := range files {
			a = append(a, "--cgroup", f)
		}
	}
	if j.NetNS != "" {
		a = append(a, "--netns", j.NetNS)
	}
	return append(a, "--", "--api-sock", "/"+apiSock)
}

// linkOrCopy puts a read-only image at dst: a hard link to src when both
// are on one file system (instant, no space), else a copy (io.Copy uses
// copy_file_range, which reflinks where the file system can). The jailed
// Firecracker reaches nothing outside its chroot, so its files must be
// inside.
func linkOrCopy(src, dst string) (copied bool, err error) {
	if err := os.Link(src, dst); err == nil {
		return false, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", src, err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return false, fmt.Errorf("creating %s: %w", dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return true, fmt.Errorf("copying %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return true, fmt.Errorf("copying %s: %w", src, err)
	}
	return true, nil
}

// cgroupRemoveWait bounds the wait for a VM's cgroup to empty: its last
// task leaves it a moment after it was reaped.
const cgroupRemoveWait = 5 * time.Second

// removeCgroups kills whatever is still in dirs (cgroup.procs, a VM whose
// harness crashed) and removes them. A missing directory is not an error.
func removeCgroups(ctx context.Context, dirs []string) error {
	var errs []error
	for _, dir := range dirs {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			continue
		}
		killCgroup(ctx, dir)
		deadline := time.Now().Add(cgroupRemoveWait)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				errs = append(errs, fmt.Errorf("removing cgroup %s: %w", dir, err))
				break
			}
			// EBUSY: a task is still leaving.
			time.Sleep(10 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

// killCgroup SIGKILLs every process listed in dir/cgroup.procs.
func killCgroup(ctx context.Context, dir string) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if p, err := hostproc.Lookup(pid); err == nil {
			_ = p.Kill(ctx, nil)
		}
	}
}
