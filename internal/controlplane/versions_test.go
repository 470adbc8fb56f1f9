package controlplane

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
)

const arnPrefix = "arn:aws:lambda:us-east-1:000000000000:function:"

// publish publishes name's $LATEST and fails the test on error.
func (e *testEnv) publish(name string, in *PublishInput) *function.Config {
	e.t.Helper()
	v, err := e.svc.PublishVersion(context.Background(), name, in)
	if err != nil {
		e.t.Fatalf("publishing %s: %v", name, err)
	}
	return v
}

func (e *testEnv) updateCode(name, body string) *function.Config {
	e.t.Helper()
	cfg, err := e.svc.UpdateFunctionCode(context.Background(), name, bootstrapZip(e.t, body), "")
	if err != nil {
		e.t.Fatalf("updating the code of %s: %v", name, err)
	}
	return cfg
}

// requestFor returns the request of id that e's default host saw.
func (e *testEnv) requestFor(id string) *harness.InvokeRequest {
	e.t.Helper()
	return requestIn(e.t, e.host, id)
}

func requestIn(t *testing.T, h *fakeHost, id string) *harness.InvokeRequest {
	t.Helper()
	for _, r := range h.requests() {
		if r.RequestID == id {
			return r
		}
	}
	t.Fatalf("the host saw no request %s", id)
	return nil
}

func TestPublishVersionCopiesLatest(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	latest := e.create("f")

	v1 := e.publish("f", nil)
	if v1.Version != "1" || v1.State != function.StateActive || v1.LastUpdateStatus != function.UpdateSuccessful {
		t.Fatalf("first version: Version %q State %s LastUpdateStatus %s", v1.Version, v1.State, v1.LastUpdateStatus)
	}
	if v1.RevisionID == "" || v1.RevisionID == latest.RevisionID {
		t.Fatalf("version revision %q must be its own, not $LATEST's %q", v1.RevisionID, latest.RevisionID)
	}
	if v1.CodeSha256 != latest.CodeSha256 || v1.Handler != latest.Handler || v1.Runtime != latest.Runtime {
		t.Fatalf("version does not copy $LATEST: %+v", v1)
	}
	if v1.SnapStart != (function.SnapStart{ApplyOn: function.SnapStartNone, OptimizationStatus: function.OptimizationOff}) {
		t.Fatalf("version SnapStart = %+v", v1.SnapStart)
	}

	// Unchanged $LATEST: Lambda returns the newest version again.
	again := e.publish("f", nil)
	if again.Version != "1" || again.RevisionID != v1.RevisionID {
		t.Fatalf("publishing an unchanged $LATEST made version %s (%s)", again.Version, again.RevisionID)
	}

	if _, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Description: ptr("second")}, ""); err != nil {
		t.Fatal(err)
	}
	v2 := e.publish("f", &PublishInput{Description: "version two"})
	if v2.Version != "2" || v2.Description != "version two" {
		t.Fatalf("second version: %q %q", v2.Version, v2.Description)
	}

	// Each qualifier reads its own configuration; versions are immutable.
	for q, want := range map[string]string{"": "second", "$LATEST": "second", "1": "", "2": "version two"} {
		got, err := e.svc.GetFunctionVersion(ctx, "f", q)
		if err != nil {
			t.Fatalf("GetFunctionVersion %q: %v", q, err)
		}
		if got.Description != want {
			t.Errorf("qualifier %q: Description %q, want %q", q, got.Description, want)
		}
	}
	for _, q := range []string{"3", "0", "live"} {
		_, err := e.svc.GetFunctionVersion(ctx, "f", q)
		wantKind(t, err, errdefs.ErrNotFound, "Function not found: "+arnPrefix+"f:"+q)
	}
	_, err := e.svc.GetFunctionVersion(ctx, "ghost", "1")
	wantKind(t, err, errdefs.ErrNotFound, "Function not found: "+arnPrefix+"ghost:1")
}

