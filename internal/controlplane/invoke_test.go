package controlplane

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
)

func TestInvokeRecordsSuccess(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	cfg := e.create("f")
	res, got, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: "req-1", Function: "f", Payload: []byte(`{"a":1}`), TraceID: "Root=1"})
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Payload) != `{"a":1}` || got.Version != "$LATEST" || got.RevisionID != cfg.RevisionID {
		t.Fatalf("result %q config %+v", res.Payload, got)
	}
	reqs := e.host.requests()
	if len(reqs) != 1 {
		t.Fatalf("host saw %d requests", len(reqs))
	}
	r := reqs[0]
	if r.RequestID != "req-1" || r.ARN != "arn:aws:lambda:us-east-1:000000000000:function:f" || r.Function.RevisionID != cfg.RevisionID ||
		r.Runtime.ID != "provided.al2023" || r.TraceID != "Root=1" {
		t.Fatalf("host request = %+v", r)
	}
	rec, err := e.svc.GetInvocation(ctx, "req-1")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != invocation.StatusSucceeded || rec.Type != invocation.TypeRequestResponse || rec.Function != "f" ||
		rec.Attempts != 1 || rec.RevisionID != cfg.RevisionID || !rec.Cold || len(rec.Log) == 0 {
		t.Fatalf("record = %+v", rec)
	}
	// The record reaches the store (flushed by the writer).
	waitFor(t, "record flushed", func() bool {
		_, err := e.store.Invocations().Get(ctx, "req-1")
		return err == nil
	})
	if _, err := e.svc.GetInvocation(ctx, "req-1"); err != nil {
		t.Fatal(err)
	}
}

func TestInvokeFunctionError(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		return fnErrorResult(req), nil
	}
	res, _, err := e.svc.Invoke(context.Background(), &InvokeInput{RequestID: "r", Function: "f"})
	if err != nil {
		t.Fatal(err)
	}
	if res.FunctionError != "Unhandled" {
		t.Fatalf("FunctionError = %q", res.FunctionError)
	}
	rec, err := e.svc.GetInvocation(context.Background(), "r")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != invocation.StatusFunctionError || rec.ErrorType != "Error" || rec.ErrorMessage != "boom" {
		t.Fatalf("record = %+v", rec)
	}
}

func TestInvokeHarnessErrorRecordedAndReturned(t *testing.T) {
	e := newEnv(t, nil)
	e.create("f")
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		return nil, errdefs.Throttled(errdefs.ReasonReservedFunctionConcurrency, "Rate Exceeded.")
	}
	_, _, err := e.svc.Invoke(context.Background(), &InvokeInput{RequestID: "r", Function: "f"})
	var te *errdefs.ThrottleError
	if !errors.Is(err, errdefs.ErrThrottled) || !errors.As(err, &te) || te.Reason != errdefs.ReasonReservedFunctionConcurrency {
		t.Fatalf("error = %v, want a throttle with its reason", err)
	}
	rec, err := e.svc.GetInvocation(context.Background(), "r")
	if err != nil {
		t.Fatal(err)
	}
	if rec.Status != invocation.StatusFailed || rec.ErrorType != "TooManyRequestsException" || rec.ErrorMessage != "Rate Exceeded." {
		t.Fatalf("record = %+v", rec)
	}
}

