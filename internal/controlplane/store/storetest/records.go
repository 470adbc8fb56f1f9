package storetest

import (
	"bytes"
	"context"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

var runtimeTests = []test{
	{"PutGetRoundTrip", testRuntimeRoundTrip},
	{"PutReplaces", testRuntimeReplace},
	{"GetMissing", testRuntimeMissing},
	{"List", testRuntimeList},
	{"Copies", testRuntimeCopies},
}

func fullRuntime(id string) *runtimes.Runtime {
	return &runtimes.Runtime{
		ID:             id,
		Family:         runtimes.FamilyPython,
		Available:      true,
		Reason:         "found /usr/bin/python3",
		Interpreter:    "/usr/bin/python3.12",
		Bootstrap:      []string{"/usr/bin/python3", "-u", "/var/runtime/bootstrap.py", "arg with spaces"},
		HandlerFormat:  "file.function",
		DefaultHandler: "lambda_function.lambda_handler",
		ExecutionEnv:   "AWS_Lambda_" + id,
	}
}

func checkRuntime(t *testing.T, got, want *runtimes.Runtime) {
	t.Helper()
	if got == nil {
		t.Fatalf("got nil runtime, want %+v", want)
	}
	g, w := *got, *want
	if !sameStrings(g.Bootstrap, w.Bootstrap) {
		t.Errorf("Bootstrap: got %q, want %q", g.Bootstrap, w.Bootstrap)
	}
	g.Bootstrap, w.Bootstrap = nil, nil
	if !reflect.DeepEqual(g, w) {
		t.Errorf("runtime:\n got %+v\nwant %+v", g, w)
	}
}

func testRuntimeRoundTrip(t *testing.T, s store.Store) {
	want := fullRuntime("python3.12")
	must(t, s.Runtimes().Put(ctx(t), want), "Put")
	got, err := s.Runtimes().Get(ctx(t), want.ID)
	must(t, err, "Get")
	checkRuntime(t, got, want)

	bare := &runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided}
	must(t, s.Runtimes().Put(ctx(t), bare), "Put bare")
	got, err = s.Runtimes().Get(ctx(t), bare.ID)
	must(t, err, "Get bare")
	checkRuntime(t, got, bare)
}

func testRuntimeReplace(t *testing.T, s store.Store) {
	must(t, s.Runtimes().Put(ctx(t), fullRuntime("nodejs20.x")), "Put")
	next := &runtimes.Runtime{
		ID: "nodejs20.x", Family: runtimes.FamilyNode, Available: false,
		Reason: "node not found", Bootstrap: []string{"/var/runtime/bootstrap"},
	}
	must(t, s.Runtimes().Put(ctx(t), next), "second Put")
	got, err := s.Runtimes().Get(ctx(t), "nodejs20.x")
	must(t, err, "Get")
	checkRuntime(t, got, next)
	all, err := s.Runtimes().List(ctx(t))
	must(t, err, "List")
	if len(all) != 1 {
		t.Fatalf("List after replacing Put: %d runtimes, want 1", len(all))
	}
}

func testRuntimeMissing(t *testing.T, s store.Store) {
	_, err := s.Runtimes().Get(ctx(t), "cobol1.0")
	wantKind(t, err, errdefs.ErrNotFound, "Get missing runtime")
}

func testRuntimeList(t *testing.T, s store.Store) {
	all, err := s.Runtimes().List(ctx(t))
	must(t, err, "List empty")
	if len(all) != 0 {
		t.Fatalf("List on empty store: %d runtimes", len(all))
	}
	ids := []string{"python3.12", "nodejs20.x", "provided.al2023", "python3.11", "nodejs22.x"}
	for _, id := range ids {
		must(t, s.Runtimes().Put(ctx(t), fullRuntime(id)), "Put "+id)
	}
	all, err = s.Runtimes().List(ctx(t))
	must(t, err, "List")
	slices.Sort(ids)
	var got []string
	for _, rt := range all {
		got = append(got, rt.ID)
		checkRuntime(t, rt, fullRuntime(rt.ID))
	}
	if !slices.Equal(got, ids) {
		t.Fatalf("List: %v, want %v", got, ids)
	}
}

func testRuntimeCopies(t *testing.T, s store.Store) {
	in := fullRuntime("python3.13")
	want := fullRuntime("python3.13")
	must(t, s.Runtimes().Put(ctx(t), in), "Put")
	in.Bootstrap[0] = "mutated"
	got, err := s.Runtimes().Get(ctx(t), in.ID)
	must(t, err, "Get")
	checkRuntime(t, got, want)
	got.Bootstrap[0] = "mutated"
	all, err := s.Runtimes().List(ctx(t))
	must(t, err, "List")
	checkRuntime(t, all[0], want)
}

