package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// runInvokeX measures the main InvokeX server (default keep-alive).
func (r *runner) runInvokeX(ctx context.Context) error {
	srv, err := startInvokeX(ctx, serverArgs{
		bin:       r.opts.InvokexBin,
		driver:    r.opts.Driver,
		dataDir:   filepath.Join(r.work, "invokex-data"),
		logPath:   filepath.Join(r.work, "invokex-server.log"),
		logLevel:  r.opts.ServerLogLevel,
		keepAlive: 10 * time.Minute,
	}, r.http)
	if err != nil {
		return fmt.Errorf("starting invokex server: %w", err)
	}
	// Profiles are analysed once the server and its sandboxes are gone
	// (see perfCapture).
	defer func() {
		r.stopServer(srv)
		r.analyzeCaptures(context.WithoutCancel(ctx))
	}()

	if m, err := r.fs.Mem(srv.pid()); err == nil {
		r.rep.Memory.ServerIdle = m
	}
	phases := []struct {
		name string
		fn   func(context.Context, *ixServer) error
	}{
		{"memory", r.memoryPhase},
		{"cold starts after deploy", r.coldDeployPhase},
		{"warm invokes", r.warmPhase},
		{"code updates", r.updatePhase},
		{"Event invokes", r.eventPhase},
	}
	for _, ph := range phases {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !srv.alive() {
			r.note("InvokeX phase %q skipped: the server died: %s", ph.name, lastLine(srv.logTail(4000)))
			continue
		}
		if err := ph.fn(ctx, srv); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r.note("InvokeX phase %q failed: %v", ph.name, err)
		}
	}
	return ctx.Err()
}

// stopServer stops a server gracefully and reports sandbox processes that
// outlived it (and kills them: the benchmark leaves nothing behind).
func (r *runner) stopServer(srv *ixServer) {
	var left []Proc
	if procs, err := r.fs.Procs(); err == nil {
		left = Descendants(procs, srv.pid())
	}
	if err := srv.stop(30 * time.Second); err != nil {
		r.note("InvokeX server: %v", err)
	}
	var alive []string
	for _, p := range left {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.PID)); err == nil {
			alive = append(alive, fmt.Sprintf("%d (%s)", p.PID, p.Comm))
			if pr, err := os.FindProcess(p.PID); err == nil {
				_ = pr.Kill()
			}
		}
	}
	if len(alive) > 0 {
		r.note("%d sandbox processes outlived the server's shutdown (killed): %s", len(alive), strings.Join(alive, ", "))
	}
}

// deployWarm creates a function from a package with version v and checks
// that it answers.
func (r *runner) deployWarm(ctx context.Context, srv *ixServer, name, v string) (*invoker, error) {
	zip, err := r.zips.zip(v)
	if err != nil {
		return nil, err
	}
	if _, err := srv.deploy(ctx, name, zip); err != nil {
		return nil, err
	}
	iv := srv.invoker(name)
	if c := iv.invoke(ctx, r.payload, ""); !c.ok(r.want) {
		return nil, fmt.Errorf("first invoke of %s: %s", name, c.describe())
	}
	return iv, nil
}