func TestPublishVersionChecks(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	latest := e.create("f")

	_, err := e.svc.PublishVersion(ctx, "f", &PublishInput{RevisionID: "stale"})
	wantKind(t, err, errdefs.ErrPreconditionFailed, "Revision Id")
	_, err = e.svc.PublishVersion(ctx, "f", &PublishInput{CodeSha256: "bm90IHRoZSBjb2Rl"})
	wantKind(t, err, errdefs.ErrInvalidParameter, "is different from current CodeSHA256 in $LATEST ("+latest.CodeSha256+")")
	_, err = e.svc.PublishVersion(ctx, "f", &PublishInput{Description: strings.Repeat("d", 257)})
	wantKind(t, err, errdefs.ErrInvalidParameter, "description")
	_, err = e.svc.PublishVersion(ctx, "ghost", nil)
	wantKind(t, err, errdefs.ErrNotFound, "Function not found: "+arnPrefix+"ghost")

	// The failed attempts used no number.
	v := e.publish("f", &PublishInput{RevisionID: latest.RevisionID, CodeSha256: latest.CodeSha256})
	if v.Version != "1" {
		t.Fatalf("Version = %q, want 1", v.Version)
	}
	// Publishing does not change $LATEST's revision (its instances stay warm).
	cur, err := e.svc.GetFunction(ctx, "f")
	if err != nil || cur.RevisionID != latest.RevisionID {
		t.Fatalf("$LATEST after publish: %v %v", cur, err)
	}
}

func TestInvokeVersionRunsItsOwnConfigAndCode(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	v1 := e.publish("f", nil)
	latest := e.updateCode("f", "second code")
	v2 := e.publish("f", nil)
	if v1.CodeSha256 == v2.CodeSha256 || v2.CodeSha256 != latest.CodeSha256 {
		t.Fatal("test setup: versions 1 and 2 must have different code, 2 the same as $LATEST")
	}

	cases := []struct {
		qualifier, version, revision, code, arn string
	}{
		{"1", "1", v1.RevisionID, v1.CodeSha256, arnPrefix + "f:1"},
		{"2", "2", v2.RevisionID, v2.CodeSha256, arnPrefix + "f:2"},
		{"", "$LATEST", latest.RevisionID, latest.CodeSha256, arnPrefix + "f"},
		{"$LATEST", "$LATEST", latest.RevisionID, latest.CodeSha256, arnPrefix + "f:$LATEST"},
	}
	for _, c := range cases {
		id := "req-" + c.version + "-" + c.qualifier
		_, ran, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: id, Function: "f", Qualifier: c.qualifier, Payload: []byte(`{}`)})
		if err != nil {
			t.Fatalf("qualifier %q: %v", c.qualifier, err)
		}
		if ran.Version != c.version {
			t.Errorf("qualifier %q: ran version %q, want %q", c.qualifier, ran.Version, c.version)
		}
		req := e.requestFor(id)
		if req.Function.Version != c.version || req.Function.RevisionID != c.revision || req.Function.CodeSha256 != c.code || req.ARN != c.arn {
			t.Errorf("qualifier %q: host got version %q revision %q code %q ARN %q; want %q %q %q %q", c.qualifier,
				req.Function.Version, req.Function.RevisionID, req.Function.CodeSha256, req.ARN, c.version, c.revision, c.code, c.arn)
		}
	}
	// Version 2 has $LATEST's code but not its revision: the host pools them apart.
	if v2.RevisionID == latest.RevisionID {
		t.Fatal("version 2 shares $LATEST's revision")
	}

	for _, q := range []string{"3", "live", "01"} {
		_, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Qualifier: q})
		wantKind(t, err, errdefs.ErrNotFound, "Function not found: "+arnPrefix+"f:"+q)
		wantKind(t, e.svc.InvokeAsync(ctx, &InvokeInput{Function: "f", Qualifier: q}), errdefs.ErrNotFound, "")
		_, err = e.svc.CheckInvoke(ctx, "f", q)
		wantKind(t, err, errdefs.ErrNotFound, "")
	}

	// Records name the version that ran.
	waitFor(t, "the version's record", func() bool {
		rec, err := e.svc.GetInvocation(ctx, "req-1-1")
		return err == nil && rec.Version == "1" && rec.RevisionID == v1.RevisionID
	})
}

