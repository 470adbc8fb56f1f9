package agent

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Log limits.
const (
	// defaultLogLimit is the log kept per invocation when Init.LogLimit is 0.
	defaultLogLimit = 256 << 10
	// minTail is the least of an invocation's output kept at its end, so
	// Lambda's "last 4 KB" (X-Amz-Log-Result) is always real output.
	minTail = 4 << 10
	// maxLogLimit keeps a Result frame under protocol.MaxBody: a 6 MB
	// payload plus two capped sections (output before START and during the
	// invocation) plus the Lambda lines.
	maxLogLimit = (8<<20 - maxPayload - 64<<10) / 2
	// readChunk is the drainer's read size; it bounds the agent's memory per
	// read no matter how much the runtime writes.
	readChunk = 64 << 10
	// pipeSize is requested for the output pipe so that bursts of output do
	// not block the runtime while the drainer is descheduled.
	pipeSize = 1 << 20
)

// capBuffer keeps at most a fixed number of bytes of a stream: its head and
// its tail. Bytes in between are counted and dropped, so a function that
// prints gigabytes costs the agent a bounded amount of memory. Not safe for
// concurrent use (output guards it).
type capBuffer struct {
	headCap, tailCap int
	head             []byte
	ring             []byte // tail ring; allocated on first use
	pos              int    // next write position in ring
	full             bool   // ring has wrapped at least once
	total            int64  // every byte written, kept or not
}

// newCapBuffer returns a buffer that keeps at most limit bytes: the last
// quarter (at least minTail) as tail, the rest as head.
func newCapBuffer(limit int) *capBuffer {
	if limit <= 0 {
		limit = defaultLogLimit
	}
	tail := max(limit/4, minTail)
	if tail > limit {
		tail = limit
	}
	return &capBuffer{headCap: limit - tail, tailCap: tail}
}

// Write keeps p's bytes within the limits; it never fails.
func (b *capBuffer) Write(p []byte) (int, error) {
	n := len(p)
	b.total += int64(n)
	if room := b.headCap - len(b.head); room > 0 {
		k := min(room, len(p))
		b.head = append(b.head, p[:k]...)
		p = p[k:]
	}
	if len(p) == 0 || b.tailCap == 0 {
		return n, nil
	}
	if b.ring == nil {
		b.ring = make([]byte, b.tailCap)
	}
	if len(p) >= b.tailCap {
		copy(b.ring, p[len(p)-b.tailCap:])
		b.pos, b.full = 0, true
		return n, nil
	}
	k := copy(b.ring[b.pos:], p)
	if k < len(p) {
		copy(b.ring, p[k:])
		b.full = true
	}
	b.pos = (b.pos + len(p)) % b.tailCap
	if b.pos == 0 && len(p) > 0 {
		b.full = true
	}
	return n, nil
}

// Total returns the number of bytes written, including dropped ones.
func (b *capBuffer) Total() int64 { return b.total }

func (b *capBuffer) tailLen() int {
	if b.full {
		return b.tailCap
	}
	return b.pos
}

// Dropped returns how many bytes were written but not kept.
func (b *capBuffer) Dropped() int64 {
	return b.total - int64(len(b.head)) - int64(b.tailLen())
}

// Segments returns the kept bytes in order without copying them: head, a
// marker line saying how many bytes were dropped (if any), tail. The slices
// alias the buffer; do not write to it while they are in use.
func (b *capBuffer) Segments() [][]byte {
	var segs [][]byte
	if len(b.head) > 0 {
		segs = append(segs, b.head)
	}
	if d := b.Dropped(); d > 0 {
		marker := "[" + strconv.FormatInt(d, 10) + " bytes of output dropped: log limit reached]\n"
		if len(b.head) > 0 && b.head[len(b.head)-1] != '\n' {
			marker = "\n" + marker
		}
		segs = append(segs, []byte(marker))
	}
	if b.full {
		if b.pos < b.tailCap {
			segs = append(segs, b.ring[b.pos:])
		}
		if b.pos > 0 {
			segs = append(segs, b.ring[:b.pos])
		}
	} else if b.pos > 0 {
		segs = append(segs, b.ring[:b.pos])
	}
	return segs
}

// endsInNewline reports whether the kept bytes are empty or end with '\n',
// so that the Lambda lines that follow start on a line of their own.
func (b *capBuffer) endsInNewline() bool {
	segs := b.Segments()
	if len(segs) == 0 {
		return true
	}
	last := segs[len(segs)-1]
	return last[len(last)-1] == '\n'
}

// Bytes returns a copy of the kept bytes (with the marker); for tests and
// small logs.
func (b *capBuffer) Bytes() []byte {
	var out []byte
	for _, s := range b.Segments() {
		out = append(out, s...)
	}
	return out
}