func TestInvokeResolveErrors(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")

	_, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "ghost"})
	wantKind(t, err, errdefs.ErrNotFound, "Function not found: arn:aws:lambda:us-east-1:000000000000:function:ghost")
	_, _, err = e.svc.Invoke(ctx, &InvokeInput{Function: "f", Qualifier: "7"})
	wantKind(t, err, errdefs.ErrNotFound, "Function not found: arn:aws:lambda:us-east-1:000000000000:function:f:7")
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Qualifier: "$LATEST"}); err != nil {
		t.Fatalf("$LATEST: %v", err)
	}
	if _, err := e.svc.CheckInvoke(ctx, "f", ""); err != nil {
		t.Fatalf("CheckInvoke: %v", err)
	}

	// A function that is not Active.
	cur, _ := e.store.Functions().Get(ctx, "f")
	pending := cur.Clone()
	pending.State, pending.RevisionID = function.StatePending, "pending-rev"
	if err := e.store.Functions().Update(ctx, pending, cur.RevisionID); err != nil {
		t.Fatal(err)
	}
	// The Service is its store's only writer and caches what it read;
	// this test writes behind its back, so it says so.
	e.svc.cache.invalidateAll()
	// Pending is a conflict (try again later), as on Lambda.
	_, _, err = e.svc.Invoke(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrConflict, "The operation cannot be performed at this time. The function is currently in the following state: Pending")
	_, err = e.svc.CheckInvoke(ctx, "f", "")
	wantKind(t, err, errdefs.ErrConflict, "")
	err = e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrConflict, "Pending")

	// Failed is not ready.
	failed := pending.Clone()
	failed.State, failed.RevisionID = function.StateFailed, "failed-rev"
	if err := e.store.Functions().Update(ctx, failed, "pending-rev"); err != nil {
		t.Fatal(err)
	}
	e.svc.cache.invalidateAll()
	_, _, err = e.svc.Invoke(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrNotReady, "Failed")

	// A runtime this host no longer has.
	active := pending.Clone()
	active.State, active.RevisionID = function.StateActive, "active-rev"
	if err := e.store.Functions().Update(ctx, active, "failed-rev"); err != nil {
		t.Fatal(err)
	}
	e.svc.cache.invalidateAll()
	rt, _ := e.store.Runtimes().Get(ctx, "provided.al2023")
	rt.Available, rt.Reason = false, "gone"
	if err := e.store.Runtimes().Put(ctx, rt); err != nil {
		t.Fatal(err)
	}
	e.svc.cache.invalidateAll()
	_, _, err = e.svc.Invoke(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrInvalidRuntime, "gone")
	if n := len(e.host.requests()); n != 1 {
		t.Fatalf("host saw %d requests, want only the $LATEST one", n)
	}
}

func TestRecordsLookupAndList(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	for i := 0; i < 5; i++ {
		if _, _, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: fmt.Sprintf("r%d", i), Function: "f"}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // distinct Start times for the ordering check
	}
	_, err := e.svc.GetInvocation(ctx, "nope")
	wantKind(t, err, errdefs.ErrNotFound, "nope")
	recs, err := e.svc.ListInvocations(ctx, "f", 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 || recs[0].RequestID != "r4" || recs[1].RequestID != "r3" || recs[2].RequestID != "r2" {
		ids := []string{}
		for _, r := range recs {
			ids = append(ids, r.RequestID)
		}
		t.Fatalf("ListInvocations = %v, want [r4 r3 r2]", ids)
	}
	all, err := e.svc.ListInvocations(ctx, "f", 0)
	if err != nil || len(all) != 5 {
		t.Fatalf("ListInvocations default = %d, %v", len(all), err)
	}
}

func TestCloseFlushesRecords(t *testing.T) {
	st, bl := newBackends(t)
	host := &fakeHost{}
	svc, err := New(Config{Store: st, Blobs: bl, Hosts: []harness.Host{host}, DetectRuntimes: testRuntimes})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := svc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.CreateFunction(ctx, &function.Config{Name: "f", Runtime: "provided.al2023"}, bootstrapZip(t, "x")); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		if _, _, err := svc.Invoke(ctx, &InvokeInput{RequestID: fmt.Sprintf("r%d", i), Function: "f"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := svc.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 50; i++ {
		if _, err := st.Invocations().Get(ctx, fmt.Sprintf("r%d", i)); err != nil {
			t.Fatalf("record r%d not flushed by Close: %v", i, err)
		}
	}
	_, _, err = svc.Invoke(ctx, &InvokeInput{Function: "f"})
	wantKind(t, err, errdefs.ErrUnavailable, "")
	wantKind(t, svc.InvokeAsync(ctx, &InvokeInput{Function: "f"}), errdefs.ErrUnavailable, "")
}