// memoryPhase makes MemInstances idle warm instances and measures them.
func (r *runner) memoryPhase(ctx context.Context, srv *ixServer) error {
	const name = "bench-mem"
	n := r.opts.MemInstances
	zip, err := r.zips.zip("mem")
	if err != nil {
		return err
	}
	if _, err := srv.deploy(ctx, name, zip); err != nil {
		return err
	}
	defer r.removeAndSettle(ctx, srv, name)
	iv := srv.invoker(name)
	// n concurrent 1 s invokes: each needs its own instance.
	var wg sync.WaitGroup
	fails := make([]string, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if c := iv.invoke(ctx, sleepPayload(1000), ""); !c.ok(nil) {
				fails[i] = c.describe()
			}
		}()
	}
	wg.Wait()
	for _, f := range fails {
		if f != "" {
			return fmt.Errorf("making %d warm instances: %s", n, f)
		}
	}
	// Measured twice: just after the instances' last invoke, and once
	// they have been idle long enough for the agent's idle trim.
	m := &r.rep.Memory
	if err := sleepCtx(ctx, time.Second); err != nil {
		return err
	}
	fresh, err := r.measureInstances(srv)
	if err != nil {
		return err
	}
	m.SandboxFresh = fresh.Sandbox
	if fresh.Instances != n {
		r.note("memory: %d concurrent invokes made %d instances", n, fresh.Instances)
	}
	if err := sleepCtx(ctx, IdleSettle-time.Second); err != nil {
		return err
	}
	idle, err := r.measureInstances(srv)
	if err != nil {
		return err
	}
	m.Instances, m.Processes, m.Cgroup = idle.Instances, idle.Processes, idle.Cgroup
	m.PerInstance, m.Sandbox, m.Function = idle.PerInstance, idle.Sandbox, idle.Function
	m.Warm, m.WarmEach = idle.Warm, idle.WarmEach
	if sm, err := r.fs.Mem(srv.pid()); err == nil {
		m.ServerWithInstances = sm
	}
	cpu, ok, err := r.idleCPU(ctx, srv, idle.Instances+idle.Warm)
	if err != nil {
		return err
	}
	m.IdleCPU, m.IdleCPUMeasured = cpu, ok
	r.say("InvokeX memory: %d instances, %s RSS / %s PSS each", m.Instances, fmtMiB(m.PerInstance.RSS), fmtMiB(m.PerInstance.PSS))
	return nil
}

// idleCPU measures the host CPU n idle sandboxes use, per sandbox and
// second, over IdleCPUWindow. ok is false when there was nothing to
// measure or /proc could not be read; err is ctx's.
func (r *runner) idleCPU(ctx context.Context, srv *ixServer, n int) (cpu time.Duration, ok bool, err error) {
	if n <= 0 {
		return 0, false, nil
	}
	before, err := sampleCPU(r.fs, srv.pid(), r.fnComm)
	if err != nil {
		return 0, false, nil
	}
	if err := sleepCtx(ctx, IdleCPUWindow); err != nil {
		return 0, false, err
	}
	after, err := sampleCPU(r.fs, srv.pid(), r.fnComm)
	if err != nil {
		return 0, false, nil
	}
	d := cpuDelta(before, after)
	busy := time.Duration(d.sandbox+d.function) * clockTick
	return busy * time.Second / (IdleCPUWindow * time.Duration(n)), true, nil
}

// IdleCPUWindow is how long idleCPU watches idle sandboxes: long enough
// for 10 ms ticks to add up to a figure.
const IdleCPUWindow = 10 * time.Second

// IdleSettle is how long the memory phase lets its instances idle before
// the figures it reports: longer than the agent's idle trim (10 s, see
// package agent), as instances kept warm for minutes are.
const IdleSettle = 12 * time.Second

// The Event phase's wait for its invocations: one is counted lost when no
// record became final for eventStall (the queue stopped), or after
// eventMaxWait in all.
const (
	eventStall   = 30 * time.Second
	eventMaxWait = 20 * time.Minute
)

// instMem is one measurement of a server's idle instances: means over
// Instances of them.
type instMem struct {
	Instances                      int
	PerInstance, Sandbox, Function Mem
	Processes                      string
	Cgroup                         int64 // -1 when unavailable
	// Warm is how many warm sandboxes (no instance yet) the driver kept
	// beside them; WarmEach their mean memory.
	Warm     int
	WarmEach Mem
}

