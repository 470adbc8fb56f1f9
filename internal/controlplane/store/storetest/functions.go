package storetest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

var functionTests = []test{
	{"CreateGetRoundTrip", testFunctionRoundTrip},
	{"ReservedConcurrency", testFunctionReserved},
	{"ZeroValues", testFunctionZeroValues},
	{"CreateDuplicate", testFunctionDuplicate},
	{"GetMissing", testFunctionGetMissing},
	{"ListEmpty", testFunctionListEmpty},
	{"ListPages", testFunctionListPages},
	{"Update", testFunctionUpdate},
	{"UpdatePreconditionFailed", testFunctionUpdateStale},
	{"UpdateMissing", testFunctionUpdateMissing},
	{"UpdateConcurrent", testFunctionUpdateConcurrent},
	{"Delete", testFunctionDelete},
	{"CodeInUse", testFunctionCodeInUse},
	{"Copies", testFunctionCopies},
	{"CancelledContext", testFunctionCancelled},
}

// fullConfig returns a Config with every field set to a non-default value.
func fullConfig(name string) *function.Config {
	return &function.Config{
		Name:                   name,
		Runtime:                "python3.12",
		Handler:                "app.handler",
		Role:                   "arn:aws:iam::123456789012:role/lambda",
		Description:            "a function with \"quotes\", unicode ✓ and\nnewlines",
		Timeout:                42,
		MemorySize:             1536,
		EphemeralStorage:       2048,
		Environment:            map[string]string{"A": "1", "EMPTY": "", "JSONISH": `{"x":[1,2]}`},
		Architectures:          []string{"x86_64"},
		Tags:                   map[string]string{"team": "core", "cost-center": "42"},
		CodeSha256:             "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
		CodeSize:               1 << 33, // beyond int32
		RevisionID:             "rev-1",
		Version:                function.LatestVersion,
		State:                  function.StateActive,
		StateReason:            "ready",
		StateReasonCode:        "Idle",
		LastUpdateStatus:       function.UpdateSuccessful,
		LastUpdateStatusReason: "done",
		LastModified:           base.In(time.FixedZone("UTC+5", 5*3600)),
		ReservedConcurrency:    ptr(17),
		SnapStart:              function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOn},
	}
}

// checkConfig fails t unless got equals want field by field. Times compare
// by instant and must come back in UTC; nil and empty maps/slices are equal.
func checkConfig(t *testing.T, got, want *function.Config) {
	t.Helper()
	if got == nil {
		t.Fatalf("got nil config, want %+v", want)
	}
	g, w := *got, *want
	sameTime(t, g.LastModified, w.LastModified, "LastModified")
	if !sameMap(g.Environment, w.Environment) {
		t.Errorf("Environment: got %v, want %v", g.Environment, w.Environment)
	}
	if !sameMap(g.Tags, w.Tags) {
		t.Errorf("Tags: got %v, want %v", g.Tags, w.Tags)
	}
	if !sameStrings(g.Architectures, w.Architectures) {
		t.Errorf("Architectures: got %v, want %v", g.Architectures, w.Architectures)
	}
	switch {
	case (g.ReservedConcurrency == nil) != (w.ReservedConcurrency == nil):
		t.Errorf("ReservedConcurrency: got %v, want %v", fmtPtr(g.ReservedConcurrency), fmtPtr(w.ReservedConcurrency))
	case g.ReservedConcurrency != nil && *g.ReservedConcurrency != *w.ReservedConcurrency:
		t.Errorf("ReservedConcurrency: got %d, want %d", *g.ReservedConcurrency, *w.ReservedConcurrency)
	}
	// The remaining fields are comparable scalars.
	g.LastModified, w.LastModified = time.Time{}, time.Time{}
	g.Environment, w.Environment = nil, nil
	g.Tags, w.Tags = nil, nil
	g.Architectures, w.Architectures = nil, nil
	g.ReservedConcurrency, w.ReservedConcurrency = nil, nil
	if !reflect.DeepEqual(g, w) {
		t.Errorf("config:\n got %+v\nwant %+v", g, w)
	}
}

