package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
)

var versionTests = []test{
	{"PublishGetRoundTrip", testVersionRoundTrip},
	{"PublishUnchangedReturnsNewest", testVersionUnchanged},
	{"PublishPreconditionFailed", testVersionStale},
	{"PublishMissingFunction", testVersionMissingFunction},
	{"NumbersNeverReused", testVersionNumbersNeverReused},
	{"GetMissing", testVersionGetMissing},
	{"ListPages", testVersionListPages},
	{"DeleteCascadesWithFunction", testVersionCascade},
	{"Delete", testVersionDelete},
	{"SetState", testVersionSetState},
	{"ListPending", testVersionListPending},
	{"CodeInUse", testVersionCodeInUse},
	{"ConcurrentPublishes", testVersionConcurrent},
	{"ConcurrentPublishesOfOneRevision", testVersionConcurrentSame},
	{"Copies", testVersionCopies},
	{"CancelledContext", testVersionCancelled},
}

// versionOf returns what a control plane publishes from latest: a copy with
// its own revision. Its Version is left as $LATEST to show Publish assigns it.
func versionOf(latest *function.Config, rev string) *function.Config {
	v := latest.Clone()
	v.RevisionID = rev
	v.State = function.StatePending
	v.StateReasonCode = "Creating"
	v.SnapStart.OptimizationStatus = function.OptimizationOff
	return v
}

// publish publishes a version of latest (whose revision must be current)
// and checks that one was created with the wanted number.
func publish(t *testing.T, s store.Store, latest *function.Config, rev, wantVersion string) *function.Config {
	t.Helper()
	v, created, err := s.Versions().Publish(ctx(t), versionOf(latest, rev), latest.RevisionID)
	must(t, err, "Publish "+rev)
	if !created {
		t.Fatalf("Publish %s: created = false, want a new version", rev)
	}
	if v.Version != wantVersion {
		t.Fatalf("Publish %s: Version %q, want %q", rev, v.Version, wantVersion)
	}
	return v
}

// bumpLatest stores a new $LATEST revision of cfg and returns it.
func bumpLatest(t *testing.T, s store.Store, cfg *function.Config, rev string) *function.Config {
	t.Helper()
	next := cfg.Clone()
	next.RevisionID = rev
	next.Description = "at " + rev
	must(t, s.Functions().Update(ctx(t), next, cfg.RevisionID), "Update to "+rev)
	return next
}

func versionNames(vs []*function.Config) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.Name+":"+v.Version)
	}
	return out
}

func testVersionRoundTrip(t *testing.T, s store.Store) {
	latest := fullConfig("pub")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	v := publish(t, s, latest, "v-rev-1", "1")
	want := versionOf(latest, "v-rev-1")
	want.Version = "1"
	checkConfig(t, v, want)
	got, err := s.Versions().Get(ctx(t), "pub", "1")
	must(t, err, "Get")
	checkConfig(t, got, want)

	// Publishing does not touch $LATEST.
	cur, err := s.Functions().Get(ctx(t), "pub")
	must(t, err, "Get $LATEST")
	checkConfig(t, cur, latest)
}

func testVersionUnchanged(t *testing.T, s store.Store) {
	latest := fullConfig("same")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	first := publish(t, s, latest, "v-rev-1", "1")
	again, created, err := s.Versions().Publish(ctx(t), versionOf(latest, "v-rev-other"), latest.RevisionID)
	must(t, err, "second Publish")
	if created {
		t.Fatal("second Publish of an unchanged $LATEST created a version")
	}
	checkConfig(t, again, first)

	// A change of $LATEST makes the next Publish a new version.
	latest = bumpLatest(t, s, latest, "rev-2")
	publish(t, s, latest, "v-rev-2", "2")
	page, _, err := s.Versions().List(ctx(t), "same", "", 10)
	must(t, err, "List")
	if got := versionNames(page); !slices.Equal(got, []string{"same:1", "same:2"}) {
		t.Fatalf("List = %v, want same:1, same:2", got)
	}
}

