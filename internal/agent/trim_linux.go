package agent

import (
	"bufio"
	"bytes"
	"os"
	"runtime/debug"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// idleTrimAfter is how long the agent waits without a request before it
// trims its memory. The first request after a trim maps back the pages it
// needs (minor faults from the page cache, a fraction of a millisecond in
// all), so the wait is long enough that steady traffic never pays that,
// short enough that an instance left idle is lean soon after.
const idleTrimAfter = 10 * time.Second

// trimImage returns the agent's free heap to the kernel, and drops the
// agent binary's read-only pages from the agent's
// resident set and turns off fault-around for them.
//
// Why: at start-up the Go runtime runs every package initialiser, and the
// kernel maps 64 KiB around each page fault on a file mapping, so nearly
// the whole binary ends up mapped though an idle agent needs a few hundred
// KiB of it. Those pages stay in the page cache, shared by every instance
// (PSS is unaffected); what shrinks is each instance's RSS and page tables,
// and with MADV_RANDOM later faults map only the page touched.
//
// Only never-writable mappings of the executable are touched (text,
// rodata): MADV_DONTNEED on them loses nothing, the next access maps the
// same page again from the page cache. Errors are ignored: this is an
// optimisation and a kernel that refuses leaves the agent as it was.
func trimImage() {
	// Return the heap INIT left behind first: the collection touches
	// runtime code the trim below then drops again.
	debug.FreeOSMemory()
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &st); err != nil {
		return
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return
	}
	for _, r := range imageRanges(maps, st.Ino, uint32(unix.Major(st.Dev)), uint32(unix.Minor(st.Dev))) {
		madvise(r[0], r[1]-r[0], unix.MADV_RANDOM)
		madvise(r[0], r[1]-r[0], unix.MADV_DONTNEED)
	}
}

// madvise takes the range as integers: it names the process's own
// mappings, never Go memory, so no unsafe.Pointer is made.
func madvise(addr, length uintptr, advice int) {
	_, _, _ = unix.Syscall(unix.SYS_MADVISE, addr, length, uintptr(advice))
}

// imageRanges returns [start, end) of the read-only, non-writable mappings
// of the file with inode ino on device major:minor in a /proc/PID/maps
// listing.
func imageRanges(maps []byte, ino uint64, major, minor uint32) [][2]uintptr {
	var out [][2]uintptr
	sc := bufio.NewScanner(bytes.NewReader(maps))
	for sc.Scan() {
		// 00400000-0052c000 r-xp 00000000 fd:01 1234   /path
		f := bytes.Fields(sc.Bytes())
		if len(f) < 5 {
			continue
		}
		perms := f[1]
		if len(perms) != 4 || perms[0] != 'r' || perms[1] != '-' || perms[3] != 'p' {
			continue // writable (could hold private changes) or shared
		}
		if n, err := strconv.ParseUint(string(f[4]), 10, 64); err != nil || n != ino {
			continue
		}
		maj, min, ok := bytes.Cut(f[3], []byte(":"))
		if !ok || !hexIs(maj, major) || !hexIs(min, minor) {
			continue
		}
		lo, hi, ok := bytes.Cut(f[0], []byte("-"))
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(string(lo), 16, 64)
		end, err2 := strconv.ParseUint(string(hi), 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		out = append(out, [2]uintptr{uintptr(start), uintptr(end)})
	}
	return out
}

func hexIs(b []byte, want uint32) bool {
	v, err := strconv.ParseUint(string(b), 16, 32)
	return err == nil && uint32(v) == want
}

// dropCachesPath is the kernel's knob; a variable so tests never touch
// the real one (which, outside a VM, is the host's).
var dropCachesPath = "/proc/sys/vm/drop_caches"

// dropCaches asks the kernel to free its clean page cache and slab
// caches. Only for an agent that owns its kernel: in a microVM the freed
// pages go back to the host (free page reporting), so an idle VM holds
// little more than what its processes use. The next request reads what it
// needs again from the VM's disks. Errors are ignored, as in trimImage.
func dropCaches() {
	unix.Sync()
	_ = os.WriteFile(dropCachesPath, []byte("3\n"), 0)
}
