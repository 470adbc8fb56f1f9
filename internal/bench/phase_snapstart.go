package bench

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"
)

// SnapStartResult is SnapStart on a VM driver: a published version's
// environments restored from its snapshot instead of booted, measured on
// the scale-to-zero server right after its cold boots (ColdAfterScaleZero,
// the figure it is compared with).
type SnapStartResult struct {
	// Restore is the first invoke of a restored environment: to its first
	// response byte (Init is empty: there is no INIT).
	Restore ColdSeries
	// PublishToActive is PublishVersion until the version is Active with
	// its snapshot taken (a boot, INIT and the save).
	PublishToActive time.Duration
	// RestoredVM is the host memory of a restored VM, idle, half a second
	// after its first invoke.
	RestoredVM Mem
	// PythonCold and PythonRestore are the same for a python3.11 echo
	// function: cold boots (with its INIT) and restores of its version.
	PythonCold, PythonRestore ColdSeries
	Why                       string
}

// pythonEcho is the python function of the SnapStart phase: it answers
// with the event, as the Go echo function does.
const pythonEcho = "def handler(event, context):\n    return event\n"

// snapStartPhase measures SnapStart on srv (a server with a short
// keep-alive, so each invoke after the instances are gone is a restore).
// Only VM drivers take snapshots.
func (r *runner) snapStartPhase(ctx context.Context, srv *ixServer) error {
	res := &r.rep.SnapStart
	if !isVMDriver(r.opts.Driver) {
		return nil
	}
	const name = "bench-snap"
	zip, err := r.zips.zip("snap")
	if err != nil {
		return err
	}
	_, err = srv.deploy(ctx, name, zip, func(in *lambda.CreateFunctionInput) {
		in.SnapStart = &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions}
	})
	if err != nil {
		res.Why = err.Error()
		return nil
	}
	start := time.Now()
	pub, err := srv.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String(name)})
	if err != nil {
		res.Why = "PublishVersion: " + err.Error()
		return nil
	}
	version := aws.ToString(pub.Version)
	if err := waitSnapshot(ctx, srv, name, version); err != nil {
		res.Why = err.Error()
		return nil
	}
	res.PublishToActive = time.Since(start)

	res.Restore = r.coldSeries(ctx, srv, versionInvoker(srv, name, version), r.want, func() {
		// One restored VM's memory, before the keep-alive stops it.
		if sleepCtx(ctx, 500*time.Millisecond) == nil {
			if m, err := r.measureInstances(srv); err == nil {
				res.RestoredVM = m.PerInstance
			}
		}
	})
	r.say("InvokeX SnapStart: restored to first byte p50 %s (cold boot p50 %s), publish to Active %s",
		fmtMs(res.Restore.TTFB.P50), fmtMs(r.rep.ColdAfterScaleZero.TTFB.P50), fmtMs(res.PublishToActive))
	if err := ctx.Err(); err != nil {
		return err
	}
	r.pythonSnapStart(ctx, srv)
	return ctx.Err()
}

// pythonSnapStart measures a python function's cold boots ($LATEST, with
// its INIT) and restores (its SnapStart version) on srv.
func (r *runner) pythonSnapStart(ctx context.Context, srv *ixServer) {
	res := &r.rep.SnapStart
	const name = "bench-snap-py"
	zip, err := zipFiles(map[string]string{"app.py": pythonEcho})
	if err == nil {
		_, err = srv.deploy(ctx, name, zip, func(in *lambda.CreateFunctionInput) {
			in.Runtime, in.Handler = types.Runtime("python3.11"), aws.String("app.handler")
			in.SnapStart = &types.SnapStart{ApplyOn: types.SnapStartApplyOnPublishedVersions}
		})
	}
	if err != nil {
		res.PythonCold.Why = "python function: " + err.Error()
		return
	}
	// Python's json puts a space after the colon: look for the value only.
	want := []byte("invokex-echo-payload")
	res.PythonCold = r.coldSeries(ctx, srv, srv.invoker(name), want, nil)
	pub, err := srv.sdk.PublishVersion(ctx, &lambda.PublishVersionInput{FunctionName: aws.String(name)})
	if err == nil {
		err = waitSnapshot(ctx, srv, name, aws.ToString(pub.Version))
	}
	if err != nil {
		res.PythonRestore.Why = err.Error()
		return
	}
	res.PythonRestore = r.coldSeries(ctx, srv, versionInvoker(srv, name, aws.ToString(pub.Version)), want, nil)
	r.say("InvokeX SnapStart, python: restored to first byte p50 %s, cold boot p50 %s",
		fmtMs(res.PythonRestore.TTFB.P50), fmtMs(res.PythonCold.TTFB.P50))
}

// versionInvoker invokes a published version of name.
func versionInvoker(srv *ixServer, name, version string) *invoker {
	return &invoker{http: srv.http, url: srv.endpoint + "/2015-03-31/functions/" + url.PathEscape(name) + "/invocations?Qualifier=" + version}
}

// coldSeries invokes iv ColdStarts times, each once srv has no instance
// left (its keep-alive is short), and summarises the first responses.
// afterFirst, if set, runs after the first sample.
func (r *runner) coldSeries(ctx context.Context, srv *ixServer, iv *invoker, want []byte, afterFirst func()) ColdSeries {
	var samples []coldSample
	errs, first, why := 0, "", ""
	wait := 3*r.opts.KeepAliveShort + 20*time.Second
	for i := 0; i < r.opts.ColdStarts && ctx.Err() == nil; i++ {
		if err := srv.waitInstances(ctx, r.fs, 0, wait); err != nil {
			why = "instances were not stopped after the keep-alive: " + err.Error()
			break
		}
		c := iv.invoke(ctx, r.payload, "")
		if !c.ok(want) {
			errs++
			if first == "" {
				first = c.describe()
			}
			continue
		}
		samples = append(samples, coldSample{ttfb: c.TTFB, total: c.Total, cold: true})
		if i == 0 && afterFirst != nil {
			afterFirst()
		}
	}
	s := summarizeCold(samples, errs, first)
	s.Why = why
	return s
}

// waitSnapshot polls the version until it is Active with its snapshot
// (OptimizationStatus On).
func waitSnapshot(ctx context.Context, srv *ixServer, name, version string) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		cfg, err := srv.sdk.GetFunctionConfiguration(ctx, &lambda.GetFunctionConfigurationInput{FunctionName: aws.String(name), Qualifier: aws.String(version)})
		if err != nil {
			return fmt.Errorf("getting version %s: %w", version, err)
		}
		switch {
		case cfg.State == types.StateFailed:
			return fmt.Errorf("version %s failed: %s", version, aws.ToString(cfg.StateReason))
		case cfg.State == types.StateActive && cfg.SnapStart != nil && cfg.SnapStart.OptimizationStatus == types.SnapStartOptimizationStatusOn:
			return nil
		case cfg.State == types.StateActive:
			return fmt.Errorf("version %s is Active without a snapshot (the driver takes none)", version)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("version %s still %s after 5 minutes", version, cfg.State)
		}
		if err := sleepCtx(ctx, 10*time.Millisecond); err != nil {
			return err
		}
	}
}