func fmtPtr(p *int) string {
	if p == nil {
		return "nil"
	}
	return fmt.Sprint(*p)
}

func testFunctionRoundTrip(t *testing.T, s store.Store) {
	want := fullConfig("round-trip")
	must(t, s.Functions().Create(ctx(t), want), "Create")
	got, err := s.Functions().Get(ctx(t), "round-trip")
	must(t, err, "Get")
	checkConfig(t, got, want)
}

func testFunctionReserved(t *testing.T, s store.Store) {
	cases := map[string]*int{"unreserved": nil, "throttled": ptr(0), "reserved": ptr(100)}
	for name, rc := range cases {
		cfg := fullConfig(name)
		cfg.ReservedConcurrency = rc
		must(t, s.Functions().Create(ctx(t), cfg), "Create "+name)
	}
	for name, rc := range cases {
		got, err := s.Functions().Get(ctx(t), name)
		must(t, err, "Get "+name)
		if (got.ReservedConcurrency == nil) != (rc == nil) ||
			(rc != nil && *got.ReservedConcurrency != *rc) {
			t.Errorf("%s: ReservedConcurrency %s, want %s", name, fmtPtr(got.ReservedConcurrency), fmtPtr(rc))
		}
	}
}

// testFunctionZeroValues checks that empty fields and the zero time survive.
func testFunctionZeroValues(t *testing.T, s store.Store) {
	want := &function.Config{Name: "bare"}
	must(t, s.Functions().Create(ctx(t), want), "Create")
	got, err := s.Functions().Get(ctx(t), "bare")
	must(t, err, "Get")
	checkConfig(t, got, want)
}

func testFunctionDuplicate(t *testing.T, s store.Store) {
	first := fullConfig("dup")
	must(t, s.Functions().Create(ctx(t), first), "Create")
	second := fullConfig("dup")
	second.Handler = "other.handler"
	second.RevisionID = "rev-other"
	wantKind(t, s.Functions().Create(ctx(t), second), errdefs.ErrAlreadyExists, "second Create")
	got, err := s.Functions().Get(ctx(t), "dup")
	must(t, err, "Get")
	checkConfig(t, got, first)
}

func testFunctionGetMissing(t *testing.T, s store.Store) {
	_, err := s.Functions().Get(ctx(t), "missing")
	wantKind(t, err, errdefs.ErrNotFound, "Get missing")
}

func testFunctionListEmpty(t *testing.T, s store.Store) {
	page, next, err := s.Functions().List(ctx(t), "", 10)
	must(t, err, "List")
	if len(page) != 0 || next != "" {
		t.Fatalf("List on empty store: %d items, marker %q; want none and \"\"", len(page), next)
	}
}

func testFunctionListPages(t *testing.T, s store.Store) {
	var names []string
	for i := range 11 {
		names = append(names, fmt.Sprintf("fn-%02d", i))
	}
	names = append(names, "A-upper", "z_last", "m-middle")
	// Insert out of order: List must sort, not echo insertion order.
	shuffled := slices.Clone(names)
	rand.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
	for _, n := range shuffled {
		must(t, s.Functions().Create(ctx(t), fullConfig(n)), "Create "+n)
	}
	slices.Sort(names)

	for _, max := range []int{1, 3, 4, len(names), len(names) + 5} {
		var got []string
		marker := ""
		for pages := 0; ; pages++ {
			if pages > len(names)+1 {
				t.Fatalf("max %d: List does not terminate; got %v so far", max, got)
			}
			page, next, err := s.Functions().List(ctx(t), marker, max)
			must(t, err, "List")
			if len(page) > max {
				t.Fatalf("max %d: page of %d items", max, len(page))
			}
			if next != "" && len(page) != max {
				t.Fatalf("max %d: short page of %d items with next marker %q", max, len(page), next)
			}
			for _, c := range page {
				got = append(got, c.Name)
			}
			if next == "" {
				break
			}
			marker = next
		}
		if !slices.Equal(got, names) {
			t.Errorf("max %d: listed %v, want %v (sorted, no gaps, no duplicates)", max, got, names)
		}
	}

	// Every listed config is complete, not just its name.
	page, _, err := s.Functions().List(ctx(t), "", 1)
	must(t, err, "List")
	checkConfig(t, page[0], fullConfig(names[0]))
}

