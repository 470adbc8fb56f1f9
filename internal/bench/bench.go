// Package bench is InvokeX's benchmark: in one run, on one function
// binary, it measures InvokeX (an `invokex server` it starts on a temporary
// data directory) side by side with the AWS Lambda Runtime Interface
// Emulator (RIE), and reports every shared figure with its InvokeX/RIE
// ratio, plus InvokeX's control-plane figures and the targets.
//
// What it measures (see Report): warm invoke latency and throughput at
// several concurrency levels; cold starts after deploy and after scale to
// zero, with the function's init split out; the memory of the server and
// of idle warm instances; CreateFunction → Active, UpdateFunctionCode → new
// code, and a burst of Event invokes; and a CPU profile of a warm load.
//
// Run starts and stops every process it needs and leaves nothing behind
// (processes, temporary directories), also when ctx is cancelled. It needs
// root for InvokeX's process sandbox. Nothing in this package asserts on a
// timing: the report is the verdict.
package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"
)

// Options configures Run. Zero values take the defaults named.
type Options struct {
	// InvokexBin is the invokex binary to run as the server. Required.
	InvokexBin string
	// RIEBin is the aws-lambda-rie binary. Required.
	RIEBin string
	// GoBin is the go command, used to build the echo function (unless
	// EchoBin is set) and to render a pprof profile. Default: "go" on PATH.
	GoBin string
	// ModuleDir is InvokeX's source tree, where ./internal/testfunc/echo
	// is built. Required unless EchoBin is set.
	ModuleDir string
	// EchoBin is a prebuilt echo function, used instead of building one.
	EchoBin string
	// Driver is the sandbox driver passed to `invokex server --driver`.
	// Default "process".
	Driver string
	// Runs is the number of measured invokes per concurrency level
	// (default 2000).
	Runs int
	// Concurrency levels of the warm phase (default 1, 8, 64).
	Concurrency []int
	// ColdStarts per cold-start series (default 50, the minimum).
	ColdStarts int
	// EventCount Event invokes, sent by EventClients concurrent clients
	// (defaults 5000 and 32).
	EventCount   int
	EventClients int
	// UpdateRuns code updates (default 20).
	UpdateRuns int
	// MemInstances idle warm instances to measure (default 8).
	MemInstances int
	// KeepAliveShort is the keep-alive of the scale-to-zero server
	// (default 1 s).
	KeepAliveShort time.Duration
	// ProfileSeconds of profiling during an extra warm load on InvokeX
	// (default 5; negative: no profile).
	ProfileSeconds int
	// ServerLogLevel of the InvokeX servers (default "info", what a user
	// runs).
	ServerLogLevel string
	// WorkDir is where the temporary directory goes (default os.TempDir()).
	WorkDir string
	// KeepWork keeps the temporary directory (logs, data dirs) for
	// inspection; its path is in the report's notes.
	KeepWork bool
	// Out receives one line per phase, for the person watching. nil
	// discards them.
	Out io.Writer
	// Logger receives diagnostics. Default: discards.
	Logger *slog.Logger
}

