package controlplane

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

func TestStartSyncsRuntimes(t *testing.T) {
	e := newEnv(t, nil)
	rts, err := e.svc.ListRuntimes(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := testRuntimes(context.Background())
	if len(rts) != len(want) {
		t.Fatalf("ListRuntimes returned %d rows, want %d", len(rts), len(want))
	}
	avail := map[string]bool{}
	for _, rt := range rts {
		avail[rt.ID] = rt.Available
	}
	if !avail["provided.al2023"] || !avail["python3.12"] || avail["nodejs18.x"] {
		t.Fatalf("availability = %v", avail)
	}
}

func TestNotStarted(t *testing.T) {
	st, bl := newBackends(t)
	svc, err := New(Config{Store: st, Blobs: bl, DetectRuntimes: testRuntimes})
	if err != nil {
		t.Fatal(err)
	}
	_, err = svc.GetFunction(context.Background(), "f")
	wantKind(t, err, errdefs.ErrUnavailable, "not started")
	if _, err := New(Config{Blobs: bl}); err == nil {
		t.Fatal("New without a store succeeded")
	}
}

func TestCreateGetList(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	zip := bootstrapZip(t, "x")
	cfg, err := e.svc.CreateFunction(ctx, &function.Config{
		Name: "hello", Runtime: "provided.al2023", Environment: map[string]string{"A": "1"},
	}, zip)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.State != function.StateActive || cfg.LastUpdateStatus != function.UpdateSuccessful {
		t.Errorf("state %s/%s", cfg.State, cfg.LastUpdateStatus)
	}
	if cfg.Handler != "bootstrap" || cfg.Timeout != 3 || cfg.MemorySize != 128 || cfg.Version != "$LATEST" {
		t.Errorf("defaults not applied: %+v", cfg)
	}
	if cfg.RevisionID == "" || cfg.LastModified.IsZero() {
		t.Errorf("revision %q modified %v", cfg.RevisionID, cfg.LastModified)
	}
	if cfg.CodeSha256 != codeDigest(zip) || cfg.CodeSize != int64(len(zip)) {
		t.Errorf("code %s/%d, want %s/%d", cfg.CodeSha256, cfg.CodeSize, codeDigest(zip), len(zip))
	}
	got, err := e.svc.GetFunction(ctx, "hello")
	if err != nil {
		t.Fatal(err)
	}
	if got.RevisionID != cfg.RevisionID || got.Environment["A"] != "1" {
		t.Errorf("GetFunction = %+v", got)
	}
	code, err := e.svc.FunctionCode(ctx, "hello", "")
	if err != nil || string(code) != string(zip) {
		t.Fatalf("FunctionCode = %d bytes, %v", len(code), err)
	}
	e.create("another")
	fns, next, err := e.svc.ListFunctions(ctx, "", 0)
	if err != nil || len(fns) != 2 || next != "" || fns[0].Name != "another" || fns[1].Name != "hello" {
		t.Fatalf("ListFunctions = %v, %q, %v", fns, next, err)
	}
	fns, next, err = e.svc.ListFunctions(ctx, "", 1)
	if err != nil || len(fns) != 1 || next == "" {
		t.Fatalf("ListFunctions page = %v, %q, %v", fns, next, err)
	}

	_, err = e.svc.GetFunction(ctx, "missing")
	wantKind(t, err, errdefs.ErrNotFound, "Function not found: arn:aws:lambda:us-east-1:000000000000:function:missing")
}

func TestCreatePythonDefaultHandler(t *testing.T) {
	e := newEnv(t, nil)
	zip := mkzip(t, zent{name: "lambda_function.py", body: "def lambda_handler(e, c): pass\n"})
	cfg, err := e.svc.CreateFunction(context.Background(), &function.Config{Name: "py", Runtime: "python3.12"}, zip)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Handler != "lambda_function.lambda_handler" {
		t.Fatalf("Handler = %q", cfg.Handler)
	}
}

func TestCreateRejects(t *testing.T) {
	good := func() *function.Config { return &function.Config{Name: "f", Runtime: "provided.al2023"} }
	with := func(mod func(c *function.Config)) *function.Config { c := good(); mod(c); return c }
	tests := []struct {
		name string
		cfg  *function.Config
		zip  func(t *testing.T) []byte
		kind error
		msg  string
	}{
		{"unknown runtime", with(func(c *function.Config) { c.Runtime = "cobol85" }), nil, errdefs.ErrInvalidParameter,
			"Value 'cobol85' at 'runtime' failed to satisfy constraint: Member must satisfy enum value set: ["},
		{"no runtime", with(func(c *function.Config) { c.Runtime = "" }), nil, errdefs.ErrInvalidParameter, "Runtime and Handler are mandatory"},
		{"unavailable runtime", with(func(c *function.Config) { c.Runtime = "nodejs18.x"; c.Handler = "index.handler" }), nil, errdefs.ErrInvalidParameter,
			"no interpreter for nodejs18.x on this host"},
		{"missing bootstrap", good(), func(t *testing.T) []byte { return mkzip(t, zent{name: "main", mode: 0o755, body: "x"}) },
			errdefs.ErrInvalidParameter, "bootstrap"},
		{"bootstrap not executable", good(), func(t *testing.T) []byte { return mkzip(t, zent{name: "bootstrap", mode: 0o644, body: "x"}) },
			errdefs.ErrInvalidParameter, "not executable"},
		{"missing handler file", &function.Config{Name: "f", Runtime: "python3.12", Handler: "app.handler"},
			func(t *testing.T) []byte { return mkzip(t, zent{name: "other.py", body: "x"}) }, errdefs.ErrInvalidParameter, "app.py"},
		{"not a zip", good(), func(t *testing.T) []byte { return []byte("definitely not a zip") }, errdefs.ErrInvalidParameter,
			"Could not unzip uploaded file"},
		{"reserved env var", with(func(c *function.Config) { c.Environment = map[string]string{"AWS_REGION": "x"} }), nil,
			errdefs.ErrInvalidParameter, "reserved keys"},
		{"timeout too long", with(func(c *function.Config) { c.Timeout = 901 }), nil, errdefs.ErrInvalidParameter, "'timeout'"},
		{"negative timeout", with(func(c *function.Config) { c.Timeout = -1 }), nil, errdefs.ErrInvalidParameter, "'timeout'"},
		{"memory too small", with(func(c *function.Config) { c.MemorySize = 64 }), nil, errdefs.ErrInvalidParameter, "'memorySize'"},
		{"memory too large", with(func(c *function.Config) { c.MemorySize = 20000 }), nil, errdefs.ErrInvalidParameter, "'memorySize'"},
		{"bad name", with(func(c *function.Config) { c.Name = "../etc" }), nil, errdefs.ErrInvalidParameter, "functionName"},
		{"concurrency out of range", with(func(c *function.Config) { c.ReservedConcurrency = ptr(5000) }), nil, errdefs.ErrInvalidParameter,
			"reservedConcurrentExecutions"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, nil)
			zip := bootstrapZip(t, "x")
			if tc.zip != nil {
				zip = tc.zip(t)
			}
			_, err := e.svc.CreateFunction(context.Background(), tc.cfg, zip)
			wantKind(t, err, tc.kind, tc.msg)
			if e.hasBlob(codeDigest(zip)) {
				t.Fatal("a refused package was left in the blob store")
			}
			if _, err := e.store.Functions().Get(context.Background(), tc.cfg.Name); !errors.Is(err, errdefs.ErrNotFound) {
				t.Fatalf("a refused function was stored: %v", err)
			}
		})
	}
}