func testFunctionUpdate(t *testing.T, s store.Store) {
	must(t, s.Functions().Create(ctx(t), fullConfig("upd")), "Create")
	next := fullConfig("upd")
	next.RevisionID = "rev-2"
	next.MemorySize = 256
	next.Environment = map[string]string{"B": "2"}
	next.Tags = nil
	next.ReservedConcurrency = nil
	next.LastModified = base.Add(time.Hour + 1)
	next.State = function.StatePending
	must(t, s.Functions().Update(ctx(t), next, "rev-1"), "Update")
	got, err := s.Functions().Get(ctx(t), "upd")
	must(t, err, "Get")
	checkConfig(t, got, next)

	// The new revision is the one to quote next time.
	again := next.Clone()
	again.RevisionID = "rev-3"
	must(t, s.Functions().Update(ctx(t), again, "rev-2"), "second Update")
	got, err = s.Functions().Get(ctx(t), "upd")
	must(t, err, "Get")
	checkConfig(t, got, again)
}

func testFunctionUpdateStale(t *testing.T, s store.Store) {
	orig := fullConfig("stale")
	must(t, s.Functions().Create(ctx(t), orig), "Create")
	next := fullConfig("stale")
	next.RevisionID = "rev-2"
	next.Handler = "changed"
	wantKind(t, s.Functions().Update(ctx(t), next, "rev-0"), errdefs.ErrPreconditionFailed, "Update with stale revision")
	got, err := s.Functions().Get(ctx(t), "stale")
	must(t, err, "Get")
	checkConfig(t, got, orig)
}

func testFunctionUpdateMissing(t *testing.T, s store.Store) {
	wantKind(t, s.Functions().Update(ctx(t), fullConfig("ghost"), "rev-1"), errdefs.ErrNotFound, "Update missing")
	_, err := s.Functions().Get(ctx(t), "ghost")
	wantKind(t, err, errdefs.ErrNotFound, "Get after Update missing")
}

// testFunctionUpdateConcurrent races updaters that all quote the same
// revision: compare-and-swap lets exactly one win.
func testFunctionUpdateConcurrent(t *testing.T, s store.Store) {
	must(t, s.Functions().Create(ctx(t), fullConfig("race")), "Create")
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			cfg := fullConfig("race")
			cfg.RevisionID = fmt.Sprintf("rev-winner-%d", i)
			<-start
			errs[i] = s.Functions().Update(ctx(t), cfg, "rev-1")
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Fatalf("updates %d and %d both succeeded with the same expected revision", winner, i)
			}
			winner = i
		default:
			wantKind(t, err, errdefs.ErrPreconditionFailed, fmt.Sprintf("losing update %d", i))
		}
	}
	if winner < 0 {
		t.Fatalf("no update succeeded: %v", errs)
	}
	got, err := s.Functions().Get(ctx(t), "race")
	must(t, err, "Get")
	if want := fmt.Sprintf("rev-winner-%d", winner); got.RevisionID != want {
		t.Fatalf("stored revision %q, want the winner's %q", got.RevisionID, want)
	}
}

