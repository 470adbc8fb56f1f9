// Package protocol is the harness <-> agent wire protocol: the only thing the
// agent inside a sandbox shares with the host. It runs over any reliable byte
// stream: a socketpair for the process sandbox, virtio-serial or vsock for
// microVMs.
//
// # Framing
//
// Every message is one frame:
//
//	type   uint8
//	hlen   uint32 big-endian   length of the JSON header
//	blen   uint32 big-endian   length of the raw body
//	header [hlen]byte          JSON of the type's header struct
//	body   [blen]byte          raw bytes (event or response payload, log)
//
// Payloads travel as raw bytes, never re-encoded. Headers are small.
//
// # Conversation
//
// The harness speaks first and the agent answers; there is at most one
// request outstanding per connection, because an execution environment runs
// one invocation at a time:
//
//	harness                         agent
//	Init{config}            ->      starts the runtime, waits for its first /next
//	                        <-      InitDone{duration | error}  (body: init log on error)
//	Invoke{id, deadline}+event ->   hands the event to the runtime
//	                        <-      Result{...}+payload+log
//	...
//	Shutdown                ->      kills the runtime, answers ShutdownDone, exits
//
// If the runtime died (crash, timeout, init error) the agent re-runs INIT on
// the next Invoke and reports InitDuration in that Result. A closed stream
// means the other side is gone: the agent kills the runtime and exits.
package protocol

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// Version names this revision of the protocol. The agent binary a server
// runs in its sandboxes may be a separate file (cmd/invokex-agent); the
// server asks it for its Version and refuses one that differs, so a stale
// agent next to a new server is caught at start-up, not as garbled frames.
// Change it whenever frames or their meaning change.
const Version = "invokex-protocol/4"

// Type identifies a frame.
type Type uint8

const (
	TypeInit Type = iota + 1
	TypeInitDone
	TypeInvoke
	TypeResult
	TypeShutdown
	TypeShutdownDone
	TypeRestore
	TypeRestoreDone
)

func (t Type) String() string {
	switch t {
	case TypeInit:
		return "Init"
	case TypeInitDone:
		return "InitDone"
	case TypeInvoke:
		return "Invoke"
	case TypeResult:
		return "Result"
	case TypeShutdown:
		return "Shutdown"
	case TypeShutdownDone:
		return "ShutdownDone"
	case TypeRestore:
		return "Restore"
	case TypeRestoreDone:
		return "RestoreDone"
	}
	return fmt.Sprintf("Type(%d)", uint8(t))
}

// Limits of one frame. A body holds at most a 6 MB payload plus a capped log.
const (
	MaxHeader = 64 << 10
	MaxBody   = 8 << 20
)

// ErrFrameTooLarge is returned for a frame over MaxHeader or MaxBody.
var ErrFrameTooLarge = errors.New("protocol: frame too large")

// Init configures the execution environment and starts INIT.
type Init struct {
	FunctionName    string
	FunctionVersion string
	FunctionARN     string
	MemoryMB        int
	TimeoutSec      int
	// Command is the runtime's bootstrap command line inside the sandbox.
	Command []string
	// Env is the runtime's complete environment (KEY=VALUE), built by the
	// harness: Lambda's reserved variables plus the user's.
	Env []string
	// Dir is the runtime's working directory (/var/task).
	Dir string
	// UID and GID the runtime runs as when the agent is root; 0 keeps the agent's.
	UID, GID int
	// InitTimeoutMs bounds INIT (Lambda: 10 s); 0 means 10 s.
	InitTimeoutMs int64
	// LogLimit caps the log kept per invocation (bytes); 0 means 256 KiB.
	LogLimit int
	// InitType is AWS_LAMBDA_INITIALIZATION_TYPE (on-demand by default).
	InitType string
	// HostUnixNano is the harness's wall clock when it sent this frame. A
	// VM's clock starts from the host's launch time plus the guest
	// kernel's uptime, which misses the boot before the kernel's clock ran
	// (a few hundred ms under emulation); deadlines are absolute host
	// times, so an agent that owns its kernel's clock sets it from this.
	HostUnixNano int64 `json:",omitempty"`
}