var invocationTests = []test{
	{"PutGetRoundTrip", testInvocationRoundTrip},
	{"PutUpserts", testInvocationUpsert},
	{"PutEmpty", testInvocationPutEmpty},
	{"GetMissing", testInvocationMissing},
	{"ListByFunction", testInvocationList},
	{"DeleteBefore", testInvocationDeleteBefore},
	{"Copies", testInvocationCopies},
	{"CancelledContext", testInvocationCancelled},
}

func fullRecord(id, fn string, start time.Time) *invocation.Record {
	return &invocation.Record{
		RequestID:    id,
		Function:     fn,
		RevisionID:   "rev-7",
		Version:      "$LATEST",
		Type:         invocation.TypeEvent,
		Status:       invocation.StatusFunctionError,
		ErrorType:    "Runtime.ExitError",
		ErrorMessage: "exit status 1",
		Attempts:     3,
		Cold:         true,
		Start:        start,
		End:          start.Add(1500*time.Millisecond + 7),
		InitDuration: 250*time.Millisecond + 3,
		Duration:     1500*time.Millisecond + 7,
		MaxMemoryMB:  77,
		Log:          []byte("START RequestId: x\n\x00binary\xff\nEND\n"),
		LogBytes:     1 << 40,
	}
}

func checkRecord(t *testing.T, got, want *invocation.Record) {
	t.Helper()
	if got == nil {
		t.Fatalf("got nil record, want %+v", want)
	}
	g, w := *got, *want
	sameTime(t, g.Start, w.Start, "Start")
	sameTime(t, g.End, w.End, "End")
	if !bytes.Equal(g.Log, w.Log) {
		t.Errorf("Log: got %q, want %q", g.Log, w.Log)
	}
	g.Start, w.Start, g.End, w.End = time.Time{}, time.Time{}, time.Time{}, time.Time{}
	g.Log, w.Log = nil, nil
	if !reflect.DeepEqual(g, w) {
		t.Errorf("record:\n got %+v\nwant %+v", g, w)
	}
}

func testInvocationRoundTrip(t *testing.T, s store.Store) {
	recs := []*invocation.Record{
		fullRecord("req-1", "fn", base),
		fullRecord("req-2", "fn", base.Add(time.Second)),
		{RequestID: "req-bare", Function: "fn"}, // zero times, nil log
	}
	recs[1].Cold, recs[1].Status, recs[1].Log = false, invocation.StatusSucceeded, nil
	must(t, s.Invocations().Put(ctx(t), recs), "Put")
	for _, want := range recs {
		got, err := s.Invocations().Get(ctx(t), want.RequestID)
		must(t, err, "Get "+want.RequestID)
		checkRecord(t, got, want)
	}
}

func testInvocationUpsert(t *testing.T, s store.Store) {
	queued := &invocation.Record{RequestID: "req-u", Function: "fn", Type: invocation.TypeEvent,
		Status: invocation.StatusQueued, Start: base}
	must(t, s.Invocations().Put(ctx(t), []*invocation.Record{queued}), "Put queued")
	done := fullRecord("req-u", "fn", base)
	done.Status = invocation.StatusSucceeded
	other := fullRecord("req-v", "fn", base)
	must(t, s.Invocations().Put(ctx(t), []*invocation.Record{done, other}), "Put done")
	got, err := s.Invocations().Get(ctx(t), "req-u")
	must(t, err, "Get")
	checkRecord(t, got, done)
	list, err := s.Invocations().ListByFunction(ctx(t), "fn", time.Time{}, 10)
	must(t, err, "ListByFunction")
	if len(list) != 2 {
		t.Fatalf("ListByFunction after upsert: %d records, want 2", len(list))
	}
}

func testInvocationPutEmpty(t *testing.T, s store.Store) {
	must(t, s.Invocations().Put(ctx(t), nil), "Put nil")
	must(t, s.Invocations().Put(ctx(t), []*invocation.Record{}), "Put empty")
}

func testInvocationMissing(t *testing.T, s store.Store) {
	_, err := s.Invocations().Get(ctx(t), "req-missing")
	wantKind(t, err, errdefs.ErrNotFound, "Get missing record")
}

