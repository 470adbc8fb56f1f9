// Package cpuset handles CPU affinity masks: the process driver places
// sandboxes on CPUs, and a VM's agent keeps a vCPU of its own.
//
// Affinity is per thread on Linux. A thread inherits its creator's mask, and
// a child process its forking thread's, so setting the mask of every thread
// of a process once is enough for everything it starts afterwards.
package cpuset

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Mask is the affinity mask holding cpus.
func Mask(cpus []int) unix.CPUSet {
	var set unix.CPUSet
	for _, c := range cpus {
		set.Set(c)
	}
	return set
}

// List is the CPUs of set, ascending.
func List(set unix.CPUSet) []int {
	var cpus []int
	for c := 0; c < len(set)*64; c++ {
		if set.IsSet(c) {
			cpus = append(cpus, c)
		}
	}
	return cpus
}

// Allowed is the CPUs the calling thread may run on.
func Allowed() ([]int, error) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return nil, fmt.Errorf("reading CPU affinity: %w", err)
	}
	return List(set), nil
}

// PinProcess sets the affinity of every thread of pid (0: the calling
// process; a pid of this process's pid namespace) to cpus. A thread may be
// started while the threads are listed, so it lists them until a pass
// finds none it has not pinned (at most 10 passes).
func PinProcess(pid int, cpus []int) error {
	set := Mask(cpus)
	dir := "/proc/self/task"
	if pid != 0 {
		dir = filepath.Join("/proc", strconv.Itoa(pid), "task")
	}
	pinned := map[int]bool{}
	for range 10 {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return fmt.Errorf("listing threads: %w", err)
		}
		fresh := 0
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil || pinned[tid] {
				continue
			}
			// A thread that exited in between is not an error.
			if err := unix.SchedSetaffinity(tid, &set); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("pinning thread %d to CPUs %v: %w", tid, cpus, err)
			}
			pinned[tid] = true
			fresh++
		}
		if fresh == 0 {
			return nil
		}
	}
	return nil
}

// OnThread runs fn with the calling thread's affinity set to cpus, then
// restores it: a child forked by fn starts with cpus. The caller must have
// locked the goroutine to its thread (runtime.LockOSThread).
func OnThread(cpus []int, fn func() error) error {
	if len(cpus) == 0 {
		return fn()
	}
	var saved unix.CPUSet
	if err := unix.SchedGetaffinity(0, &saved); err != nil {
		return fmt.Errorf("reading the thread's CPU affinity: %w", err)
	}
	set := Mask(cpus)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		return fmt.Errorf("setting CPU affinity %v: %w", cpus, err)
	}
	err := fn()
	// Restoring the mask just read fails only if its CPUs went offline;
	// a thread left narrowed costs later children placement, not
	// correctness.
	_ = unix.SchedSetaffinity(0, &saved)
	return err
}
