package firecracker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// Firecracker's logger and metrics system (docs/logger.md, docs/metrics.md)
// write to named pipes in the VM's root, which the harness drains: nothing
// of either is a file that grows. Firecracker opens them when it is told
// to (PUT /logger, PUT /metrics: before InstanceStart, or before a
// snapshot load, which restores neither).
const (
	logFIFO     = "firecracker.log"
	metricsFIFO = "firecracker.metrics"
	// fcLogLevel is the level of Firecracker's logger: its warnings and
	// errors, which the harness logs at warn. Its info lines (start,
	// stop) say nothing the driver's own log does not.
	fcLogLevel = "Warning"
	// drainWait bounds how long Release waits for the pipes' last lines
	// when Firecracker could not be killed and still holds them open;
	// tailWait how long an error waits for the logger's.
	drainWait = time.Second
	tailWait  = 100 * time.Millisecond
	// maxMetricsLine bounds one metrics record (a flush is one JSON line
	// of a few KiB).
	maxMetricsLine = 1 << 20
)

// pipe is one named pipe Firecracker writes and the harness drains. The
// harness holds a write end of its own until Release, so the reader sees
// no end of file before Firecracker has opened the pipe; once Firecracker
// is gone and that end is closed, the reader drains what is left and
// ends.
type pipe struct {
	r, w   *os.File
	done   chan struct{}
	closeW sync.Once
}

// openPipe makes the named pipe name in the VM's root, owned by uid:gid
// (the jail's user, who opens it) when uid is not 0, and starts drain on
// it.
func openPipe(root, name string, uid, gid int, drain func(io.Reader)) (*pipe, error) {
	path := filepath.Join(root, name)
	if err := unix.Mkfifo(path, 0o600); err != nil {
		return nil, fmt.Errorf("making %s: %w", name, err)
	}
	if uid != 0 {
		if err := os.Chown(path, uid, gid); err != nil {
			return nil, fmt.Errorf("handing %s to the vm user: %w", name, err)
		}
	}
	// Non-blocking: a FIFO's read end opens at once without a writer; the
	// reads go through Go's poller.
	r, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", name, err)
	}
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		r.Close()
		return nil, fmt.Errorf("opening %s: %w", name, err)
	}
	p := &pipe{r: r, w: w, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		drain(r)
		_, _ = io.Copy(io.Discard, r) // a drain that gave up must not block the writer
	}()
	return p, nil
}