// Restore tells an agent that its environment was restored from a
// snapshot (SnapStart) and is a new one: the harness sends it, before any
// Invoke, to an instance started from a snapshot taken after INIT (whose
// Init had InitType "snap-start"). Every restore of one snapshot starts
// from the same memory, so whatever must be unique is made so here.
type Restore struct {
	// HostUnixNano is the harness's clock, as in Init.
	HostUnixNano int64 `json:",omitempty"`
	// Seed is fresh randomness from the host. An agent that owns its
	// kernel mixes it into the kernel's pool and reseeds the kernel's
	// generator, so no two restores draw the same random numbers.
	Seed []byte `json:",omitempty"`
	// Hostname is the new environment's hostname ("" keeps it).
	Hostname string `json:",omitempty"`
	// RestoreDuration is the platform's share of the restore so far (the
	// VMM loading the snapshot); the agent adds its own and reports the
	// sum with the first invocation, as Lambda's "Restore Duration".
	RestoreDuration time.Duration `json:",omitempty"`
}

// RestoreDone answers Restore.
type RestoreDone struct {
	Error *ErrorInfo `json:",omitempty"`
}

// ErrorInfo is the runtime's error document, as Lambda returns it.
type ErrorInfo struct {
	ErrorMessage string   `json:"errorMessage"`
	ErrorType    string   `json:"errorType,omitempty"`
	StackTrace   []string `json:"stackTrace,omitempty"`
}

// InitDone answers Init. On error the body carries the INIT log.
type InitDone struct {
	InitDuration time.Duration
	Error        *ErrorInfo `json:",omitempty"`
}

// Invoke hands one event to the runtime. The body is the event payload.
type Invoke struct {
	RequestID      string
	DeadlineUnixMs int64
	FunctionARN    string
	TraceID        string `json:",omitempty"`
	// ClientContext is the decoded JSON of X-Amz-Client-Context.
	ClientContext   string `json:",omitempty"`
	CognitoIdentity string `json:",omitempty"`
	// HostUnixNano is the harness's wall clock when it sent this frame
	// (see Init.HostUnixNano): DeadlineUnixMs is a host time, so an agent
	// that owns its kernel's clock keeps it in step from this.
	HostUnixNano int64 `json:",omitempty"`
}

// Result answers Invoke. The body is the response payload (PayloadLen bytes)
// followed by the invocation's log (the rest): START, the function's output,
// END and REPORT lines, capped at Init.LogLimit.
type Result struct {
	RequestID string
	// FunctionError is "" on success and "Unhandled" when the function failed
	// (error posted by the runtime, crash, timeout, oversize response); the
	// payload is then the ErrorInfo JSON.
	FunctionError string `json:",omitempty"`
	ErrorType     string `json:",omitempty"`
	PayloadLen    int
	// LogBytes counts all output of this invocation, including what the cap dropped.
	LogBytes int64
	Duration time.Duration
	// InitDuration is set when INIT ran as part of this invocation (cold start
	// or re-init after a crash) or, for the first invocation, the Init it followed.
	InitDuration time.Duration `json:",omitempty"`
	// RestoreDuration is set on the first invocation after a Restore.
	RestoreDuration time.Duration `json:",omitempty"`
	MaxMemoryMB     int
	// Reset reports that the runtime was killed or died (timeout, crash,
	// oversize response) and INIT will run again before the next invocation.
	Reset bool `json:",omitempty"`
}

// Split separates a Result body into payload and log.
func (r *Result) Split(body []byte) (payload, log []byte) {
	n := r.PayloadLen
	if n < 0 || n > len(body) {
		n = len(body)
	}
	return body[:n], body[n:]
}

// Shutdown asks the agent to stop the runtime and exit.
type Shutdown struct{}

// ShutdownDone answers Shutdown just before the agent exits.
type ShutdownDone struct{}

// Frame is one decoded message. Header is the raw JSON; use Decode.
type Frame struct {
	Type   Type
	Header []byte
	Body   []byte
}

// Decode unmarshals the frame's header into v (see codec.go: Invoke and
// Result are decoded without reflection).
func (f *Frame) Decode(v any) error {
	if err := decodeHeader(f.Header, v); err != nil {
		return fmt.Errorf("protocol: decoding %s header: %w", f.Type, err)
	}
	return nil
}

