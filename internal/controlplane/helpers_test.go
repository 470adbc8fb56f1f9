package controlplane

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/controlplane/blob"
	"github.com/invokex/invokex/internal/controlplane/blob/fsblob"
	"github.com/invokex/invokex/internal/controlplane/store"
	"github.com/invokex/invokex/internal/controlplane/store/sqlite"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/runtimes"
)

// testEnv is a started Service over test backends and one fake host.
type testEnv struct {
	t     *testing.T
	svc   *Service
	store store.Store
	blobs blob.Store
	host  *fakeHost
}

// newBackends returns the store and blob store the tests run against: the
// real SQLite store and filesystem blob store in temporary directories.
func newBackends(t *testing.T) (store.Store, blob.Store) {
	t.Helper()
	st, err := sqlite.Open(context.Background(), filepath.Join(t.TempDir(), "invokex.db"))
	if err != nil {
		t.Fatal(err)
	}
	// Registered before newEnv's Close cleanup, so it runs after it.
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("closing store: %v", err)
		}
	})
	bl, err := fsblob.New(filepath.Join(t.TempDir(), "blobs"))
	if err != nil {
		t.Fatal(err)
	}
	return st, bl
}

// testRuntimes is the catalog with provided.al2023 and python3.12
// available and everything else not, whatever this host has.
func testRuntimes(ctx context.Context) []*runtimes.Runtime {
	rts := runtimes.Builtin()
	for _, rt := range rts {
		switch rt.ID {
		case "provided.al2023", "python3.12":
			rt.Available, rt.Reason = true, ""
		default:
			rt.Available, rt.Reason = false, "no interpreter for "+rt.ID+" on this host"
		}
	}
	return rts
}

func newEnv(t *testing.T, mod func(*Config)) *testEnv {
	t.Helper()
	st, bl := newBackends(t)
	host := &fakeHost{}
	cfg := Config{
		Store:             st,
		Blobs:             bl,
		Hosts:             []harness.Host{host},
		Logger:            slog.New(slog.NewTextHandler(io.Discard, nil)),
		AsyncWorkers:      2,
		RetryDelays:       []time.Duration{time.Millisecond, time.Millisecond},
		ThrottleRetryBase: time.Millisecond,
		DetectRuntimes:    testRuntimes,
	}
	if mod != nil {
		mod(&cfg)
	}
	svc, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := svc.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return &testEnv{t: t, svc: svc, store: st, blobs: bl, host: host}
}

type zent struct {
	name string
	mode fs.FileMode
	body string
}

func mkzip(t testing.TB, ents ...zent) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range ents {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, e.body)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// bootstrapZip is a provided-runtime package; body makes packages differ.
func bootstrapZip(t testing.TB, body string) []byte {
	return mkzip(t, zent{name: "bootstrap", mode: 0o755, body: "#!/bin/sh\n# " + body + "\n"})
}

func pythonZip(t testing.TB) []byte {
	return mkzip(t, zent{name: "app.py", body: "def handler(e, c):\n    return e\n"})
}

// create makes a provided.al2023 function named name.
func (e *testEnv) create(name string) *function.Config {
	e.t.Helper()
	cfg, err := e.svc.CreateFunction(context.Background(), &function.Config{Name: name, Runtime: "provided.al2023", Role: "arn:aws:iam::000000000000:role/r"}, bootstrapZip(e.t, name))
	if err != nil {
		e.t.Fatalf("creating %s: %v", name, err)
	}
	return cfg
}

// hasBlob reports whether the blob store holds digest.
func (e *testEnv) hasBlob(digest string) bool {
	e.t.Helper()
	rc, err := e.blobs.Open(context.Background(), digest)
	if errors.Is(err, errdefs.ErrNotFound) {
		return false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	rc.Close()
	return true
}

// waitFor polls cond until it holds; it fails the test after a generous
// bound, which is a guard against hanging, not a timing assertion.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantKind(t *testing.T, err, kind error, msgPart string) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("error = %v, want kind %v", err, kind)
	}
	if msgPart != "" && !strings.Contains(errdefs.Message(err), msgPart) {
		t.Fatalf("message %q does not contain %q", errdefs.Message(err), msgPart)
	}
}

func ptr[T any](v T) *T { return &v }
