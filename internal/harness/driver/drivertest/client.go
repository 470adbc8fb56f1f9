package drivertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// Default bounds that keep a broken driver or agent from hanging the
// suite (Options overrides them). They are liveness limits, not
// performance assertions.
const (
	defaultFrameTimeout = 90 * time.Second
	defaultStartTimeout = 60 * time.Second
	defaultStopTimeout  = 60 * time.Second
)

// HostProcess is implemented by instances whose sandbox is one host
// process tree (the process driver's init, a VM's VMM). The suite uses it
// to check that nothing is left running; instances without it are checked
// by scanning the host's processes for the instance ID.
type HostProcess interface {
	PID() int
}

// isRoot reports whether root-only isolation (cgroups, a separate sandbox
// user) can be expected.
func isRoot() bool { return os.Geteuid() == 0 }

func requireRoot(t *testing.T) {
	t.Helper()
	if !isRoot() {
		t.Skip("skipping: needs root (cgroup limits and the sandbox user are unavailable otherwise)")
	}
}

func randomID(prefix string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return prefix + "-" + hex.EncodeToString(b)
}

// env is one driver under test with its own state directory.
type env struct {
	t        *testing.T
	d        driver.Driver
	stateDir string
	probe    string
	opts     Options
}

func newEnv(t *testing.T, newDriver func(*testing.T, string) driver.Driver, probe string, opts Options) *env {
	t.Helper()
	stateDir := t.TempDir()
	d := newDriver(t, stateDir)
	// A harness always recovers before its first Start.
	insts, err := d.Recover(context.Background())
	if err != nil {
		t.Fatalf("Recover on an empty state directory: %v", err)
	}
	if len(insts) != 0 {
		t.Fatalf("Recover on an empty state directory returned %d instances", len(insts))
	}
	e := &env{t: t, d: d, stateDir: stateDir, probe: probe, opts: opts}
	t.Cleanup(func() {
		if c, ok := d.(driver.Closer); ok {
			ctx, cancel := context.WithTimeout(context.Background(), opts.StopTimeout)
			defer cancel()
			if err := c.Close(ctx); err != nil {
				t.Errorf("Close: %v", err)
			}
		}
	})
	return e
}

// spec returns the suite's default spec for the probe.
func (e *env) spec() driver.Spec {
	return driver.Spec{
		ID:         randomID("dt"),
		Function:   "probe",
		RevisionID: "rev-1",
		Runtime: runtimes.Runtime{
			ID: "provided.al2023", Family: runtimes.FamilyProvided, Available: true,
			Bootstrap: []string{"/var/task/bootstrap"},
		},
		CodeDir:     e.probe,
		MemoryMB:    256,
		EphemeralMB: 64,
	}
}

// start starts an instance and registers its Stop as cleanup on t (a
// subtest of the env's test, or that test).
func (e *env) start(t *testing.T, spec driver.Spec) *sandbox {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), e.opts.StartTimeout)
	defer cancel()
	inst, err := e.d.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start(%s): %v", spec.ID, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), e.opts.StopTimeout)
		defer cancel()
		if err := e.d.Stop(ctx, spec.ID); err != nil {
			t.Errorf("Stop(%s): %v", spec.ID, err)
		}
	})
	if inst.ID() != spec.ID {
		t.Fatalf("instance ID = %q, want %q", inst.ID(), spec.ID)
	}
	return e.sandbox(t, spec, inst)
}

// sandbox wraps a started instance.
func (e *env) sandbox(t *testing.T, spec driver.Spec, inst driver.Instance) *sandbox {
	return &sandbox{t: t, spec: spec, inst: inst, conn: protocol.NewConn(inst.Conn()), frameTimeout: e.opts.FrameTimeout}
}

// sandbox is the suite's harness side of one instance.
type sandbox struct {
	t            *testing.T
	spec         driver.Spec
	inst         driver.Instance
	conn         *protocol.Conn
	frameTimeout time.Duration
}

// initMsg is the Init a harness sends for the probe.
func (s *sandbox) initMsg() protocol.Init {
	name := s.spec.Function
	uid := 0
	if isRoot() {
		uid = 993
	}
	return protocol.Init{
		FunctionName:    name,
		FunctionVersion: "$LATEST",
		FunctionARN:     "arn:aws:lambda:us-east-1:000000000000:function:" + name,
		MemoryMB:        s.spec.MemoryMB,
		TimeoutSec:      30,
		Command:         []string{"/var/task/bootstrap"},
		Env: []string{
			"_HANDLER=bootstrap",
			"AWS_LAMBDA_RUNTIME_API=127.0.0.1:9001",
			"LAMBDA_TASK_ROOT=/var/task",
			"LAMBDA_RUNTIME_DIR=/var/runtime",
			"AWS_LAMBDA_FUNCTION_NAME=" + name,
			"AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
			"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=" + strconv.Itoa(s.spec.MemoryMB),
			"AWS_LAMBDA_INITIALIZATION_TYPE=on-demand",
			"AWS_LAMBDA_LOG_GROUP_NAME=/aws/lambda/" + name,
			"AWS_LAMBDA_LOG_STREAM_NAME=2026/01/01/[$LATEST]" + s.spec.ID,
			"AWS_REGION=us-east-1",
			"AWS_DEFAULT_REGION=us-east-1",
			"AWS_EXECUTION_ENV=AWS_Lambda_provided.al2023",
			"TZ=:UTC",
			"LANG=en_US.UTF-8",
			"PATH=/usr/local/bin:/usr/bin/:/bin:/opt/bin",
			"LD_LIBRARY_PATH=/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
		},
		Dir:           "/var/task",
		UID:           uid,
		GID:           uid,
		InitTimeoutMs: 10000,
	}
}