// output is the one pipe that receives everything the runtime (and every
// process it starts) writes to stdout and stderr. A single goroutine drains
// it continuously into the current sink, so the runtime never blocks on a
// full pipe, whatever the agent is doing.
//
// Attribution: the sink is switched with setSink, which first moves every
// byte already in the pipe into the old sink. Reads and appends happen under
// mu, so when setSink holds mu no byte is "in flight" between the pipe and a
// sink: anything written before setSink was called is either in the old sink
// already or still in the pipe, where FIONREAD counts it.
type output struct {
	r     int      // read end, non-blocking, never leaves the agent
	w     *os.File // write end, blocking, given to runtimes as fd 1 and 2
	stopR int      // self-pipe that ends the drain loop
	stopW int

	mu   sync.Mutex
	sink *capBuffer
	buf  []byte

	done chan struct{}
}

// newOutput creates the pipe and starts the drainer. Output goes to sink
// until setSink changes it. close must be called.
func newOutput(sink *capBuffer) (*output, error) {
	var p [2]int
	// The write end must stay blocking: O_NONBLOCK belongs to the open file
	// description, which the runtime shares, and a runtime whose stdout
	// returns EAGAIN breaks (Python raises BlockingIOError).
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("creating output pipe: %w", err)
	}
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, fmt.Errorf("setting output pipe non-blocking: %w", err)
	}
	// Best effort: a bigger pipe absorbs bursts; the default 64 KiB works too.
	_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize)
	var s [2]int
	if err := unix.Pipe2(s[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, fmt.Errorf("creating output stop pipe: %w", err)
	}
	o := &output{
		r:     p[0],
		w:     os.NewFile(uintptr(p[1]), "runtime-output"),
		stopR: s[0],
		stopW: s[1],
		sink:  sink,
		buf:   make([]byte, readChunk),
		done:  make(chan struct{}),
	}
	go o.drain()
	return o, nil
}

// writer returns the pipe's write end, to hand to a runtime as stdout and
// stderr. The agent keeps it open for its whole life, so the pipe never
// reports end of file and survives runtime restarts.
func (o *output) writer() *os.File { return o.w }

// drain moves pipe contents into the current sink until close. It blocks in
// poll(2) (not holding mu) and reads under mu.
func (o *output) drain() {
	defer close(o.done)
	fds := []unix.PollFd{
		{Fd: int32(o.r), Events: unix.POLLIN},
		{Fd: int32(o.stopR), Events: unix.POLLIN},
	}
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return
		}
		if fds[1].Revents != 0 {
			return
		}
		if fds[0].Revents&(unix.POLLIN|unix.POLLHUP|unix.POLLERR) != 0 {
			o.mu.Lock()
			_, err := o.readOnce(len(o.buf))
			o.mu.Unlock()
			if err != nil && !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
				return
			}
		}
	}
}

// readOnce reads at most limit bytes from the pipe into the sink. Callers
// hold mu. It returns 0, EAGAIN when the pipe is empty.
func (o *output) readOnce(limit int) (int, error) {
	n, err := unix.Read(o.r, o.buf[:min(limit, len(o.buf))])
	if n > 0 {
		o.sink.Write(o.buf[:n])
	}
	if err != nil {
		return 0, err
	}
	if n == 0 {
		// All write ends closed; cannot happen while o.w is open.
		return 0, unix.EAGAIN
	}
	return n, nil
}

// flushLocked moves every byte that is in the pipe now into the sink. It
// reads no more than FIONREAD reported, so a runtime that keeps writing
// cannot make it loop forever. Callers hold mu.
func (o *output) flushLocked() {
	pending, err := unix.IoctlGetInt(o.r, unix.TIOCINQ) // TIOCINQ is FIONREAD
	if err != nil {
		pending = len(o.buf) // read what we can; EAGAIN ends it
	}
	for pending > 0 {
		n, err := o.readOnce(pending)
		if err != nil {
			return
		}
		pending -= n
	}
}

// flush moves everything already written into the current sink.
func (o *output) flush() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.flushLocked()
}

// setSink moves everything already written into the current sink, then
// sends later output to next.
func (o *output) setSink(next *capBuffer) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.flushLocked()
	o.sink = next
}

// replaceSink moves everything already written into the current sink, then
// replaces the sink with build's result, atomically with respect to output.
func (o *output) replaceSink(build func(cur *capBuffer) *capBuffer) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.flushLocked()
	o.sink = build(o.sink)
}

// close stops the drainer, waits for it and closes the pipe.
func (o *output) close() {
	_, _ = unix.Write(o.stopW, []byte{0})
	<-o.done
	unix.Close(o.r)
	o.w.Close()
	unix.Close(o.stopR)
	unix.Close(o.stopW)
}