// finish closes the harness's write end, so that once Firecracker is gone
// the reader drains what is left and ends, and waits for that until
// deadline; false if the reader is not done by then (Firecracker still
// has the pipe open). A nil p is done.
func (p *pipe) finish(deadline time.Time) bool {
	if p == nil {
		return true
	}
	p.closeW.Do(func() { p.w.Close() })
	select {
	case <-p.done:
		return true
	default:
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// close ends the reader, which finish let run; afterwards nothing of the
// pipe is open on the harness's side.
func (p *pipe) close() {
	if p == nil {
		return
	}
	p.closeW.Do(func() { p.w.Close() })
	p.r.Close()
	<-p.done
}

// observer drains one VM's Firecracker logger and metrics.
type observer struct {
	log     *slog.Logger
	host    *hostMetrics      // the driver's sums over its VMs (nil in tests)
	lines   *hostproc.LineLog // the logger's lines
	logs    *pipe
	metrics *pipe
	totals  fcMetrics
}

// observe makes the VM's logger and metrics pipes in root and starts
// draining them: Firecracker's log lines go to the harness's log at warn
// (bounded like the console), its metrics are summed up per VM.
func (i *instance) observe(uid, gid int) error {
	o := &observer{log: i.Log().With("source", "firecracker"), host: &i.d.stats}
	o.lines = vmm.NewVMMLog(o.log, slog.LevelWarn)
	var err error
	if o.logs, err = openPipe(i.root, logFIFO, uid, gid, func(r io.Reader) { _, _ = io.Copy(o.lines, r) }); err != nil {
		return err
	}
	i.obs = o // from now on Release closes what there is
	o.metrics, err = openPipe(i.root, metricsFIFO, uid, gid, o.readMetrics)
	return err
}

// configureObservers sends PUT /logger and PUT /metrics, naming the pipes
// as Firecracker sees them.
func (i *instance) configureObservers(ctx context.Context) error {
	if err := i.api.putLogger(ctx, loggerConfig{LogPath: i.inRoot(logFIFO), Level: fcLogLevel, ShowLevel: true}); err != nil {
		return err
	}
	return i.api.putMetrics(ctx, metricsConfig{MetricsPath: i.inRoot(metricsFIFO)})
}

// stopObserving drains what Firecracker wrote last and logs the VM's
// metrics; for Release, once Firecracker is gone (or could not be killed:
// then it gives up after drainWait).
func (i *instance) stopObserving() {
	o := i.obs
	if o == nil {
		return
	}
	deadline := time.Now().Add(drainWait)
	for _, p := range []*pipe{o.logs, o.metrics} {
		p.finish(deadline)
	}
	o.logs.close()
	o.metrics.close()
	o.lines.Flush() // a last line without its newline
	t := o.totals
	if t.Flushes > 0 {
		o.log.Debug("firecracker metrics", "flushes", t.Flushes, "vcpu_failures", t.VCPUFailures,
			"block_read_bytes", t.BlockReadBytes, "block_write_bytes", t.BlockWriteBytes,
			"vsock_rx_bytes", t.VsockRxBytes, "vsock_tx_bytes", t.VsockTxBytes,
			"net_rx_bytes", t.NetRxBytes, "net_tx_bytes", t.NetTxBytes,
			"missed_log_lines", t.MissedLogs, "missed_metrics", t.MissedMetrics)
	}
}

// OutputTail is what Firecracker's logger said last, for errors
// (vmm.OutputTailer). A Firecracker that has exited gets a moment for its
// last lines to be read.
func (i *instance) OutputTail() string {
	o := i.obs
	if o == nil {
		return ""
	}
	select {
	case <-i.Done():
		o.logs.finish(time.Now().Add(tailWait))
	default:
	}
	return o.lines.LastLines()
}

// fcMetrics is what the driver keeps of a VM's metrics (docs/metrics.md;
// src/vmm/src/logger/metrics.rs): counters, which Firecracker writes as
// the change since its last flush and the driver sums up, and the alarms
// it warns of.
type fcMetrics struct {
	Flushes                         int
	VCPUFailures                    uint64
	BlockReadBytes, BlockWriteBytes uint64
	NetRxBytes, NetTxBytes          uint64
	VsockRxBytes, VsockTxBytes      uint64
	MissedLogs, MissedMetrics       uint64
	// warned are the alarms already logged.
	warned map[string]bool
}

// fcFlush is the part of one metrics record the driver reads.
type fcFlush struct {
	VCPU struct {
		Failures uint64 `json:"failures"`
	} `json:"vcpu"`
	Block struct {
		ReadBytes  uint64 `json:"read_bytes"`
		WriteBytes uint64 `json:"write_bytes"`
	} `json:"block"`
	Net struct {
		RxBytes uint64 `json:"rx_bytes_count"`
		TxBytes uint64 `json:"tx_bytes_count"`
	} `json:"net"`
	Vsock struct {
		RxBytes uint64 `json:"rx_bytes_count"`
		TxBytes uint64 `json:"tx_bytes_count"`
	} `json:"vsock"`
	Logger struct {
		MissedLogs    uint64 `json:"missed_log_count"`
		MissedMetrics uint64 `json:"missed_metrics_count"`
	} `json:"logger"`
	// Alarms: values Firecracker stores rather than counts, non-zero
	// once it happened.
	Seccomp struct {
		Faults uint64 `json:"num_faults"`
	} `json:"seccomp"`
	Signals map[string]uint64 `json:"signals"`
}

// readMetrics reads metrics records, one JSON object a line, into
// o.totals. A line that is not one is logged once and skipped.
func (o *observer) readMetrics(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxMetricsLine)
	badLogged := false
	for sc.Scan() {
		var f fcFlush
		if err := json.Unmarshal(sc.Bytes(), &f); err != nil {
			if !badLogged {
				o.log.Warn("unreadable firecracker metrics", "err", err)
				badLogged = true
			}
			continue
		}
		raised := o.totals.add(&f)
		// A VMM that broke its own seccomp filter or crashed is worth an
		// operator's attention, whatever the guest did.
		for _, a := range raised {
			o.log.Warn("firecracker reports "+strings.ReplaceAll(a.name, "_", " "), "count", a.value)
		}
		o.host.add(&f, raised)
	}
	if err := sc.Err(); err != nil && !errors.Is(err, os.ErrClosed) {
		o.log.Warn("reading firecracker metrics", "err", err)
	}
}

// add sums f's counters into t and returns the alarms f raises that t
// has not seen yet: seccomp faults and the deadly signals Firecracker
// caught, each once per VM.
func (t *fcMetrics) add(f *fcFlush) (raised []alarm) {
	t.Flushes++
	t.VCPUFailures += f.VCPU.Failures
	t.BlockReadBytes += f.Block.ReadBytes
	t.BlockWriteBytes += f.Block.WriteBytes
	t.NetRxBytes += f.Net.RxBytes
	t.NetTxBytes += f.Net.TxBytes
	t.VsockRxBytes += f.Vsock.RxBytes
	t.VsockTxBytes += f.Vsock.TxBytes
	t.MissedLogs += f.Logger.MissedLogs
	t.MissedMetrics += f.Logger.MissedMetrics
	for _, a := range f.alarms() {
		if t.warned[a.name] {
			continue
		}
		if t.warned == nil {
			t.warned = map[string]bool{}
		}
		t.warned[a.name] = true
		raised = append(raised, a)
	}
	return raised
}

// alarm is a value Firecracker stores (not counts) that is non-zero once
// the thing happened.
type alarm struct {
	name  string // "seccomp_faults", "sigsegv"...
	value uint64
}

// deadlySignals are the signals whose handling Firecracker records
// before it exits.
var deadlySignals = []string{"sigbus", "sigsegv", "sigill", "sigxfsz", "sigxcpu"}

// alarms are f's non-zero alarms.
func (f *fcFlush) alarms() []alarm {
	var as []alarm
	if f.Seccomp.Faults > 0 {
		as = append(as, alarm{"seccomp_faults", f.Seccomp.Faults})
	}
	for _, sig := range deadlySignals {
		if n := f.Signals[sig]; n > 0 {
			as = append(as, alarm{sig, n})
		}
	}
	return as
}