func TestEventInvokeOfAVersionKeepsItsQualifier(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	v1 := e.publish("f", nil)
	e.updateCode("f", "newer")

	if err := e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "ev-1", Function: "f", Qualifier: "1", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the event to run", func() bool { return e.host.calls("ev-1") > 0 })
	req := e.requestFor("ev-1")
	if req.Function.Version != "1" || req.Function.RevisionID != v1.RevisionID || req.ARN != arnPrefix+"f:1" {
		t.Fatalf("the event ran version %q revision %q ARN %q, want version 1", req.Function.Version, req.Function.RevisionID, req.ARN)
	}
	waitFor(t, "the event's final record", func() bool {
		rec, err := e.svc.GetInvocation(ctx, "ev-1")
		return err == nil && rec.Status == invocation.StatusSucceeded && rec.Version == "1"
	})
}

func TestEventOfADeletedVersionFails(t *testing.T) {
	block := make(chan struct{})
	e := newEnv(t, func(c *Config) { c.AsyncWorkers = 1 })
	ctx := context.Background()
	e.create("f")
	e.publish("f", nil)
	e.updateCode("f", "newer")
	e.publish("f", nil)
	// Hold the only worker so the event is still queued when its version goes.
	e.host.mu.Lock()
	e.host.script = func(ctx context.Context, req *harness.InvokeRequest, n int) (*harness.InvokeResult, error) {
		if req.RequestID == "blocker" {
			<-block
		}
		return okResult(req, req.Payload), nil
	}
	e.host.mu.Unlock()
	if err := e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "blocker", Function: "f", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the blocker to run", func() bool { return e.host.calls("blocker") > 0 })
	if err := e.svc.InvokeAsync(ctx, &InvokeInput{RequestID: "ev-1", Function: "f", Qualifier: "1", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.DeleteFunctionVersion(ctx, "f", "1"); err != nil {
		t.Fatal(err)
	}
	close(block)
	waitFor(t, "the event's failure record", func() bool {
		rec, err := e.svc.GetInvocation(ctx, "ev-1")
		return err == nil && rec.Status == invocation.StatusFailed && rec.ErrorType == "ResourceNotFoundException" && rec.Version == "1"
	})
	if n := e.host.calls("ev-1"); n != 0 {
		t.Fatalf("the deleted version ran %d times", n)
	}
}

func TestVersionsShareTheFunctionsReservedConcurrency(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	e.publish("f", nil)
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: "before", Function: "f", Qualifier: "1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(2)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{RequestID: "after", Function: "f", Qualifier: "1"}); err != nil {
		t.Fatal(err)
	}
	if rc := e.requestFor("before").Function.ReservedConcurrency; rc != nil {
		t.Fatalf("before PutFunctionConcurrency the version carried %d", *rc)
	}
	if rc := e.requestFor("after").Function.ReservedConcurrency; rc == nil || *rc != 2 {
		t.Fatalf("after PutFunctionConcurrency(2) the version carried %v, want 2", rc)
	}
}

func TestListVersionsByFunction(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	e.create("bare")
	for i := 1; i <= 3; i++ {
		e.publish("f", nil)
		e.updateCode("f", "code "+string(rune('a'+i)))
	}

	list := func(name string, max int) (pages [][]string) {
		t.Helper()
		marker := ""
		for range 10 {
			vs, next, err := e.svc.ListVersionsByFunction(ctx, name, marker, max)
			if err != nil {
				t.Fatalf("ListVersionsByFunction(%s, %q, %d): %v", name, marker, max, err)
			}
			var page []string
			for _, v := range vs {
				page = append(page, v.Version)
			}
			pages = append(pages, page)
			if next == "" {
				return pages
			}
			marker = next
		}
		t.Fatalf("ListVersionsByFunction(%s) does not end", name)
		return nil
	}
	flat := func(pages [][]string) []string { return slices.Concat(pages...) }
	want := []string{"$LATEST", "1", "2", "3"}
	if got := list("f", 0); !slices.Equal(flat(got), want) || len(got) != 1 {
		t.Fatalf("default page: %v, want one page %v", got, want)
	}
	for _, max := range []int{1, 2, 3, 4} {
		got := list("f", max)
		if !slices.Equal(flat(got), want) {
			t.Errorf("max %d: %v, want %v", max, got, want)
		}
		for _, p := range got {
			if len(p) > max || len(p) == 0 {
				t.Errorf("max %d: page %v", max, p)
			}
		}
	}
	if got := list("bare", 1); len(got) != 1 || !slices.Equal(got[0], []string{"$LATEST"}) {
		t.Fatalf("function without versions: %v", got)
	}
	_, _, err := e.svc.ListVersionsByFunction(ctx, "ghost", "", 10)
	wantKind(t, err, errdefs.ErrNotFound, "Function not found")
	_, _, err = e.svc.ListVersionsByFunction(ctx, "f", "garbage", 10)
	wantKind(t, err, errdefs.ErrInvalidParameter, "")
}

func TestDeleteFunctionVersion(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	v1 := e.publish("f", nil)
	latest := e.updateCode("f", "second")
	v2 := e.publish("f", nil)

	wantKind(t, e.svc.DeleteFunctionVersion(ctx, "f", "$LATEST"), errdefs.ErrInvalidParameter, "$LATEST version cannot be deleted without deleting the function.")
	wantKind(t, e.svc.DeleteFunctionVersion(ctx, "f", "7"), errdefs.ErrNotFound, "Function not found: "+arnPrefix+"f:7")
	wantKind(t, e.svc.DeleteFunctionVersion(ctx, "f", "live"), errdefs.ErrNotFound, "")

	if !e.hasBlob(v1.CodeSha256) {
		t.Fatal("version 1's code is gone while version 1 exists")
	}
	if err := e.svc.DeleteFunctionVersion(ctx, "f", "1"); err != nil {
		t.Fatal(err)
	}
	if e.hasBlob(v1.CodeSha256) {
		t.Fatal("version 1's code outlived every reference to it")
	}
	_, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Qualifier: "1"})
	wantKind(t, err, errdefs.ErrNotFound, "")
	wantKind(t, e.svc.DeleteFunctionVersion(ctx, "f", "1"), errdefs.ErrNotFound, "")
	// A host that can only keep one revision keeps $LATEST's.
	if got := e.host.retired(); len(got) == 0 || got[len(got)-1] != (retireCall{"f", latest.RevisionID}) {
		t.Fatalf("retire calls %v, want the last to keep $LATEST %s", got, latest.RevisionID)
	}

	// Version 2 shares $LATEST's code: deleting it keeps the blob.
	if err := e.svc.DeleteFunctionVersion(ctx, "f", "2"); err != nil {
		t.Fatal(err)
	}
	if !e.hasBlob(v2.CodeSha256) {
		t.Fatal("deleting version 2 removed the code $LATEST runs")
	}
	// Numbers are never reused.
	e.updateCode("f", "third")
	if v := e.publish("f", nil); v.Version != "3" {
		t.Fatalf("after deleting 1 and 2 the next version is %s, want 3", v.Version)
	}
}

