package agent

import (
	"bytes"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// statusBufSize holds the start of /proc/<pid>/status up to VmHWM (line
// 17 or so, under 1 KiB) with a wide margin.
const statusBufSize = 4096

// peakReader reads a runtime's peak resident set (VmHWM) for the REPORT
// line's Max Memory Used, once per invocation. It keeps
// /proc/<pid>/status open and reads it with one pread into a reused
// buffer: opening, scanning and closing the file for every invocation cost
// 3-4% of the machine's CPU under load, more than anything else the agent
// does per invocation. VmHWM is the kernel's own high-water mark, so one
// read after an invocation includes every peak of that invocation.
//
// The open file stays bound to the process it was opened for (a pid reused
// later is another file), so the parent check made when it is opened holds
// for its life. It is used by the session goroutine only.
type peakReader struct {
	fd      int // -1 until opened; see refused
	refused bool
	buf     []byte
}

func newPeakReader() peakReader { return peakReader{fd: -1} }

// readKB returns pid's VmHWM in KiB, or 0 if it cannot be read (the
// process is gone, or /proc shows another pid namespace than ours).
func (r *peakReader) readKB(pid int) int64 {
	if r.fd < 0 {
		if r.refused || !r.open(pid) {
			return 0
		}
	}
	n, err := unix.Pread(r.fd, r.buf, 0)
	if err != nil || n <= 0 {
		return 0
	}
	// A zombie's status has no Vm lines.
	return max(statusField(r.buf[:n], "VmHWM"), 0)
}

// open opens pid's status file and checks that the process is our child:
// /proc shows someone else's process under that pid when it belongs to
// another pid namespace than ours, and that is never read again.
func (r *peakReader) open(pid int) bool {
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+"/status", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false // gone, or a transient failure: try again next time
	}
	if r.buf == nil {
		r.buf = make([]byte, statusBufSize)
	}
	n, err := unix.Pread(fd, r.buf, 0)
	if err != nil || n <= 0 {
		unix.Close(fd)
		return false
	}
	if statusField(r.buf[:n], "PPid") != int64(os.Getpid()) {
		unix.Close(fd)
		r.refused = true
		return false
	}
	r.fd = fd
	return true
}

// close releases the file; the reader may be opened again afterwards.
func (r *peakReader) close() {
	if r.fd >= 0 {
		unix.Close(r.fd)
		r.fd = -1
	}
}

// statusField returns the leading number of a "Key:\t<n>..." line of a
// /proc status file, or -1 if there is none.
func statusField(b []byte, key string) int64 {
	for len(b) > 0 {
		line := b
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			line, b = b[:i], b[i+1:]
		} else {
			b = nil
		}
		if len(line) <= len(key) || line[len(key)] != ':' || string(line[:len(key)]) != key {
			continue
		}
		v := bytes.TrimLeft(line[len(key)+1:], " \t")
		var n int64
		digits := 0
		for _, c := range v {
			if c < '0' || c > '9' {
				break
			}
			n = n*10 + int64(c-'0')
			digits++
		}
		if digits == 0 {
			return -1
		}
		return n
	}
	return -1
}