// init sends Init and returns InitDone, failing on an init error.
func (s *sandbox) init() {
	s.t.Helper()
	if err := s.conn.WriteFrame(protocol.TypeInit, s.initMsg()); err != nil {
		s.t.Fatalf("sending Init: %v", err)
	}
	f := s.read(protocol.TypeInitDone)
	var done protocol.InitDone
	if err := f.Decode(&done); err != nil {
		s.t.Fatal(err)
	}
	if done.Error != nil {
		s.t.Fatalf("INIT failed: %+v; log: %s", *done.Error, f.Body)
	}
}

// invocation is one answered Invoke.
type invocation struct {
	protocol.Result
	Payload []byte
	Log     []byte
}

// invoke sends one event with the given timeout and waits for its Result.
func (s *sandbox) invoke(event any, timeout time.Duration) invocation {
	s.t.Helper()
	return s.invokeID(randomID("req"), event, timeout)
}

func (s *sandbox) invokeID(requestID string, event any, timeout time.Duration) invocation {
	s.t.Helper()
	body, err := json.Marshal(event)
	if err != nil {
		s.t.Fatal(err)
	}
	inv := protocol.Invoke{
		RequestID:      requestID,
		DeadlineUnixMs: time.Now().Add(timeout).UnixMilli(),
		FunctionARN:    s.initMsg().FunctionARN,
	}
	if err := s.conn.WriteFrame(protocol.TypeInvoke, inv, body); err != nil {
		s.t.Fatalf("sending Invoke: %v", err)
	}
	f := s.read(protocol.TypeResult)
	var res protocol.Result
	if err := f.Decode(&res); err != nil {
		s.t.Fatal(err)
	}
	if res.RequestID != requestID {
		s.t.Fatalf("Result for request %q, want %q", res.RequestID, requestID)
	}
	payload, log := res.Split(f.Body)
	return invocation{Result: res, Payload: payload, Log: log}
}

// read waits for the next frame, which must be of type want.
func (s *sandbox) read(want protocol.Type) *protocol.Frame {
	s.t.Helper()
	f, err := readFrame(s.conn, s.inst.Conn(), s.frameTimeout)
	if err != nil {
		s.t.Fatalf("waiting for %s: %v", want, err)
	}
	if f.Type != want {
		s.t.Fatalf("got %s frame, want %s: %s", f.Type, want, f.Header)
	}
	return f
}

// readFrame reads one frame, closing the stream if none comes in time.
func readFrame(c *protocol.Conn, raw interface{ Close() error }, timeout time.Duration) (*protocol.Frame, error) {
	type res struct {
		f   *protocol.Frame
		err error
	}
	ch := make(chan res, 1)
	go func() {
		f, err := c.ReadFrame()
		ch <- res{f, err}
	}()
	select {
	case r := <-ch:
		return r.f, r.err
	case <-time.After(timeout):
		raw.Close()
		return nil, fmt.Errorf("no frame within %s", timeout)
	}
}

// call invokes the probe and decodes a successful answer into out.
func (s *sandbox) call(event map[string]any, out any) invocation {
	s.t.Helper()
	r := s.invoke(event, 30*time.Second)
	if r.FunctionError != "" {
		s.t.Fatalf("probe %v failed: %s %s: %s\nlog: %s", event["action"], r.FunctionError, r.ErrorType, r.Payload, r.Log)
	}
	if out != nil {
		if err := json.Unmarshal(r.Payload, out); err != nil {
			s.t.Fatalf("decoding probe %v answer %q: %v", event["action"], r.Payload, err)
		}
	}
	return r
}

// Probe answers, mirroring internal/testfunc/probe.
type facts struct {
	PID      int               `json:"pid"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Hostname string            `json:"hostname"`
	Cwd      string            `json:"cwd"`
	Env      map[string]string `json:"env"`
	Task     []string          `json:"task"`
	CPUs     int               `json:"cpus"`
}

type echoAnswer struct {
	Event json.RawMessage `json:"event"`
	Facts facts           `json:"facts"`
}

type outcome struct {
	Bytes int64  `json:"bytes"`
	Count int    `json:"count"`
	Data  string `json:"data"`
	Error string `json:"error"`
	PID   int    `json:"pid"`
	Procs []struct {
		PID   int    `json:"pid"`
		Comm  string `json:"comm"`
		State string `json:"state"`
	} `json:"procs"`
}
