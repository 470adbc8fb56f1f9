package bench

import (
	"context"
	"fmt"
	"time"
)

// startRIE starts the emulator for the warm phase and measures the memory
// of its one idle warm instance, with the same treatment each InvokeX
// instance gets: one 1 s invoke, then 1 s idle.
func (r *runner) startRIE(ctx context.Context, t *rieTarget) (*rieProc, error) {
	p, err := t.start(ctx)
	if err != nil {
		return nil, fmt.Errorf("starting RIE: %w", err)
	}
	if c := p.iv.invoke(ctx, sleepPayload(1000), ""); !c.ok(nil) {
		r.rep.Memory.Why = "RIE's first invoke failed: " + c.describe()
	} else if err := sleepCtx(ctx, time.Second); err != nil {
		_ = p.stop(0)
		return nil, err
	} else if err := r.measureRIEMemory(p); err != nil {
		r.rep.Memory.Why = err.Error()
	}
	return p, nil
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