func (o *Options) defaults() error {
	if o.InvokexBin == "" {
		return errors.New("bench: InvokexBin is required")
	}
	if o.RIEBin == "" {
		return errors.New("bench: RIEBin is required")
	}
	if o.EchoBin == "" && o.ModuleDir == "" {
		return errors.New("bench: ModuleDir or EchoBin is required")
	}
	if o.GoBin == "" {
		if p, err := exec.LookPath("go"); err == nil {
			o.GoBin = p
		} else if o.EchoBin == "" {
			return errors.New("bench: no go command to build the echo function")
		}
	}
	if o.Driver == "" {
		o.Driver = "process"
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&o.Runs, 2000)
	def(&o.ColdStarts, 50)
	def(&o.EventCount, 5000)
	def(&o.EventClients, 32)
	def(&o.UpdateRuns, 20)
	def(&o.MemInstances, 8)
	def(&o.ProfileSeconds, 5)
	if len(o.Concurrency) == 0 {
		o.Concurrency = []int{1, 8, 64}
	}
	for _, c := range o.Concurrency {
		if c < 1 {
			return fmt.Errorf("bench: concurrency %d is not positive", c)
		}
	}
	if o.Runs < 1 || o.ColdStarts < 1 || o.EventCount < 0 || o.EventClients < 1 || o.UpdateRuns < 0 || o.MemInstances < 1 {
		return errors.New("bench: counts must be positive")
	}
	if o.KeepAliveShort == 0 {
		o.KeepAliveShort = time.Second
	}
	if o.ServerLogLevel == "" {
		o.ServerLogLevel = "info"
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return nil
}

// fnComm is the command name of the function's process: both systems run
// the echo binary as "bootstrap".
const fnComm = "bootstrap"

// runner is one benchmark run's state.
type runner struct {
	opts      Options
	rep       *Report
	fs        procFS
	http      *http.Client
	work      string
	bootstrap string
	fnComm    string
	zips      *zipper
	payload   []byte
	want      []byte
	log       *slog.Logger
	notesMu   sync.Mutex
	// captures are perf recordings waiting for their server to stop.
	captures []*perfCapture
	// rieT starts emulators; rie is the one the warm phase uses.
	rieT *rieTarget
	rie  *rieProc
}

// Run runs the whole benchmark and returns its report. Phases that fail
// are recorded in Report.Notes and the run goes on; Run itself fails only
// when it cannot start (no echo function, a server or RIE that does not
// start) or when ctx is cancelled.
func Run(ctx context.Context, opts Options) (*Report, error) {
	if err := opts.defaults(); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(opts.WorkDir, "invokex-bench-")
	if err != nil {
		return nil, fmt.Errorf("creating work dir: %w", err)
	}
	maxConc := opts.EventClients
	for _, c := range opts.Concurrency {
		maxConc = max(maxConc, c)
	}
	r := &runner{
		opts:    opts,
		fs:      hostProc,
		http:    newHTTPClient(maxConc),
		work:    work,
		fnComm:  fnComm,
		payload: []byte(`{"bench":"invokex-echo-payload","n":1}`),
		want:    []byte(`"bench":"invokex-echo-payload"`),
		log:     opts.Logger,
		rep: &Report{
			Date:        time.Now(),
			Machine:     probeMachine(opts.GoBin),
			Driver:      opts.Driver,
			Runs:        opts.Runs,
			ColdStarts:  opts.ColdStarts,
			EventCount:  opts.EventCount,
			UpdateRuns:  opts.UpdateRuns,
			Concurrency: opts.Concurrency,
		},
	}
	for _, c := range opts.Concurrency {
		r.rep.Warm = append(r.rep.Warm, WarmRow{Concurrency: c})
	}
	defer r.http.CloseIdleConnections()
	defer func() {
		if opts.KeepWork {
			return
		}
		if err := safeRemoveAll(work); err != nil {
			r.log.Warn("cleaning up the benchmark's work dir", "err", err)
		}
	}()
	if opts.KeepWork {
		r.note("work directory kept: %s", work)
	}
	if opts.ColdStarts < 50 {
		r.note("%d cold starts per series: fewer than the 50 the issue asks for", opts.ColdStarts)
	}

	if err := r.prepareFunction(ctx); err != nil {
		return nil, err
	}
	r.rieT = &rieTarget{bin: opts.RIEBin, bootstrap: r.bootstrap, workDir: work, http: r.http}
	r.say("RIE: memory of its idle warm instance")
	if r.rie, err = r.startRIE(ctx, r.rieT); err != nil {
		return nil, err
	}
	// r.rie changes when RIE has to be restarted: stop whichever is current.
	defer func() { _ = r.rie.stop(0) }()
	r.say("InvokeX: memory, cold starts after deploy, warm invokes beside RIE's, profile, code updates, Event invokes")
	if err := r.runInvokeX(ctx); err != nil {
		return nil, err
	}
	_ = r.rie.stop(0)
	r.say("RIE: cold starts")
	r.rep.ColdRIE = r.rieColdStarts(ctx, r.rieT)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.say("InvokeX: cold starts after scale-to-zero")
	if err := r.runScaleToZero(ctx); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	r.rep.Machine.LoadAvgEnd = loadAvg()
	return r.rep, nil
}

// say writes one progress line.
func (r *runner) say(format string, args ...any) {
	fmt.Fprintf(r.opts.Out, "bench: "+format+"\n", args...)
}

// note adds a line to the report's notes.
func (r *runner) note(format string, args ...any) {
	r.notesMu.Lock()
	defer r.notesMu.Unlock()
	r.rep.Notes = append(r.rep.Notes, fmt.Sprintf(format, args...))
}

// prepareFunction builds (or copies) the echo function to
// work/fn/bootstrap and prepares its zips.
func (r *runner) prepareFunction(ctx context.Context) error {
	dir := filepath.Join(r.work, "fn")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating function dir: %w", err)
	}
	r.bootstrap = filepath.Join(dir, "bootstrap")
	if r.opts.EchoBin != "" {
		b, err := os.ReadFile(r.opts.EchoBin)
		if err != nil {
			return fmt.Errorf("reading echo function: %w", err)
		}
		if err := os.WriteFile(r.bootstrap, b, 0o755); err != nil {
			return fmt.Errorf("copying echo function: %w", err)
		}
	} else {
		r.say("building the echo function")
		cmd := exec.CommandContext(ctx, r.opts.GoBin, "build", "-trimpath", "-o", r.bootstrap, "./internal/testfunc/echo")
		cmd.Dir = r.opts.ModuleDir
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building the echo function: %w: %s", err, bytes.TrimSpace(out))
		}
	}
	z, err := newZipper(r.bootstrap)
	if err != nil {
		return err
	}
	r.zips = z
	return nil
}

// sleepPayload asks the echo function to sleep ms first.
func sleepPayload(ms int) []byte { return []byte(fmt.Sprintf(`{"sleep_ms":%d}`, ms)) }

// coldSample is one cold start.
type coldSample struct {
	ttfb, total, init time.Duration
	haveInit, cold    bool
}

// summarizeCold turns samples into a series.
func summarizeCold(samples []coldSample, errs int, firstErr string) ColdSeries {
	var ttfb, total, init, net []time.Duration
	s := ColdSeries{Errors: errs, FirstError: firstErr}
	for _, c := range samples {
		ttfb = append(ttfb, c.ttfb)
		total = append(total, c.total)
		if c.haveInit {
			init = append(init, c.init)
			net = append(net, c.ttfb-c.init)
		}
		if c.cold {
			s.Cold++
		}
	}
	s.TTFB, s.Total, s.Init, s.Net = Summarize(ttfb), Summarize(total), Summarize(init), Summarize(net)
	return s
}

// sleepCtx sleeps d or until ctx is done.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