// measureInstances measures every instance of srv by its processes' smaps.
func (r *runner) measureInstances(srv *ixServer) (instMem, error) {
	groups, warm, err := srv.sandboxes(r.fs)
	if err != nil {
		return instMem{}, err
	}
	var out instMem
	for root, g := range warm {
		delete(groups, root)
		var w Mem
		for _, p := range g {
			if pm, err := r.fs.Mem(p.PID); err == nil {
				w = w.Add(pm)
			}
		}
		out.Warm++
		out.WarmEach = out.WarmEach.Add(w)
	}
	out.WarmEach = out.WarmEach.Mean(out.Warm)
	var all, sandbox, fn Mem
	var cg int64
	cgN := 0
	measured := 0
	for root, g := range groups {
		var inst, sb, f Mem
		var names []string
		ok := true
		for _, p := range g {
			pm, err := r.fs.Mem(p.PID)
			if err != nil {
				ok = false
				break
			}
			inst = inst.Add(pm)
			role := roleAgent
			switch {
			case p.PID == root:
				role = roleInit
				sb = sb.Add(pm)
			case p.Comm == r.fnComm:
				role = roleFunction
				f = f.Add(pm)
			default:
				sb = sb.Add(pm)
			}
			names = append(names, fmt.Sprintf("%s (%s, %s RSS)", p.Comm, role, fmtMiB(pm.RSS)))
		}
		if !ok {
			continue
		}
		if out.Processes == "" {
			out.Processes = strings.Join(names, ", ")
		}
		measured++
		all, sandbox, fn = all.Add(inst), sandbox.Add(sb), fn.Add(f)
		if v, err := cgroupMemory(r.fs, root); err == nil {
			cg += v
			cgN++
		}
	}
	if measured == 0 {
		return instMem{}, fmt.Errorf("no instance could be measured (%d found)", len(groups))
	}
	out.Instances = measured
	out.PerInstance, out.Sandbox, out.Function = all.Mean(measured), sandbox.Mean(measured), fn.Mean(measured)
	out.Cgroup = -1
	if cgN > 0 {
		out.Cgroup = cg / int64(cgN)
	}
	return out, nil
}

// removeAndSettle deletes a function and waits until the server has no
// instance left, so that the next phase starts on a quiet server.
func (r *runner) removeAndSettle(ctx context.Context, srv *ixServer, name string) {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
	defer cancel()
	if err := srv.remove(cctx, name); err != nil {
		r.note("%v", err)
		return
	}
	if ctx.Err() != nil {
		return
	}
	if err := srv.waitInstances(cctx, r.fs, 0, 15*time.Second); err != nil {
		r.note("after deleting %s: %v", name, err)
	}
}

// coldDeployPhase: CreateFunction → Active → first invoke, for a new
// function (with its own code) each time.
func (r *runner) coldDeployPhase(ctx context.Context, srv *ixServer) error {
	var samples []coldSample
	var create []time.Duration
	errs, first := 0, ""
	fail := func(msg string) {
		errs++
		if first == "" {
			first = msg
		}
	}
	settle := true
	for i := 0; i < r.opts.ColdStarts && ctx.Err() == nil; i++ {
		name := fmt.Sprintf("bench-cold-%d", i)
		zip, err := r.zips.zip(name)
		if err != nil {
			return err
		}
		d, err := srv.deploy(ctx, name, zip)
		if err != nil {
			fail(err.Error())
			continue
		}
		create = append(create, d)
		c := srv.invoker(name).invoke(ctx, r.payload, "")
		if c.ok(r.want) {
			s := coldSample{ttfb: c.TTFB, total: c.Total}
			if rec, err := srv.record(ctx, c.RequestID, 10*time.Second); err != nil {
				fail(err.Error())
			} else {
				s.cold = rec.Cold
				s.init, s.haveInit = msToDuration(rec.InitDurationMs), rec.Cold
				samples = append(samples, s)
			}
		} else {
			fail(c.describe())
		}
		if err := srv.remove(ctx, name); err != nil {
			fail(err.Error())
		}
		// Each cold start on a server without instances, unless instances
		// turn out not to go away on delete (then say so once and go on).
		if settle {
			if err := srv.waitInstances(ctx, r.fs, 0, 15*time.Second); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.note("cold starts after deploy: instance not gone after DeleteFunction (%v); later samples run beside it", err)
				settle = false
			}
		}
	}
	r.rep.ColdAfterDeploy = summarizeCold(samples, errs, first)
	r.rep.Control.CreateToActive = Summarize(create)
	s := r.rep.ColdAfterDeploy
	r.say("InvokeX cold after deploy: to first byte p50 %s, init p50 %s, create→active p50 %s",
		fmtMs(s.TTFB.P50), fmtMs(s.Init.P50), fmtMs(r.rep.Control.CreateToActive.P50))
	return nil
}

