package bench

import (
	"context"
	"fmt"
	"runtime"
	"time"
)

// warmBlocks is how many alternating blocks each warm measurement is cut
// into.
const warmBlocks = 10

// warmPhase measures warm invokes on both systems at every concurrency
// level. Each level's invokes are cut into blocks that alternate between
// RIE and InvokeX (RIE first in even blocks, InvokeX first in odd ones),
// so that whatever else runs on the machine weighs on both alike. Then it
// profiles a warm load on InvokeX.
func (r *runner) warmPhase(ctx context.Context, srv *ixServer) error {
	const name = "bench-echo"
	iv, err := r.deployWarm(ctx, srv, name, "warm")
	if err != nil {
		return err
	}
	defer r.removeAndSettle(ctx, srv, name)
	blocks := min(warmBlocks, r.opts.Runs)
	for i, conc := range r.opts.Concurrency {
		if err := ctx.Err(); err != nil {
			return err
		}
		p, err := r.liveRIE(ctx)
		if err != nil {
			return err
		}
		// RIE has one instance: a few sequential invokes warm it (and start
		// it after a restart); concurrent ones would only crash it.
		runLoad(ctx, p.iv, 1, 20, r.payload, r.want, p.alive)
		// InvokeX: an unmeasured warm-up at the level's concurrency, so
		// that every instance it needs exists.
		if wu := runLoad(ctx, iv, conc, max(conc*5, 20), r.payload, r.want, srv.alive); wu.Errors > 0 {
			r.note("InvokeX warm-up at concurrency %d: %d errors (%s)", conc, wu.Errors, kindsString(wu.ErrorKinds))
		}

		var ixRes, rieRes LoadResult
		var ixCPU, rieCPU cpuTicks
		ixCPUOK, rieCPUOK := true, true
		busy0, start := r.fs.machineBusy(), time.Now()
		for b := 0; b < blocks && ctx.Err() == nil; b++ {
			n := r.opts.Runs / blocks
			if b < r.opts.Runs%blocks {
				n++
			}
			runRIE := func() {
				if rieRes.Died {
					return // crashed in an earlier block: nothing to measure
				}
				res, t, ok := r.loadTicks(p.pid(), func() LoadResult {
					return runLoad(ctx, p.iv, conc, n, r.payload, r.want, p.alive)
				})
				rieRes, rieCPU, rieCPUOK = mergeLoads(rieRes, res), rieCPU.add(t), rieCPUOK && ok
			}
			runIX := func() {
				res, t, ok := r.loadTicks(srv.pid(), func() LoadResult {
					return runLoad(ctx, iv, conc, n, r.payload, r.want, srv.alive)
				})
				ixRes, ixCPU, ixCPUOK = mergeLoads(ixRes, res), ixCPU.add(t), ixCPUOK && ok
			}
			if b%2 == 0 {
				runRIE()
				runIX()
			} else {
				runIX()
				runRIE()
			}
		}
		row := &r.rep.Warm[i]
		row.InvokeX, row.RIE = ixRes, rieRes
		row.OtherCPU = -1
		if busy1 := r.fs.machineBusy(); busy0 >= 0 && busy1 >= 0 && ixCPUOK && rieCPUOK {
			row.OtherCPU = otherShare(busy1-busy0, ixCPU.total()+rieCPU.total(), time.Since(start), runtime.NumCPU())
		}
		if ixCPUOK {
			row.InvokeXCPU = ixCPU.per(ixRes.OK)
		}
		if rieCPUOK && !rieRes.Died {
			row.RIECPU = rieCPU.per(rieRes.OK)
		}
		switch {
		case rieRes.Died:
			row.RIENote = fmt.Sprintf("crashed after %d successful invokes (%s): %s",
				rieRes.OK, kindsString(rieRes.ErrorKinds), orNone(p.panicLine()))
		case rieRes.Errors > 0:
			row.RIENote = fmt.Sprintf("%d errors (%s); first: %s", rieRes.Errors, kindsString(rieRes.ErrorKinds), rieRes.FirstErrors[0])
		}
		if g, err := srv.instances(r.fs); err == nil {
			row.InvokeXInstances = len(g)
		}
		r.say("c=%d: InvokeX p50 %s, %.0f inv/s, %d errors; RIE p50 %s, %.0f inv/s, %d errors%s",
			conc, fmtMs(ixRes.Latency.P50), ixRes.PerSec, ixRes.Errors,
			fmtMs(rieRes.Latency.P50), rieRes.PerSec, rieRes.Errors, map[bool]string{true: " (crashed)"}[rieRes.Died])
	}
	if r.opts.ProfileSeconds > 0 && ctx.Err() == nil {
		conc := 8
		if !containsInt(r.opts.Concurrency, 8) {
			conc = r.opts.Concurrency[len(r.opts.Concurrency)-1]
		}
		r.say("InvokeX: profiling %d s of warm invokes at concurrency %d", r.opts.ProfileSeconds, conc)
		r.capturePerf(ctx, srv, &r.rep.Profile, fmt.Sprintf("warm invokes at concurrency %d", conc), r.opts.ProfileSeconds, true,
			func(lctx context.Context) { runLoad(lctx, iv, conc, 1<<30, r.payload, r.want, nil) })
	}
	if m, err := r.fs.Mem(srv.pid()); err == nil {
		r.rep.Memory.ServerAfterLoad = m
	}
	return nil
}

// liveRIE returns the running emulator, restarting it if it died (it
// crashes under concurrent invokes).
func (r *runner) liveRIE(ctx context.Context) (*rieProc, error) {
	if r.rie.alive() {
		return r.rie, nil
	}
	_ = r.rie.stop(0)
	p, err := r.rieT.start(ctx)
	if err != nil {
		return nil, fmt.Errorf("restarting RIE: %w", err)
	}
	r.rie = p
	return p, nil
}