func TestDeleteFunctionDeletesVersionsAndTheirCode(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	e.create("f")
	v1 := e.publish("f", nil)
	e.updateCode("f", "second")
	v2 := e.publish("f", nil)
	latest := e.updateCode("f", "third")
	for _, d := range []string{v1.CodeSha256, v2.CodeSha256, latest.CodeSha256} {
		if !e.hasBlob(d) {
			t.Fatalf("code %s missing before the delete", d)
		}
	}
	if err := e.svc.DeleteFunction(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{v1.CodeSha256, v2.CodeSha256, latest.CodeSha256} {
		if e.hasBlob(d) {
			t.Errorf("code %s outlived the function", d)
		}
	}
	for _, q := range []string{"1", "2"} {
		_, err := e.svc.GetFunctionVersion(ctx, "f", q)
		wantKind(t, err, errdefs.ErrNotFound, "")
	}
	// A new function of that name starts again at version 1.
	e.create("f")
	if v := e.publish("f", nil); v.Version != "1" {
		t.Fatalf("re-created function published version %s, want 1", v.Version)
	}
}

// retiringHost is a fakeHost that can retire single revisions.
type retiringHost struct {
	fakeHost
	retiredRevs [][]string
}

func (h *retiringHost) RetireRevisions(ctx context.Context, fn string, revs []string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.retiredRevs = append(h.retiredRevs, append([]string{fn}, revs...))
	return nil
}

func (h *retiringHost) revisionCalls() [][]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.retiredRevs)
}