func testFunctionDelete(t *testing.T, s store.Store) {
	must(t, s.Functions().Create(ctx(t), fullConfig("del")), "Create")
	must(t, s.Functions().Create(ctx(t), fullConfig("keep")), "Create")
	must(t, s.Functions().Delete(ctx(t), "del"), "Delete")
	_, err := s.Functions().Get(ctx(t), "del")
	wantKind(t, err, errdefs.ErrNotFound, "Get after Delete")
	wantKind(t, s.Functions().Delete(ctx(t), "del"), errdefs.ErrNotFound, "second Delete")
	if _, err := s.Functions().Get(ctx(t), "keep"); err != nil {
		t.Fatalf("Delete removed another function: %v", err)
	}
	page, _, err := s.Functions().List(ctx(t), "", 10)
	must(t, err, "List")
	if len(page) != 1 || page[0].Name != "keep" {
		t.Fatalf("List after Delete: %d items, want only \"keep\"", len(page))
	}
	// The name is free again.
	must(t, s.Functions().Create(ctx(t), fullConfig("del")), "re-Create after Delete")
}

func testFunctionCodeInUse(t *testing.T, s store.Store) {
	const shared, other = "c2hhcmVkc2hhcmVkc2hhcmVkc2hhcmVkc2hhcmVkMTI=", "b3RoZXJvdGhlcm90aGVyb3RoZXJvdGhlcm90aGVyMTI="
	inUse := func(digest string, want bool) {
		t.Helper()
		got, err := s.Functions().CodeInUse(ctx(t), digest)
		must(t, err, "CodeInUse")
		if got != want {
			t.Fatalf("CodeInUse(%s) = %v, want %v", digest, got, want)
		}
	}
	inUse(shared, false)
	a, b := fullConfig("a"), fullConfig("b")
	a.CodeSha256, b.CodeSha256 = shared, shared
	must(t, s.Functions().Create(ctx(t), a), "Create a")
	must(t, s.Functions().Create(ctx(t), b), "Create b")
	inUse(shared, true)
	inUse(other, false)
	must(t, s.Functions().Delete(ctx(t), "a"), "Delete a")
	inUse(shared, true)
	// Moving b to other code releases the shared digest.
	b2 := b.Clone()
	b2.CodeSha256, b2.RevisionID = other, "rev-2"
	must(t, s.Functions().Update(ctx(t), b2, b.RevisionID), "Update b")
	inUse(shared, false)
	inUse(other, true)
	must(t, s.Functions().Delete(ctx(t), "b"), "Delete b")
	inUse(other, false)
}

// testFunctionCopies checks that neither the caller's value nor a returned
// value is shared with the store.
func testFunctionCopies(t *testing.T, s store.Store) {
	in := fullConfig("copy")
	want := in.Clone()
	must(t, s.Functions().Create(ctx(t), in), "Create")
	in.Environment["A"] = "mutated"
	in.Tags["new"] = "tag"
	in.Architectures[0] = "arm64"
	*in.ReservedConcurrency = 999
	in.Handler = "mutated"

	got, err := s.Functions().Get(ctx(t), "copy")
	must(t, err, "Get")
	checkConfig(t, got, want)
	got.Environment["A"] = "mutated"
	got.Architectures[0] = "arm64"
	*got.ReservedConcurrency = 999
	got.Tags["new"] = "tag"

	again, err := s.Functions().Get(ctx(t), "copy")
	must(t, err, "Get")
	checkConfig(t, again, want)

	page, _, err := s.Functions().List(ctx(t), "", 10)
	must(t, err, "List")
	page[0].Environment["A"] = "mutated"
	again, err = s.Functions().Get(ctx(t), "copy")
	must(t, err, "Get")
	checkConfig(t, again, want)
}

func testFunctionCancelled(t *testing.T, s store.Store) {
	wantKind(t, s.Functions().Create(cancelled(t), fullConfig("never")), context.Canceled, "Create with a cancelled context")
	_, err := s.Functions().Get(ctx(t), "never")
	wantKind(t, err, errdefs.ErrNotFound, "Get after cancelled Create")
	_, err = s.Functions().Get(cancelled(t), "never")
	wantKind(t, err, context.Canceled, "Get with a cancelled context")
}
