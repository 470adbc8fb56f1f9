package drivertest

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupRoot is where the suite looks for cgroups named after an instance.
const cgroupRoot = "/sys/fs/cgroup"

// leftovers lists what of instance id exists on the host: host processes
// (pid if known, and any process whose command line or environment names
// the ID), entries of stateDir whose path contains the ID, mounts in the
// host's mount namespace whose path contains it, loop devices over a file
// whose path does, and cgroups named after it. Drivers name their resources after the ID, so an empty
// answer means the instance is gone.
func leftovers(id string, pid int, stateDir string) []string {
	var found []string
	if pid > 0 && processAlive(pid) {
		found = append(found, "process "+strconv.Itoa(pid)+" is alive")
	}
	found = append(found, processesNaming(id)...)
	_ = filepath.WalkDir(stateDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && strings.Contains(strings.TrimPrefix(p, stateDir), id) {
			found = append(found, "state entry "+p)
		}
		return nil
	})
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, id) {
				found = append(found, "mount "+line)
			}
		}
	}
	backing, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range backing {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), id) {
			found = append(found, "loop device "+filepath.Base(filepath.Dir(filepath.Dir(p)))+" over "+strings.TrimSpace(string(b)))
		}
	}
	found = append(found, cgroupsNamed(id)...)
	return found
}

// waitNoLeftovers fails t if anything of id is still on the host. The
// sandbox's processes are killed synchronously by Stop and Recover, but
// their exit is reported by the kernel a moment later, so it polls briefly.
func waitNoLeftovers(t *testing.T, id string, pid int, stateDir string) {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(10 * time.Second); ; {
		left = leftovers(id, pid, stateDir)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("instance %s left behind:\n  %s", id, strings.Join(left, "\n  "))
}

// processAlive reports whether pid exists and is not a zombie (a zombie
// holds nothing but its pid until its parent, possibly the host's init,
// reaps it).
func processAlive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return false
	}
	state := s[i+2]
	return state != 'Z' && state != 'X'
}

// processesNaming lists host processes whose command line or environment
// contains id.
func processesNaming(id string) []string {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var found []string
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		for _, f := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join("/proc", e.Name(), f))
			if err == nil && bytes.Contains(b, []byte(id)) && processAlive(pid) {
				found = append(found, "process "+e.Name()+" names the instance in its "+f)
				break
			}
		}
	}
	return found
}

// cgroupsNamed lists cgroup directories named id, at most 6 levels below
// the cgroup mount point.
func cgroupsNamed(id string) []string {
	var found []string
	_ = filepath.WalkDir(cgroupRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if strings.Count(strings.TrimPrefix(p, cgroupRoot), "/") > 6 {
			return filepath.SkipDir
		}
		if d.Name() == id {
			found = append(found, "cgroup "+p)
			return filepath.SkipDir
		}
		return nil
	})
	return found
}