func TestUpdatesRetireOnlyTheOldRevisionWhenTheHostCan(t *testing.T) {
	host := &retiringHost{}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	ctx := context.Background()
	created := e.create("f")
	v1 := e.publish("f", nil)
	code := e.updateCode("f", "second")
	conf, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Description: ptr("x")}, "")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.svc.DeleteFunctionVersion(ctx, "f", "1"); err != nil {
		t.Fatal(err)
	}
	want := [][]string{{"f", created.RevisionID}, {"f", code.RevisionID}, {"f", v1.RevisionID}}
	if got := host.revisionCalls(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("RetireRevisions calls %v, want %v (config update to %s)", got, want, conf.RevisionID)
	}
	if got := host.retired(); len(got) != 0 {
		t.Fatalf("Retire (keep one revision) called %v although the host retires single revisions", got)
	}
	// Deleting the function still retires everything.
	if err := e.svc.DeleteFunction(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	if got := host.retired(); len(got) != 1 || got[0] != (retireCall{"f", ""}) {
		t.Fatalf("DeleteFunction retired %v, want all of f", got)
	}
}

func TestSnapStartSetting(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	cfg, err := e.svc.CreateFunction(ctx, &function.Config{Name: "s", Runtime: "provided.al2023",
		SnapStart: function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOn}},
		bootstrapZip(t, "s"))
	if err != nil {
		t.Fatal(err)
	}
	// $LATEST never runs from a snapshot.
	if cfg.SnapStart != (function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOff}) {
		t.Fatalf("created SnapStart = %+v", cfg.SnapStart)
	}
	_, err = e.svc.UpdateFunctionConfiguration(ctx, "s", &ConfigUpdate{SnapStart: ptr(function.SnapStartApplyOn("Sometimes"))}, "")
	wantKind(t, err, errdefs.ErrInvalidParameter, "snapStart.applyOn")
	upd, err := e.svc.UpdateFunctionConfiguration(ctx, "s", &ConfigUpdate{SnapStart: ptr(function.SnapStartNone)}, "")
	if err != nil || upd.SnapStart.ApplyOn != function.SnapStartNone || upd.RevisionID == cfg.RevisionID {
		t.Fatalf("turning SnapStart off: %+v, %v", upd, err)
	}
	_, err = e.svc.CreateFunction(ctx, &function.Config{Name: "bad", Runtime: "provided.al2023",
		SnapStart: function.SnapStart{ApplyOn: "Always"}}, bootstrapZip(t, "bad"))
	wantKind(t, err, errdefs.ErrInvalidParameter, "snapStart.applyOn")

	// Without a host that takes snapshots, a SnapStart version is Active at
	// once and runs without one.
	if _, err := e.svc.UpdateFunctionConfiguration(ctx, "s", &ConfigUpdate{SnapStart: ptr(function.SnapStartPublishedVersions)}, ""); err != nil {
		t.Fatal(err)
	}
	v := e.publish("s", nil)
	if v.State != function.StateActive || v.SnapStart != (function.SnapStart{ApplyOn: function.SnapStartPublishedVersions, OptimizationStatus: function.OptimizationOff}) {
		t.Fatalf("version without snapshot support: State %s SnapStart %+v", v.State, v.SnapStart)
	}
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "s", Qualifier: v.Version}); err != nil {
		t.Fatal(err)
	}
}