func testVersionStale(t *testing.T, s store.Store) {
	latest := fullConfig("stale-pub")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	_, _, err := s.Versions().Publish(ctx(t), versionOf(latest, "v-rev"), "rev-old")
	wantKind(t, err, errdefs.ErrPreconditionFailed, "Publish from a stale revision")
	page, _, err := s.Versions().List(ctx(t), "stale-pub", "", 10)
	must(t, err, "List")
	if len(page) != 0 {
		t.Fatalf("failed Publish stored %v", versionNames(page))
	}
	// The failed attempt used no number.
	publish(t, s, latest, "v-rev", "1")
}

func testVersionMissingFunction(t *testing.T, s store.Store) {
	_, _, err := s.Versions().Publish(ctx(t), versionOf(fullConfig("ghost"), "v"), "rev-1")
	wantKind(t, err, errdefs.ErrNotFound, "Publish of a missing function")
}

func testVersionNumbersNeverReused(t *testing.T, s store.Store) {
	latest := fullConfig("reuse")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	publish(t, s, latest, "v1", "1")
	latest = bumpLatest(t, s, latest, "rev-2")
	publish(t, s, latest, "v2", "2")
	must(t, s.Versions().Delete(ctx(t), "reuse", "2"), "Delete 2")
	// $LATEST is still the revision version 2 came from, but version 2 is
	// gone: this is a new version, and 2 is not handed out again.
	publish(t, s, latest, "v3", "3")
	must(t, s.Versions().Delete(ctx(t), "reuse", "3"), "Delete 3")
	must(t, s.Versions().Delete(ctx(t), "reuse", "1"), "Delete 1")
	latest = bumpLatest(t, s, latest, "rev-3")
	publish(t, s, latest, "v4", "4")

	// Updating $LATEST never resets the counter.
	latest = bumpLatest(t, s, latest, "rev-4")
	publish(t, s, latest, "v5", "5")
}

func testVersionGetMissing(t *testing.T, s store.Store) {
	latest := fullConfig("getm")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	publish(t, s, latest, "v1", "1")
	for _, q := range []string{"2", "0", "01", "$LATEST", "live", ""} {
		_, err := s.Versions().Get(ctx(t), "getm", q)
		wantKind(t, err, errdefs.ErrNotFound, "Get version "+strconv.Quote(q))
	}
	_, err := s.Versions().Get(ctx(t), "other", "1")
	wantKind(t, err, errdefs.ErrNotFound, "Get version of another function")
}

func testVersionListPages(t *testing.T, s store.Store) {
	latest := fullConfig("pages")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	other := fullConfig("pages-other")
	must(t, s.Functions().Create(ctx(t), other), "Create other")
	publish(t, s, other, "o1", "1")
	var want []string
	// Eleven versions: numbers past 9 check the order is numeric, not textual.
	for i := 1; i <= 11; i++ {
		publish(t, s, latest, fmt.Sprintf("v%d", i), strconv.Itoa(i))
		want = append(want, "pages:"+strconv.Itoa(i))
		latest = bumpLatest(t, s, latest, fmt.Sprintf("rev-%d", i+1))
	}
	for _, max := range []int{1, 3, 4, 11, 20} {
		var got []string
		marker := ""
		for pages := 0; ; pages++ {
			if pages > len(want)+1 {
				t.Fatalf("max %d: List does not terminate; got %v so far", max, got)
			}
			page, next, err := s.Versions().List(ctx(t), "pages", marker, max)
			must(t, err, "List")
			if len(page) > max || (next != "" && len(page) != max) {
				t.Fatalf("max %d: page of %d items with next marker %q", max, len(page), next)
			}
			got = append(got, versionNames(page)...)
			if next == "" {
				break
			}
			marker = next
		}
		if !slices.Equal(got, want) {
			t.Errorf("max %d: listed %v, want %v", max, got, want)
		}
	}
	_, _, err := s.Versions().List(ctx(t), "pages", "not-a-marker", 5)
	wantKind(t, err, errdefs.ErrInvalidParameter, "List with a foreign marker")
	_, _, err = s.Versions().List(ctx(t), "pages", "", 0)
	wantKind(t, err, errdefs.ErrInvalidParameter, "List with max 0")
	page, next, err := s.Versions().List(ctx(t), "nobody", "", 5)
	must(t, err, "List of a missing function")
	if len(page) != 0 || next != "" {
		t.Fatalf("List of a missing function: %v, %q", versionNames(page), next)
	}
}