// Conn reads and writes frames on a byte stream. ReadFrame and WriteFrame may
// be called concurrently with each other, but each must not be called
// concurrently with itself.
type Conn struct {
	r  *bufio.Reader
	w  io.Writer
	c  io.Closer
	mu sync.Mutex // guards writes and wbuf
	// wbuf is reused for the prefix and header of every frame, and for the
	// whole of a small one; it is dropped after a frame larger than
	// maxKeptWriteBuf so an idle connection holds little.
	wbuf []byte
	// rpre holds the prefix of the frame being read (ReadFrame only).
	rpre [prefixLen]byte
}

const (
	// prefixLen is the fixed part of a frame: type, hlen, blen.
	prefixLen = 9
	// oneWriteMax is the largest body copied into the write buffer so the
	// frame goes out in one write: one packet, one virtio descriptor chain.
	// Larger bodies are written in place.
	oneWriteMax = 32 << 10
	// maxKeptWriteBuf bounds the write buffer a Conn keeps between frames.
	maxKeptWriteBuf = 16 << 10
)

// NewConn wraps rw. If rw is an io.Closer, Close closes it.
func NewConn(rw io.ReadWriter) *Conn {
	c := &Conn{r: bufio.NewReaderSize(rw, 64<<10), w: rw}
	if cl, ok := rw.(io.Closer); ok {
		c.c = cl
	}
	return c
}

// Close closes the underlying stream, which unblocks a pending ReadFrame.
func (c *Conn) Close() error {
	if c.c == nil {
		return nil
	}
	return c.c.Close()
}

// WriteFrame encodes header as JSON and writes one frame with the given body
// parts concatenated (so payload and log need no copy into one buffer).
func (c *Conn) WriteFrame(t Type, header any, body ...[]byte) error {
	blen := 0
	for _, b := range body {
		blen += len(b)
	}
	if blen > MaxBody {
		return fmt.Errorf("protocol: writing %s: %w", t, ErrFrameTooLarge)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	buf := append(c.wbuf[:0], make([]byte, prefixLen)...)
	buf, err := appendHeader(buf, header)
	if err != nil {
		return fmt.Errorf("protocol: encoding %s header: %w", t, err)
	}
	hlen := len(buf) - prefixLen
	if hlen > MaxHeader {
		return fmt.Errorf("protocol: writing %s: %w", t, ErrFrameTooLarge)
	}
	buf[0] = byte(t)
	binary.BigEndian.PutUint32(buf[1:5], uint32(hlen))
	binary.BigEndian.PutUint32(buf[5:9], uint32(blen))
	if blen <= oneWriteMax {
		for _, b := range body {
			buf = append(buf, b...)
		}
		_, err = c.w.Write(buf)
	} else {
		err = writeAll(c.w, buf, body)
	}
	if cap(buf) <= maxKeptWriteBuf {
		c.wbuf = buf[:0]
	} else {
		c.wbuf = nil
	}
	if err != nil {
		return fmt.Errorf("protocol: writing %s: %w", t, err)
	}
	return nil
}

func writeAll(w io.Writer, head []byte, body [][]byte) error {
	if _, err := w.Write(head); err != nil {
		return err
	}
	for _, b := range body {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// ReadFrame reads the next frame. It returns io.EOF when the stream ended
// cleanly between frames and io.ErrUnexpectedEOF inside a frame.
func (c *Conn) ReadFrame() (*Frame, error) {
	pre := c.rpre[:]
	if _, err := io.ReadFull(c.r, pre); err != nil {
		return nil, err
	}
	hlen := binary.BigEndian.Uint32(pre[1:5])
	blen := binary.BigEndian.Uint32(pre[5:9])
	if hlen > MaxHeader || blen > MaxBody {
		return nil, ErrFrameTooLarge
	}
	buf := make([]byte, int(hlen)+int(blen))
	if _, err := io.ReadFull(c.r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return &Frame{Type: Type(pre[0]), Header: buf[:hlen:hlen], Body: buf[hlen:]}, nil
}