func TestCreateDuplicate(t *testing.T) {
	e := newEnv(t, nil)
	first := e.create("dup")
	other := bootstrapZip(t, "different code")
	_, err := e.svc.CreateFunction(context.Background(), &function.Config{Name: "dup", Runtime: "provided.al2023"}, other)
	wantKind(t, err, errdefs.ErrAlreadyExists, "Function already exist: dup")
	if e.hasBlob(codeDigest(other)) {
		t.Error("the losing create's blob was not deleted")
	}
	if !e.hasBlob(first.CodeSha256) {
		t.Error("the existing function's blob was deleted")
	}
}

func TestUpdateFunctionCode(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	orig := e.create("f")
	zip2 := bootstrapZip(t, "v2")
	upd, err := e.svc.UpdateFunctionCode(ctx, "f", zip2, orig.RevisionID)
	if err != nil {
		t.Fatal(err)
	}
	if upd.CodeSha256 != codeDigest(zip2) || upd.RevisionID == orig.RevisionID || upd.CodeSize != int64(len(zip2)) {
		t.Fatalf("updated = %+v", upd)
	}
	if e.hasBlob(orig.CodeSha256) {
		t.Error("the old, unreferenced blob was kept")
	}
	if !e.hasBlob(upd.CodeSha256) {
		t.Error("the new blob is missing")
	}
	if r := e.host.retired(); len(r) != 1 || r[0] != (retireCall{"f", upd.RevisionID}) {
		t.Errorf("Retire calls = %v, want [{f %s}]", r, upd.RevisionID)
	}

	_, err = e.svc.UpdateFunctionCode(ctx, "f", bootstrapZip(t, "v3"), orig.RevisionID)
	wantKind(t, err, errdefs.ErrPreconditionFailed, "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id")
	if e.hasBlob(codeDigest(bootstrapZip(t, "v3"))) {
		t.Error("a refused update left its blob")
	}

	_, err = e.svc.UpdateFunctionCode(ctx, "f", mkzip(t, zent{name: "nope", body: "x"}), "")
	wantKind(t, err, errdefs.ErrInvalidParameter, "bootstrap")
	_, err = e.svc.UpdateFunctionCode(ctx, "f", []byte("junk"), "")
	wantKind(t, err, errdefs.ErrInvalidParameter, "Could not unzip")
	_, err = e.svc.UpdateFunctionCode(ctx, "ghost", zip2, "")
	wantKind(t, err, errdefs.ErrNotFound, "Function not found")

	got, _ := e.svc.GetFunction(ctx, "f")
	if got.RevisionID != upd.RevisionID {
		t.Fatalf("a refused update changed the revision")
	}
}

