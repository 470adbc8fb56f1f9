package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// qmpClient speaks the QEMU Machine Protocol over a unix socket: JSON
// objects, one command at a time, answered by {"return": ...} or
// {"error": {...}}, with asynchronous {"event": ...} objects interleaved.
// It is the driver's control channel to a VM (quit, status, and later
// stop/migrate for snapshots). Methods are safe for concurrent use; calls
// are serialized because QMP answers in order without ids.
type qmpClient struct {
	conn net.Conn
	dec  *json.Decoder

	mu sync.Mutex
}

// qmpError is an error QEMU answered a command with.
type qmpError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *qmpError) Error() string { return "qmp: " + e.Class + ": " + e.Desc }

// qmpStatus is query-status's answer.
type qmpStatus struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

// qmpMessage is any object QEMU sends.
type qmpMessage struct {
	Greeting json.RawMessage `json:"QMP"`
	Return   json.RawMessage `json:"return"`
	Error    *qmpError       `json:"error"`
	Event    string          `json:"event"`
}

// dialQMP connects to the QMP socket at path, reads the greeting and
// leaves capabilities negotiation mode, all bounded by ctx.
func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	conn, err := hostproc.DialUnix(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("connecting to qmp: %w", err)
	}
	c := &qmpClient{conn: conn, dec: json.NewDecoder(conn)}
	err = c.withDeadline(ctx, func() error {
		m, err := c.next()
		if err != nil {
			return fmt.Errorf("reading qmp greeting: %w", err)
		}
		if m.Greeting == nil {
			return fmt.Errorf("qmp greeting missing: got %+v", m)
		}
		return c.roundTrip("qmp_capabilities", nil, nil)
	})
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection; a pending call fails.
func (c *qmpClient) Close() error { return c.conn.Close() }

// Execute runs command with args (nil for none) and decodes the return
// value into out (nil to discard it), bounded by ctx.
func (c *qmpClient) Execute(ctx context.Context, command string, args, out any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.withDeadline(ctx, func() error { return c.roundTrip(command, args, out) })
}

// QueryStatus returns the VM's run state.
func (c *qmpClient) QueryStatus(ctx context.Context) (qmpStatus, error) {
	var st qmpStatus
	err := c.Execute(ctx, "query-status", nil, &st)
	return st, err
}

// Stop pauses the VM's vCPUs.
func (c *qmpClient) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the VM's vCPUs.
func (c *qmpClient) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit makes QEMU exit at once (the guest gets no say). QEMU may close
// the socket before or after answering; both count as success.
func (c *qmpClient) Quit(ctx context.Context) error {
	err := c.Execute(ctx, "quit", nil, nil)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func (c *qmpClient) roundTrip(command string, args, out any) error {
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
	}{command, args}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encoding qmp %s: %w", command, err)
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("sending qmp %s: %w", command, err)
	}
	return c.readReturn(command, out)
}

// readReturn reads the answer to command, skipping events.
func (c *qmpClient) readReturn(command string, out any) error {
	for {
		m, err := c.next()
		if err != nil {
			return fmt.Errorf("qmp %s: %w", command, err)
		}
		switch {
		case m.Event != "":
			continue // asynchronous; nothing subscribes to events yet
		case m.Error != nil:
			return fmt.Errorf("qmp %s: %w", command, m.Error)
		case m.Return != nil:
			if out == nil {
				return nil
			}
			if err := json.Unmarshal(m.Return, out); err != nil {
				return fmt.Errorf("decoding qmp %s answer: %w", command, err)
			}
			return nil
		default:
			return fmt.Errorf("qmp %s: unexpected message %+v", command, m)
		}
	}
}

func (c *qmpClient) next() (*qmpMessage, error) {
	var m qmpMessage
	if err := c.dec.Decode(&m); err != nil {
		return nil, err
	}
	return &m, nil
}

// withDeadline runs fn with the connection's deadline following ctx: a
// cancelled ctx ends a blocked read or write at once.
func (c *qmpClient) withDeadline(ctx context.Context, fn func() error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Now()) })
	err := fn()
	if !stop() {
		// The deadline was forced; the connection is unusable after an
		// interrupted exchange, so the caller gets ctx's error.
		return fmt.Errorf("%w (%w)", context.Cause(ctx), err)
	}
	return err
}

// GetFD hands f to QEMU under name (QMP getfd: the descriptor travels as
// SCM_RIGHTS with the command), for commands that take "fd:name".
func (c *qmpClient) GetFD(ctx context.Context, name string, f *os.File) error {
	return c.withFile(ctx, "getfd", map[string]string{"fdname": name}, f, nil)
}

// fdSet is add-fd's answer.
type fdSet struct {
	ID int `json:"fdset-id"`
	FD int `json:"fd"`
}

// AddFD hands f to QEMU as a new descriptor set (QMP add-fd), for options
// that take a file name: "/dev/fdset/<ID>" opens a copy of it. The set
// lives until remove-fd.
func (c *qmpClient) AddFD(ctx context.Context, f *os.File) (fdSet, error) {
	var set fdSet
	err := c.withFile(ctx, "add-fd", nil, f, &set)
	return set, err
}

// withFile runs command with f attached as SCM_RIGHTS.
func (c *qmpClient) withFile(ctx context.Context, command string, args any, f *os.File, out any) error {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("qmp %s: not a unix socket", command)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.withDeadline(ctx, func() error {
		req := struct {
			Execute   string `json:"execute"`
			Arguments any    `json:"arguments,omitempty"`
		}{command, args}
		b, err := json.Marshal(req)
		if err != nil {
			return err
		}
		if _, _, err := uc.WriteMsgUnix(append(b, '\n'), unix.UnixRights(int(f.Fd())), nil); err != nil {
			return fmt.Errorf("sending qmp %s: %w", command, err)
		}
		return c.readReturn(command, out)
	})
}

// migrationStatus is query-migrate's answer (the part the driver reads).
type migrationStatus struct {
	Status    string `json:"status"`
	ErrorDesc string `json:"error-desc"`
}

// AwaitMigration polls query-migrate until the migration (outgoing or
// incoming) has completed, failed or ctx ends.
func (c *qmpClient) AwaitMigration(ctx context.Context) error {
	for {
		var st migrationStatus
		if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
			return err
		}
		switch st.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			return fmt.Errorf("migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("migration still %q: %w", st.Status, context.Cause(ctx))
		case <-time.After(2 * time.Millisecond):
		}
	}
}