func testVersionCascade(t *testing.T, s store.Store) {
	latest := fullConfig("casc")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	keep := fullConfig("casc-keep")
	must(t, s.Functions().Create(ctx(t), keep), "Create keep")
	publish(t, s, latest, "v1", "1")
	latest = bumpLatest(t, s, latest, "rev-2")
	publish(t, s, latest, "v2", "2")
	publish(t, s, keep, "k1", "1")

	must(t, s.Functions().Delete(ctx(t), "casc"), "Delete function")
	for _, q := range []string{"1", "2"} {
		_, err := s.Versions().Get(ctx(t), "casc", q)
		wantKind(t, err, errdefs.ErrNotFound, "Get version "+q+" after deleting the function")
	}
	page, _, err := s.Versions().List(ctx(t), "casc", "", 10)
	must(t, err, "List")
	if len(page) != 0 {
		t.Fatalf("versions survived their function: %v", versionNames(page))
	}
	if _, err := s.Versions().Get(ctx(t), "casc-keep", "1"); err != nil {
		t.Fatalf("deleting a function removed another's version: %v", err)
	}
	// A function created again under the name starts over at 1.
	again := fullConfig("casc")
	must(t, s.Functions().Create(ctx(t), again), "re-Create")
	publish(t, s, again, "v1-again", "1")
}

func testVersionDelete(t *testing.T, s store.Store) {
	latest := fullConfig("vdel")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	publish(t, s, latest, "v1", "1")
	latest = bumpLatest(t, s, latest, "rev-2")
	publish(t, s, latest, "v2", "2")
	must(t, s.Versions().Delete(ctx(t), "vdel", "1"), "Delete 1")
	_, err := s.Versions().Get(ctx(t), "vdel", "1")
	wantKind(t, err, errdefs.ErrNotFound, "Get after Delete")
	wantKind(t, s.Versions().Delete(ctx(t), "vdel", "1"), errdefs.ErrNotFound, "second Delete")
	wantKind(t, s.Versions().Delete(ctx(t), "vdel", "$LATEST"), errdefs.ErrNotFound, "Delete $LATEST")
	if _, err := s.Versions().Get(ctx(t), "vdel", "2"); err != nil {
		t.Fatalf("Delete removed another version: %v", err)
	}
	if _, err := s.Functions().Get(ctx(t), "vdel"); err != nil {
		t.Fatalf("deleting a version removed the function: %v", err)
	}
}

func testVersionSetState(t *testing.T, s store.Store) {
	latest := fullConfig("state")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	v := publish(t, s, latest, "v1", "1")

	active := v.Clone()
	active.State, active.StateReason, active.StateReasonCode = function.StateActive, "", ""
	active.SnapStart.OptimizationStatus = function.OptimizationOn
	// Fields other than the state are immutable: SetState ignores them.
	changed := active.Clone()
	changed.Handler, changed.RevisionID = "ignored", "ignored"
	must(t, s.Versions().SetState(ctx(t), changed, function.StatePending), "SetState Pending->Active")
	got, err := s.Versions().Get(ctx(t), "state", "1")
	must(t, err, "Get")
	checkConfig(t, got, active)

	failed := v.Clone()
	failed.State, failed.StateReason, failed.StateReasonCode = function.StateFailed, "boom", "InternalError"
	wantKind(t, s.Versions().SetState(ctx(t), failed, function.StatePending), errdefs.ErrPreconditionFailed, "SetState from a state it is not in")
	got, err = s.Versions().Get(ctx(t), "state", "1")
	must(t, err, "Get")
	checkConfig(t, got, active)

	gone := v.Clone()
	gone.Version = "9"
	wantKind(t, s.Versions().SetState(ctx(t), gone, function.StatePending), errdefs.ErrNotFound, "SetState of a missing version")
}