func TestUpdateCodeKeepsSharedBlob(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	zip := bootstrapZip(t, "shared")
	for _, n := range []string{"a", "b"} {
		if _, err := e.svc.CreateFunction(ctx, &function.Config{Name: n, Runtime: "provided.al2023"}, zip); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.svc.UpdateFunctionCode(ctx, "a", bootstrapZip(t, "new"), ""); err != nil {
		t.Fatal(err)
	}
	if !e.hasBlob(codeDigest(zip)) {
		t.Fatal("blob still used by b was deleted")
	}
	if err := e.svc.DeleteFunction(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if e.hasBlob(codeDigest(zip)) {
		t.Fatal("blob no longer used was kept")
	}
}

func TestConcurrentUpdatesSameRevision(t *testing.T) {
	e := newEnv(t, nil)
	orig := e.create("f")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = e.svc.UpdateFunctionCode(context.Background(), "f", bootstrapZip(t, "racer"+string(rune('a'+i))), orig.RevisionID)
		}()
	}
	wg.Wait()
	var failed, ok int
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, errdefs.ErrPreconditionFailed):
			failed++
		default:
			t.Fatalf("unexpected error: %v", err)
		}
	}
	if ok != 1 || failed != 1 {
		t.Fatalf("%d succeeded and %d failed, want exactly one of each", ok, failed)
	}
}