// updatePhase: UpdateFunctionCode → the first response from the new code.
func (r *runner) updatePhase(ctx context.Context, srv *ixServer) error {
	if r.opts.UpdateRuns == 0 {
		return nil
	}
	const name = "bench-update"
	iv, err := r.deployWarm(ctx, srv, name, "upd-0")
	if err != nil {
		return err
	}
	defer r.removeAndSettle(ctx, srv, name)
	var samples []time.Duration
	for i := 1; i <= r.opts.UpdateRuns && ctx.Err() == nil; i++ {
		v := fmt.Sprintf("upd-%d", i)
		zip, err := r.zips.zip(v)
		if err != nil {
			return err
		}
		wantV := []byte(`"version":"` + v + `"`)
		start := time.Now()
		if err := srv.updateCode(ctx, name, zip); err != nil {
			r.rep.Control.UpdateErrors++
			r.note("%v", err)
			continue
		}
		deadline := start.Add(60 * time.Second)
		for {
			c := iv.invoke(ctx, r.payload, "")
			if c.ok(r.want) && bytes.Contains(c.Body, wantV) {
				samples = append(samples, time.Since(start))
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				r.rep.Control.UpdateErrors++
				r.note("code update %s: no response from the new code after 60 s (last: %s)", v, truncate(string(c.Body), 100))
				break
			}
		}
	}
	r.rep.Control.UpdateToNewCode = Summarize(samples)
	r.say("InvokeX: UpdateFunctionCode → new code p50 %s", fmtMs(r.rep.Control.UpdateToNewCode.P50))
	return nil
}

// eventPhase sends a burst of Event invokes, then follows every accepted
// one to its final state.
func (r *runner) eventPhase(ctx context.Context, srv *ixServer) error {
	n := r.opts.EventCount
	if n == 0 {
		return nil
	}
	const name = "bench-event"
	iv, err := r.deployWarm(ctx, srv, name, "event")
	if err != nil {
		return err
	}
	defer r.removeAndSettle(ctx, srv, name)
	e := &r.rep.Control.Event
	e.Workers = r.opts.EventClients
	ids := make([]string, n)
	var (
		next     atomic.Int64
		mu       sync.Mutex
		lastOK   time.Time
		rejected int
		firstErr string
	)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < e.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				c := iv.invoke(ctx, r.payload, "Event")
				mu.Lock()
				if c.Err == nil && c.Status == 202 && c.RequestID != "" {
					ids[i] = c.RequestID
					if end := c.Start.Add(c.Total); end.After(lastOK) {
						lastOK = end
					}
				} else {
					rejected++
					if firstErr == "" {
						firstErr = c.describe()
					}
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	e.Sent, e.Rejected, e.FirstError = n, rejected, firstErr
	e.Accepted = n - rejected
	if !lastOK.IsZero() {
		e.AcceptWall = lastOK.Sub(start)
		if e.AcceptWall > 0 {
			e.AcceptedPerSec = float64(e.Accepted) / e.AcceptWall.Seconds()
		}
	}
	r.say("InvokeX: %d Event invokes accepted at %.0f/s; waiting for them to run", e.Accepted, e.AcceptedPerSec)

	// Follow every accepted invocation to a final state. They finish
	// roughly in order, so one pass with a short wait on each that is not
	// final yet reads each record about once. How long the queue takes
	// depends on the driver (VMs under emulation run it at tens per
	// second), so the wait is bounded by progress, not by a fixed time: an
	// invocation is counted lost when no record became final for
	// eventStall, or when eventMaxWait has passed.
	lastProgress := time.Now()
	hardDeadline := lastProgress.Add(eventMaxWait)
	var lastEnd time.Time
	for _, id := range ids {
		if id == "" {
			continue
		}
		for {
			rec, err := srv.cli.GetInvocation(ctx, id)
			if err == nil && rec.Status != "" && rec.Status != "Queued" {
				if rec.Status == "Succeeded" {
					e.Succeeded++
				} else {
					e.Failed++
					if e.FirstError == "" {
						e.FirstError = fmt.Sprintf("%s: %s %s", rec.Status, rec.ErrorType, rec.ErrorMessage)
					}
				}
				if rec.End.After(lastEnd) {
					lastEnd = rec.End
				}
				lastProgress = time.Now()
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if now := time.Now(); now.Sub(lastProgress) > eventStall || now.After(hardDeadline) {
				e.Lost++
				break
			}
			_ = sleepCtx(ctx, 10*time.Millisecond)
		}
	}
	if !lastEnd.IsZero() {
		e.AllRun = lastEnd.Sub(start)
		e.AfterAccept = lastEnd.Sub(lastOK)
	}
	r.say("InvokeX: Event invokes all run after %s: %d succeeded, %d failed, %d lost", fmtMs(e.AllRun), e.Succeeded, e.Failed, e.Lost)

	if r.opts.ProfileSeconds > 0 && ctx.Err() == nil {
		// An extra, unmeasured burst: what accepting Event invokes costs.
		// Its invocations are left queued when the server stops.
		r.say("InvokeX: profiling %d s of Event invokes", r.opts.ProfileSeconds)
		r.capturePerf(ctx, srv, &r.rep.EventProfile, fmt.Sprintf("Event invokes from %d clients", e.Workers), r.opts.ProfileSeconds, false,
			func(lctx context.Context) {
				var wg sync.WaitGroup
				for w := 0; w < e.Workers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for lctx.Err() == nil {
							iv.invoke(lctx, r.payload, "Event")
						}
					}()
				}
				wg.Wait()
			})
	}
	return nil
}