func testVersionListPending(t *testing.T, s store.Store) {
	b := fullConfig("b-fn")
	a := fullConfig("a-fn")
	must(t, s.Functions().Create(ctx(t), b), "Create b")
	must(t, s.Functions().Create(ctx(t), a), "Create a")
	publish(t, s, b, "b1", "1")
	b = bumpLatest(t, s, b, "rev-b2")
	b2 := publish(t, s, b, "b2", "2")
	publish(t, s, a, "a1", "1")
	a = bumpLatest(t, s, a, "rev-a2")
	publish(t, s, a, "a2", "2")
	a = bumpLatest(t, s, a, "rev-a3")
	publish(t, s, a, "a3", "3")

	b2.State = function.StateActive
	must(t, s.Versions().SetState(ctx(t), b2, function.StatePending), "SetState b:2")
	got, err := s.Versions().ListPending(ctx(t))
	must(t, err, "ListPending")
	if names := versionNames(got); !slices.Equal(names, []string{"a-fn:1", "a-fn:2", "a-fn:3", "b-fn:1"}) {
		t.Fatalf("ListPending = %v, want a-fn:1, a-fn:2, a-fn:3, b-fn:1", names)
	}
	if got[0].RevisionID != "a1" || got[0].State != function.StatePending {
		t.Fatalf("ListPending returned an incomplete version: %+v", got[0])
	}
}

func testVersionCodeInUse(t *testing.T, s store.Store) {
	const old, cur = "b2xkb2xkb2xkb2xkb2xkb2xkb2xkb2xkb2xkb2xkMTI=", "Y3VyY3VyY3VyY3VyY3VyY3VyY3VyY3VyY3VyY3VyMTI="
	inUse := func(digest string, want bool) {
		t.Helper()
		got, err := s.Functions().CodeInUse(ctx(t), digest)
		must(t, err, "CodeInUse")
		if got != want {
			t.Fatalf("CodeInUse(%s) = %v, want %v", digest, got, want)
		}
	}
	latest := fullConfig("code")
	latest.CodeSha256 = old
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	publish(t, s, latest, "v1", "1")
	next := latest.Clone()
	next.CodeSha256, next.RevisionID = cur, "rev-2"
	must(t, s.Functions().Update(ctx(t), next, latest.RevisionID), "Update code")
	inUse(old, true) // version 1 still runs it
	inUse(cur, true)
	must(t, s.Versions().Delete(ctx(t), "code", "1"), "Delete version")
	inUse(old, false)

	publish(t, s, next, "v2", "2")
	must(t, s.Functions().Delete(ctx(t), "code"), "Delete function")
	inUse(cur, false)
}