// racingStore makes the first Update lose its compare-and-swap to a
// write by "another process", which changes the description.
type racingStore struct {
	store.Store
	once sync.Once
}

func (r *racingStore) Functions() store.Functions { return &racingFunctions{r.Store.Functions(), r} }

type racingFunctions struct {
	store.Functions
	r *racingStore
}

func (f *racingFunctions) Update(ctx context.Context, cfg *function.Config, expected string) error {
	f.r.once.Do(func() {
		cur, err := f.Functions.Get(ctx, cfg.Name)
		if err != nil {
			panic(err)
		}
		old := cur.RevisionID
		cur.Description, cur.RevisionID = "set by another process", "other-process-revision"
		if err := f.Functions.Update(ctx, cur, old); err != nil {
			panic(err)
		}
	})
	return f.Functions.Update(ctx, cfg, expected)
}

func TestUpdateLostRaceIsRetriedWithoutRevision(t *testing.T) {
	var rs *racingStore
	e := newEnv(t, func(c *Config) { rs = &racingStore{Store: c.Store}; c.Store = rs })
	e.create("f")
	upd, err := e.svc.UpdateFunctionConfiguration(context.Background(), "f", &ConfigUpdate{Timeout: ptr(30)}, "")
	if err != nil {
		t.Fatal(err)
	}
	if upd.Timeout != 30 || upd.Description != "set by another process" {
		t.Fatalf("an update was lost: timeout %d, description %q", upd.Timeout, upd.Description)
	}
}

func TestUpdateLostRaceWithRevisionFails(t *testing.T) {
	var rs *racingStore
	e := newEnv(t, func(c *Config) { rs = &racingStore{Store: c.Store}; c.Store = rs })
	cfg := e.create("f")
	_, err := e.svc.UpdateFunctionConfiguration(context.Background(), "f", &ConfigUpdate{Timeout: ptr(30)}, cfg.RevisionID)
	wantKind(t, err, errdefs.ErrPreconditionFailed, "does not match the latest Revision Id")
	got, _ := e.svc.GetFunction(context.Background(), "f")
	if got.Timeout == 30 {
		t.Fatal("the update was applied over the other process's write")
	}
}

func TestUpdateFunctionConfiguration(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	orig := e.create("f")
	upd, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{
		Timeout: ptr(60), MemorySize: ptr(512), Description: ptr("d"),
		Environment: ptr(map[string]string{"K": "v"}),
	}, orig.RevisionID)
	if err != nil {
		t.Fatal(err)
	}
	if upd.Timeout != 60 || upd.MemorySize != 512 || upd.Description != "d" || upd.Environment["K"] != "v" || upd.RevisionID == orig.RevisionID {
		t.Fatalf("updated = %+v", upd)
	}
	if upd.CodeSha256 != orig.CodeSha256 || !e.hasBlob(orig.CodeSha256) {
		t.Fatal("a configuration update touched the code")
	}
	if r := e.host.retired(); len(r) != 1 || r[0] != (retireCall{"f", upd.RevisionID}) {
		t.Errorf("Retire calls = %v", r)
	}

	bad := []struct {
		name string
		upd  *ConfigUpdate
		msg  string
	}{
		{"reserved env", &ConfigUpdate{Environment: ptr(map[string]string{"AWS_LAMBDA_RUNTIME_API": "x"})}, "reserved keys"},
		{"timeout zero", &ConfigUpdate{Timeout: ptr(0)}, "'timeout'"},
		{"memory zero", &ConfigUpdate{MemorySize: ptr(0)}, "'memorySize'"},
		{"timeout high", &ConfigUpdate{Timeout: ptr(1000)}, "'timeout'"},
		{"memory", &ConfigUpdate{MemorySize: ptr(100)}, "'memorySize'"},
		{"unknown runtime", &ConfigUpdate{Runtime: ptr("java99")}, "enum value set"},
		{"unavailable runtime", &ConfigUpdate{Runtime: ptr("nodejs18.x"), Handler: ptr("index.handler")}, "no interpreter"},
		{"runtime without handler file", &ConfigUpdate{Runtime: ptr("python3.12"), Handler: ptr("app.handler")}, "app.py"},
	}
	for _, b := range bad {
		_, err := e.svc.UpdateFunctionConfiguration(ctx, "f", b.upd, "")
		if !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(errdefs.Message(err), b.msg) {
			t.Errorf("%s: error = %v, want invalid with %q", b.name, err, b.msg)
		}
	}

	// Switching runtime re-checks the stored code: give it python code first.
	if _, err := e.svc.UpdateFunctionCode(ctx, "f", mkzip(t,
		zent{name: "bootstrap", mode: 0o755, body: "x"}, zent{name: "app.py", body: "x"}), ""); err != nil {
		t.Fatal(err)
	}
	py, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Runtime: ptr("python3.12"), Handler: ptr("app.handler")}, "")
	if err != nil {
		t.Fatal(err)
	}
	if py.Runtime != "python3.12" || py.Handler != "app.handler" {
		t.Fatalf("updated = %+v", py)
	}
	_, err = e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Handler: ptr("missing.handler")}, "")
	wantKind(t, err, errdefs.ErrInvalidParameter, "missing.py")
}