// runScaleToZero measures cold starts after scale to zero on a second
// server whose keep-alive is short.
func (r *runner) runScaleToZero(ctx context.Context) error {
	srv, err := startInvokeX(ctx, serverArgs{
		bin:     r.opts.InvokexBin,
		driver:  r.opts.Driver,
		dataDir: filepath.Join(r.work, "invokex-s2z-data"),
		logPath: filepath.Join(r.work, "invokex-s2z-server.log"),
		// Debug: the harness then logs each instance's driver_start, the
		// sandbox's share of the cold start. Nothing here is a throughput
		// figure that a log line per request could skew.
		logLevel:  "debug",
		keepAlive: r.opts.KeepAliveShort,
	}, r.http)
	if err != nil {
		return fmt.Errorf("starting the scale-to-zero invokex server: %w", err)
	}
	defer r.stopServer(srv)
	const name = "bench-s2z"
	iv, err := r.deployWarm(ctx, srv, name, "s2z")
	if err != nil {
		r.rep.ColdAfterScaleZero.Why = err.Error()
		return nil
	}
	var samples []coldSample
	errs, first := 0, ""
	fail := func(msg string) {
		errs++
		if first == "" {
			first = msg
		}
	}
	wait := 3*r.opts.KeepAliveShort + 20*time.Second
	for i := 0; i < r.opts.ColdStarts && ctx.Err() == nil; i++ {
		if err := srv.waitInstances(ctx, r.fs, 0, wait); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r.rep.ColdAfterScaleZero.Why = "instances were not stopped after the keep-alive: " + err.Error()
			break
		}
		c := iv.invoke(ctx, r.payload, "")
		if !c.ok(r.want) {
			fail(c.describe())
			continue
		}
		rec, err := srv.record(ctx, c.RequestID, 10*time.Second)
		if err != nil {
			fail(err.Error())
			continue
		}
		samples = append(samples, coldSample{ttfb: c.TTFB, total: c.Total, init: msToDuration(rec.InitDurationMs), haveInit: rec.Cold, cold: rec.Cold})
	}
	why := r.rep.ColdAfterScaleZero.Why
	r.rep.ColdAfterScaleZero = summarizeCold(samples, errs, first)
	r.rep.ColdAfterScaleZero.Why = why
	// The first instance started for deployWarm's invoke, not a sample.
	if ds := srv.driverStarts(); len(ds) > 1 {
		r.rep.ColdAfterScaleZero.DriverStart = Summarize(ds[1:])
	}
	s := r.rep.ColdAfterScaleZero
	r.say("InvokeX cold after scale-to-zero: to first byte p50 %s, init p50 %s", fmtMs(s.TTFB.P50), fmtMs(s.Init.P50))
	if err := ctx.Err(); err != nil {
		return err
	}
	return r.snapStartPhase(ctx, srv)
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