// testVersionConcurrent races writers that each update $LATEST and publish
// it: every publish that succeeds gets its own number, and the numbers
// have no gaps (no failed attempt consumed one).
func testVersionConcurrent(t *testing.T, s store.Store) {
	must(t, s.Functions().Create(ctx(t), fullConfig("conc")), "Create")
	const writers, each = 4, 3
	var (
		mu  sync.Mutex
		got []string
		wg  sync.WaitGroup
	)
	start := make(chan struct{})
	for w := range writers {
		wg.Go(func() {
			<-start
			for k := 0; k < each; {
				cur, err := s.Functions().Get(ctx(t), "conc")
				if err != nil {
					t.Errorf("Get: %v", err)
					return
				}
				rev := fmt.Sprintf("rev-%d-%d", w, k)
				next := cur.Clone()
				next.RevisionID = rev
				err = s.Functions().Update(ctx(t), next, cur.RevisionID)
				if errors.Is(err, errdefs.ErrPreconditionFailed) {
					continue // another writer moved $LATEST on: try again
				}
				if err != nil {
					t.Errorf("Update: %v", err)
					return
				}
				v, created, err := s.Versions().Publish(ctx(t), versionOf(next, "v-"+rev), rev)
				if errors.Is(err, errdefs.ErrPreconditionFailed) {
					continue // $LATEST moved on before the publish: try again
				}
				if err != nil {
					t.Errorf("Publish: %v", err)
					return
				}
				if !created {
					t.Errorf("Publish from a fresh revision %s returned existing version %s", rev, v.Version)
					return
				}
				mu.Lock()
				got = append(got, v.Version)
				mu.Unlock()
				k++
			}
		})
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		return
	}
	var want []string
	for i := 1; i <= writers*each; i++ {
		want = append(want, strconv.Itoa(i))
	}
	slices.SortFunc(got, func(a, b string) int {
		x, _ := strconv.Atoi(a)
		y, _ := strconv.Atoi(b)
		return x - y
	})
	if !slices.Equal(got, want) {
		t.Fatalf("concurrent publishes got numbers %v, want each of 1..%d once", got, writers*each)
	}
}

// testVersionConcurrentSame races publishes of one unchanged $LATEST: one
// creates the version and every other gets that same version.
func testVersionConcurrentSame(t *testing.T, s store.Store) {
	latest := fullConfig("same-conc")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	const n = 8
	type result struct {
		v       *function.Config
		created bool
		err     error
	}
	res := make([]result, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			v, created, err := s.Versions().Publish(ctx(t), versionOf(latest, fmt.Sprintf("v-%d", i)), latest.RevisionID)
			res[i] = result{v, created, err}
		})
	}
	close(start)
	wg.Wait()
	creators := 0
	for i, r := range res {
		must(t, r.err, fmt.Sprintf("Publish %d", i))
		if r.created {
			creators++
		}
		if r.v.Version != "1" {
			t.Errorf("Publish %d returned version %s, want 1", i, r.v.Version)
		}
	}
	if creators != 1 {
		t.Fatalf("%d publishes created a version, want exactly 1", creators)
	}
}

func testVersionCopies(t *testing.T, s store.Store) {
	latest := fullConfig("vcopy")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	in := versionOf(latest, "v1")
	v, _, err := s.Versions().Publish(ctx(t), in, latest.RevisionID)
	must(t, err, "Publish")
	want := v.Clone()
	in.Environment["A"] = "mutated"
	in.Handler = "mutated"
	v.Environment["A"] = "mutated"
	v.Architectures[0] = "arm64"
	got, err := s.Versions().Get(ctx(t), "vcopy", "1")
	must(t, err, "Get")
	checkConfig(t, got, want)
	got.Tags["new"] = "tag"
	page, _, err := s.Versions().List(ctx(t), "vcopy", "", 10)
	must(t, err, "List")
	checkConfig(t, page[0], want)
}

func testVersionCancelled(t *testing.T, s store.Store) {
	latest := fullConfig("vcancel")
	must(t, s.Functions().Create(ctx(t), latest), "Create")
	_, _, err := s.Versions().Publish(cancelled(t), versionOf(latest, "v1"), latest.RevisionID)
	wantKind(t, err, context.Canceled, "Publish with a cancelled context")
	page, _, err := s.Versions().List(ctx(t), "vcancel", "", 10)
	must(t, err, "List")
	if len(page) != 0 {
		t.Fatalf("cancelled Publish stored %v", versionNames(page))
	}
	publish(t, s, latest, "v1", "1")
}