func testInvocationList(t *testing.T, s store.Store) {
	// Ten records of "fn" one second apart, inserted out of order, plus
	// records of another function interleaved in time.
	var recs []*invocation.Record
	for _, i := range []int{3, 7, 0, 9, 1, 5, 8, 2, 6, 4} {
		recs = append(recs, fullRecord(fmt.Sprintf("req-%d", i), "fn", base.Add(time.Duration(i)*time.Second)))
		recs = append(recs, fullRecord(fmt.Sprintf("other-%d", i), "fn-other", base.Add(time.Duration(i)*time.Second+1)))
	}
	must(t, s.Invocations().Put(ctx(t), recs), "Put")

	ids := func(rs []*invocation.Record) []string {
		var out []string
		for _, r := range rs {
			out = append(out, r.RequestID)
		}
		return out
	}
	page, err := s.Invocations().ListByFunction(ctx(t), "fn", time.Time{}, 4)
	must(t, err, "ListByFunction")
	if want := []string{"req-9", "req-8", "req-7", "req-6"}; !slices.Equal(ids(page), want) {
		t.Fatalf("first page: %v, want %v", ids(page), want)
	}
	checkRecord(t, page[0], fullRecord("req-9", "fn", base.Add(9*time.Second)))

	page, err = s.Invocations().ListByFunction(ctx(t), "fn", page[len(page)-1].Start, 4)
	must(t, err, "ListByFunction")
	if want := []string{"req-5", "req-4", "req-3", "req-2"}; !slices.Equal(ids(page), want) {
		t.Fatalf("second page: %v, want %v", ids(page), want)
	}
	page, err = s.Invocations().ListByFunction(ctx(t), "fn", page[len(page)-1].Start, 4)
	must(t, err, "ListByFunction")
	if want := []string{"req-1", "req-0"}; !slices.Equal(ids(page), want) {
		t.Fatalf("last page: %v, want %v", ids(page), want)
	}
	page, err = s.Invocations().ListByFunction(ctx(t), "fn", base, 4)
	must(t, err, "ListByFunction")
	if len(page) != 0 {
		t.Fatalf("page before the oldest record: %v, want none", ids(page))
	}
	page, err = s.Invocations().ListByFunction(ctx(t), "nobody", time.Time{}, 4)
	must(t, err, "ListByFunction")
	if len(page) != 0 {
		t.Fatalf("records of a function without any: %v", ids(page))
	}
}

func testInvocationDeleteBefore(t *testing.T, s store.Store) {
	mk := func(id string, end time.Time) *invocation.Record {
		return &invocation.Record{RequestID: id, Function: "fn", Start: end.Add(-time.Second), End: end}
	}
	recs := []*invocation.Record{
		mk("old-1", base.Add(-2*time.Hour)),
		mk("old-2", base.Add(-time.Nanosecond)),
		mk("edge", base), // not strictly before: kept
		mk("new", base.Add(time.Hour)),
		{RequestID: "running", Function: "fn", Start: base.Add(-3 * time.Hour)}, // no End yet
	}
	must(t, s.Invocations().Put(ctx(t), recs), "Put")
	n, err := s.Invocations().DeleteBefore(ctx(t), base)
	must(t, err, "DeleteBefore")
	if n != 2 {
		t.Fatalf("DeleteBefore removed %d records, want 2", n)
	}
	for _, id := range []string{"old-1", "old-2"} {
		_, err := s.Invocations().Get(ctx(t), id)
		wantKind(t, err, errdefs.ErrNotFound, "Get deleted "+id)
	}
	for _, id := range []string{"edge", "new", "running"} {
		if _, err := s.Invocations().Get(ctx(t), id); err != nil {
			t.Fatalf("Get kept %s: %v", id, err)
		}
	}
	n, err = s.Invocations().DeleteBefore(ctx(t), base)
	must(t, err, "second DeleteBefore")
	if n != 0 {
		t.Fatalf("second DeleteBefore removed %d records, want 0", n)
	}
}

func testInvocationCopies(t *testing.T, s store.Store) {
	in := fullRecord("req-c", "fn", base)
	want := fullRecord("req-c", "fn", base)
	must(t, s.Invocations().Put(ctx(t), []*invocation.Record{in}), "Put")
	in.Log[0] = 'X'
	in.Status = invocation.StatusFailed
	got, err := s.Invocations().Get(ctx(t), "req-c")
	must(t, err, "Get")
	checkRecord(t, got, want)
	got.Log[0] = 'Y'
	list, err := s.Invocations().ListByFunction(ctx(t), "fn", time.Time{}, 1)
	must(t, err, "ListByFunction")
	checkRecord(t, list[0], want)
}

func testInvocationCancelled(t *testing.T, s store.Store) {
	err := s.Invocations().Put(cancelled(t), []*invocation.Record{fullRecord("req-x", "fn", base)})
	wantKind(t, err, context.Canceled, "Put with a cancelled context")
	_, err = s.Invocations().Get(ctx(t), "req-x")
	wantKind(t, err, errdefs.ErrNotFound, "Get after cancelled Put")
}
