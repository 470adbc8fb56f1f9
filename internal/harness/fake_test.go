package harness

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/protocol"
	"github.com/invokex/invokex/internal/runtimes"
)

// fakeDriver runs every instance as a goroutine playing the agent on one
// end of a net.Pipe. What the agent does is scripted by the payload
// ("block", "reset", "hang", "exit", anything else is echoed) and by the
// function's FAKE_INIT variable ("error" fails INIT).
type fakeDriver struct {
	// gate, when not nil, holds "block" invocations until it is closed.
	gate chan struct{}
	// startGate, when not nil, holds Start until it is closed.
	startGate chan struct{}

	mu        sync.Mutex
	specs     []driver.Spec
	inits     map[string]protocol.Init
	live      map[string]*fakeInstance
	stopped   []string
	recovered []driver.Instance
	recovers  int
	invokes   map[string]int // Invoke frames received per instance
	restores  map[string]protocol.Restore
	failRenew bool // answer Restore with an error

	arrived chan string // instance ids, one per Invoke frame received
}

func newFakeDriver() *fakeDriver {
	return &fakeDriver{
		inits:   map[string]protocol.Init{},
		live:    map[string]*fakeInstance{},
		invokes: map[string]int{},
		arrived: make(chan string, 1024),
	}
}

type fakeInstance struct {
	id       string
	harness  net.Conn
	agent    net.Conn
	done     chan struct{}
	exitOnce sync.Once
}

func (i *fakeInstance) ID() string               { return i.id }
func (i *fakeInstance) Conn() io.ReadWriteCloser { return i.harness }
func (i *fakeInstance) Done() <-chan struct{}    { return i.done }

// exit ends the sandbox: both stream ends close and Done closes.
func (i *fakeInstance) exit() {
	i.exitOnce.Do(func() {
		i.agent.Close()
		i.harness.Close()
		close(i.done)
	})
}

func (d *fakeDriver) Name() string { return "fake" }

func (d *fakeDriver) Start(ctx context.Context, spec driver.Spec) (driver.Instance, error) {
	if d.startGate != nil {
		select {
		case <-d.startGate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if spec.ID == "" || len(spec.ID) > 40 {
		return nil, errdefs.Invalid("bad id %q", spec.ID)
	}
	h, a := net.Pipe()
	inst := &fakeInstance{id: spec.ID, harness: h, agent: a, done: make(chan struct{})}
	d.mu.Lock()
	if _, dup := d.live[spec.ID]; dup {
		d.mu.Unlock()
		return nil, errdefs.Invalid("duplicate id %q", spec.ID)
	}
	d.specs = append(d.specs, spec)
	d.live[spec.ID] = inst
	d.mu.Unlock()
	go d.agent(inst)
	return inst, nil
}

func (d *fakeDriver) Stop(ctx context.Context, id string) error {
	d.mu.Lock()
	inst := d.live[id]
	delete(d.live, id)
	if inst != nil {
		d.stopped = append(d.stopped, id)
	}
	d.mu.Unlock()
	if inst != nil {
		inst.exit()
	}
	return nil
}

func (d *fakeDriver) Recover(ctx context.Context) ([]driver.Instance, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.recovers++
	for _, inst := range d.recovered {
		d.live[inst.ID()] = inst.(*fakeInstance)
	}
	return d.recovered, nil
}

// crash makes an instance's sandbox exit on its own.
func (d *fakeDriver) crash(id string) {
	d.mu.Lock()
	inst := d.live[id]
	d.mu.Unlock()
	if inst != nil {
		inst.exit()
	}
}

func (d *fakeDriver) liveCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.live)
}

func (d *fakeDriver) startCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.specs)
}

func (d *fakeDriver) wasStopped(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range d.stopped {
		if s == id {
			return true
		}
	}
	return false
}

func (d *fakeDriver) initOf(id string) protocol.Init {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.inits[id]
}

// agent plays the agent's side of the protocol.
func (d *fakeDriver) agent(inst *fakeInstance) {
	defer inst.exit()
	conn := protocol.NewConn(inst.agent)
	f, err := conn.ReadFrame()
	if err != nil || f.Type != protocol.TypeInit {
		return
	}
	var init protocol.Init
	if f.Decode(&init) != nil {
		return
	}
	d.mu.Lock()
	d.inits[inst.id] = init
	d.mu.Unlock()
	if envValue(init.Env, "FAKE_INIT") == "error" {
		_ = conn.WriteFrame(protocol.TypeInitDone, protocol.InitDone{
			InitDuration: 3 * time.Millisecond,
			Error:        &protocol.ErrorInfo{ErrorMessage: "boom in init", ErrorType: "Runtime.ImportModuleError"},
		}, []byte("init log line\n"))
		// Lambda tears the environment down; wait for the harness to.
		_, _ = conn.ReadFrame()
		return
	}
	if err := conn.WriteFrame(protocol.TypeInitDone, protocol.InitDone{InitDuration: 7 * time.Millisecond}); err != nil {
		return
	}
	d.serve(inst, conn, true)
}

