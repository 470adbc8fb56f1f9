package bench

import (
	"context"
	"fmt"
	"time"
)

// runRIE measures the emulator: memory of one idle warm instance, warm
// invokes at every concurrency level, then the cold-start series.
func (r *runner) runRIE(ctx context.Context) error {
	t := &rieTarget{bin: r.opts.RIEBin, bootstrap: r.bootstrap, workDir: r.work, http: r.http}
	p, err := t.start(ctx)
	if err != nil {
		return fmt.Errorf("starting RIE: %w", err)
	}
	// p changes when RIE has to be restarted; stop whichever is current.
	defer func() { _ = p.stop(0) }()

	// Memory: the same treatment as each InvokeX instance gets: one 1 s
	// invoke, then 1 s idle.
	if c := p.iv.invoke(ctx, sleepPayload(1000), ""); !c.ok(nil) {
		r.rep.Memory.Why = "RIE's first invoke failed: " + c.describe()
	} else if err := sleepCtx(ctx, time.Second); err != nil {
		return err
	} else if err := r.measureRIEMemory(p); err != nil {
		r.rep.Memory.Why = err.Error()
	}

	for i, conc := range r.opts.Concurrency {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !p.alive() {
			_ = p.stop(0)
			if p, err = t.start(ctx); err != nil {
				return fmt.Errorf("restarting RIE: %w", err)
			}
		}
		// RIE has one instance: a few sequential invokes warm it (and
		// start it after a restart). Concurrent warm-up would only crash it.
		runLoad(ctx, p.iv, 1, 20, r.payload, r.want, p.alive)
		res, cpu := r.loadWithCPU(p.pid(), func() LoadResult {
			return runLoad(ctx, p.iv, conc, r.opts.Runs, r.payload, r.want, p.alive)
		})
		row := &r.rep.Warm[i]
		row.RIE = res
		if !res.Died {
			row.RIECPU = cpu
		}
		switch {
		case res.Died:
			row.RIENote = fmt.Sprintf("crashed after %d successful invokes (%s): %s",
				res.OK, kindsString(res.ErrorKinds), orNone(p.panicLine()))
		case res.Errors > 0:
			row.RIENote = fmt.Sprintf("%d errors (%s); first: %s", res.Errors, kindsString(res.ErrorKinds), res.FirstErrors[0])
		}
		r.say("RIE c=%d: p50 %s, %.0f inv/s, %d errors", conc, fmtMs(res.Latency.P50), res.PerSec, res.Errors)
	}
	_ = p.stop(0)

	r.rep.ColdRIE = r.rieColdStarts(ctx, t)
	return ctx.Err()
}

// measureRIEMemory records the emulator's and its function's memory.
func (r *runner) measureRIEMemory(p *rieProc) error {
	emu, err := r.fs.Mem(p.pid())
	if err != nil {
		return fmt.Errorf("RIE memory: %w", err)
	}
	fpid, err := p.functionPID(r.fs, r.fnComm)
	if err != nil {
		return fmt.Errorf("RIE memory: %w", err)
	}
	fn, err := r.fs.Mem(fpid)
	if err != nil {
		return fmt.Errorf("RIE memory: %w", err)
	}
	r.rep.Memory.RIEEmulator, r.rep.Memory.RIEFunction = emu, fn
	return nil
}

// rieColdStarts starts a new emulator per sample and times its first
// invoke: RIE's cold start, whether after a deploy or after scale to zero.
func (r *runner) rieColdStarts(ctx context.Context, t *rieTarget) ColdSeries {
	var samples []coldSample
	errs, first := 0, ""
	fail := func(msg string) {
		errs++
		if first == "" {
			first = msg
		}
	}
	for i := 0; i < r.opts.ColdStarts && ctx.Err() == nil; i++ {
		p, err := t.start(ctx)
		if err != nil {
			fail(err.Error())
			continue
		}
		c := p.iv.invoke(ctx, r.payload, "")
		init, haveInit := p.initDuration()
		_ = p.stop(0)
		if !c.ok(r.want) {
			fail(c.describe())
			continue
		}
		samples = append(samples, coldSample{ttfb: c.TTFB, total: c.Total, init: init, haveInit: haveInit, cold: haveInit})
	}
	s := summarizeCold(samples, errs, first)
	r.say("RIE cold: to first byte p50 %s, init p50 %s", fmtMs(s.TTFB.P50), fmtMs(s.Init.P50))
	return s
}