func TestDeleteFunction(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	cfg := e.create("f")
	if err := e.svc.DeleteFunction(ctx, "f"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.GetFunction(ctx, "f"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("GetFunction after delete: %v", err)
	}
	if e.hasBlob(cfg.CodeSha256) {
		t.Error("blob of the deleted function was kept")
	}
	if r := e.host.retired(); len(r) != 1 || r[0] != (retireCall{"f", ""}) {
		t.Errorf("Retire calls = %v, want [{f }]", r)
	}
	wantKind(t, e.svc.DeleteFunction(ctx, "f"), errdefs.ErrNotFound, "Function not found")
}

func TestPutFunctionConcurrency(t *testing.T) {
	e := newEnv(t, nil)
	ctx := context.Background()
	orig := e.create("f")
	cfg, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(5))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ReservedConcurrency == nil || *cfg.ReservedConcurrency != 5 || cfg.RevisionID != orig.RevisionID {
		t.Fatalf("after put: %+v", cfg)
	}
	if got, _ := e.svc.GetFunction(ctx, "f"); got.ReservedConcurrency == nil || *got.ReservedConcurrency != 5 {
		t.Fatal("reserved concurrency not stored")
	}
	if _, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(0)); err != nil {
		t.Fatal(err)
	}
	cfg, err = e.svc.PutFunctionConcurrency(ctx, "f", nil)
	if err != nil || cfg.ReservedConcurrency != nil {
		t.Fatalf("removing: %+v %v", cfg, err)
	}
	for _, n := range []int{-1, 1001} {
		_, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(n))
		wantKind(t, err, errdefs.ErrInvalidParameter, "reservedConcurrentExecutions")
	}
	_, err = e.svc.PutFunctionConcurrency(ctx, "ghost", ptr(1))
	wantKind(t, err, errdefs.ErrNotFound, "")
}

func TestStartMarksForgottenRuntimesUnavailable(t *testing.T) {
	st, bl := newBackends(t)
	ctx := context.Background()
	if err := st.Runtimes().Put(ctx, &runtimes.Runtime{ID: "python2.7", Family: runtimes.FamilyPython, Available: true}); err != nil {
		t.Fatal(err)
	}
	svc, err := New(Config{Store: st, Blobs: bl, DetectRuntimes: testRuntimes})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer svc.Close(ctx)
	rt, err := st.Runtimes().Get(ctx, "python2.7")
	if err != nil || rt.Available || rt.Reason == "" {
		t.Fatalf("forgotten runtime = %+v, %v", rt, err)
	}
	wantKind(t, svc.Start(ctx), errdefs.ErrConflict, "already started")
}