// serve plays an initialised agent: Invoke, Restore and Shutdown frames.
// first reports an INIT whose duration the next Result carries.
func (d *fakeDriver) serve(inst *fakeInstance, conn *protocol.Conn, first bool) {
	for {
		f, err := conn.ReadFrame()
		if err != nil {
			return
		}
		switch f.Type {
		case protocol.TypeShutdown:
			_ = conn.WriteFrame(protocol.TypeShutdownDone, protocol.ShutdownDone{})
			return
		case protocol.TypeRestore:
			var r protocol.Restore
			if f.Decode(&r) != nil {
				return
			}
			d.mu.Lock()
			if d.restores == nil {
				d.restores = map[string]protocol.Restore{}
			}
			d.restores[inst.id] = r
			fail := d.failRenew
			d.mu.Unlock()
			done := protocol.RestoreDone{}
			if fail {
				done.Error = &protocol.ErrorInfo{ErrorType: "Sandbox.RestoreFailed", ErrorMessage: "no entropy"}
			}
			if conn.WriteFrame(protocol.TypeRestoreDone, done) != nil {
				return
			}
			first = false
			continue
		case protocol.TypeInvoke:
		default:
			return
		}
		var inv protocol.Invoke
		if f.Decode(&inv) != nil {
			return
		}
		d.mu.Lock()
		d.invokes[inst.id]++
		d.mu.Unlock()
		d.arrived <- inst.id
		payload := string(f.Body)
		res := protocol.Result{RequestID: inv.RequestID, Duration: time.Millisecond, MaxMemoryMB: 21}
		if first {
			res.InitDuration = 7 * time.Millisecond
			first = false
		}
		out := f.Body
		switch {
		case strings.HasPrefix(payload, "block"):
			<-d.gate
		case payload == "hang":
			// Never answer; the harness's safety net must fire.
			_, _ = conn.ReadFrame()
			return
		case payload == "exit":
			return
		case payload == "reset":
			res.FunctionError, res.ErrorType, res.Reset = "Unhandled", "Sandbox.Timedout", true
			out = []byte(`{"errorMessage":"timed out"}`)
		}
		log := fmt.Sprintf("START RequestId: %s Version: $LATEST\nEND RequestId: %s\n", inv.RequestID, inv.RequestID)
		res.PayloadLen = len(out)
		res.LogBytes = int64(len(log))
		if err := conn.WriteFrame(protocol.TypeResult, res, out, []byte(log)); err != nil {
			return
		}
	}
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}

// memSource is a CodeSource over packages held in memory.
type memSource struct {
	mu    sync.Mutex
	blobs map[string][]byte
	opens atomic.Int64
}

func (s *memSource) Open(ctx context.Context, digest string) (io.ReadCloser, error) {
	s.opens.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[digest]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", digest, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// add stores a package with a bootstrap file whose content is marker and
// returns its digest.
func (s *memSource) add(t *testing.T, marker string) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	hdr := &zip.FileHeader{Name: "bootstrap", Method: zip.Deflate}
	hdr.SetMode(0o755)
	w, err := zw.CreateHeader(hdr)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(w, "#!/bin/sh\n# %s\n", marker)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(buf.Bytes())
	digest := base64.StdEncoding.EncodeToString(sum[:])
	s.mu.Lock()
	if s.blobs == nil {
		s.blobs = map[string][]byte{}
	}
	s.blobs[digest] = buf.Bytes()
	s.mu.Unlock()
	return digest
}

type testEnv struct {
	h    *Harness
	drv  *fakeDriver
	src  *memSource
	code string // digest of the default package
	dir  string

	gateOnce sync.Once
	// closeErrOK: the test closed the harness itself and checked Close's error.
	closeErrOK bool
}

func newTestEnv(t *testing.T, tune func(*Config)) *testEnv {
	t.Helper()
	env := &testEnv{drv: newFakeDriver(), src: &memSource{}, dir: t.TempDir()}
	env.drv.gate = make(chan struct{})
	env.code = env.src.add(t, "v1")
	cfg := Config{
		Driver:      env.drv,
		CacheDir:    env.dir,
		Code:        env.src,
		MaxMemoryMB: 64 << 10,
		RuntimeFiles: func(runtimes.Family) fs.FS {
			return nil
		},
	}
	if tune != nil {
		tune(&cfg)
	}
	h, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	env.h = h
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		env.openGate()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := h.Close(ctx); err != nil && !env.closeErrOK {
			t.Errorf("Close: %v", err)
		}
		if n := env.drv.liveCount(); n != 0 {
			t.Errorf("%d sandboxes left after Close", n)
		}
	})
	return env
}

// openGate releases every "block" invocation, once.
func (e *testEnv) openGate() { e.gateOnce.Do(func() { close(e.drv.gate) }) }

var providedRuntime = runtimes.Runtime{
	ID: "provided.al2023", Family: runtimes.FamilyProvided, Available: true,
	Bootstrap: []string{"/var/task/bootstrap"}, ExecutionEnv: "AWS_Lambda_provided.al2023",
}

func (e *testEnv) fn(name, revision string) *function.Config {
	return &function.Config{
		Name: name, Runtime: providedRuntime.ID, Handler: "bootstrap", Timeout: 3, MemorySize: 128,
		CodeSha256: e.code, RevisionID: revision, Version: function.LatestVersion,
	}
}

var requestSeq atomic.Int64

func request(fn *function.Config, payload string) *InvokeRequest {
	rt := providedRuntime
	return &InvokeRequest{
		RequestID: fmt.Sprintf("req-%d", requestSeq.Add(1)),
		Function:  fn,
		Runtime:   &rt,
		ARN:       function.ARN("us-east-1", "000000000000", fn.Name),
		Payload:   []byte(payload),
	}
}

// waitFor polls cond until it holds; the test's own deadline bounds it.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// waitArrived waits until n Invoke frames reached agents.
func (e *testEnv) waitArrived(t *testing.T, n int) []string {
	t.Helper()
	var ids []string
	timeout := time.After(30 * time.Second)
	for len(ids) < n {
		select {
		case id := <-e.drv.arrived:
			ids = append(ids, id)
		case <-timeout:
			t.Fatalf("only %d of %d invocations reached an agent", len(ids), n)
		}
	}
	return ids
}
