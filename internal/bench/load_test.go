package bench

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// echoServer answers like the echo function; every n-th request (n > 0)
// fails with fail.
func echoServer(t *testing.T, n int64, fail func(w http.ResponseWriter)) (*httptest.Server, *atomic.Int64) {
	var count atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := count.Add(1)
		body, _ := io.ReadAll(r.Body)
		if n > 0 && i%n == 0 {
			fail(w)
			return
		}
		w.Header().Set("X-Amzn-RequestId", "req-1")
		w.Write([]byte(`{"version":"","event":` + string(body) + `}`))
	}))
	t.Cleanup(srv.Close)
	return srv, &count
}

func TestRunLoadCounts(t *testing.T) {
	srv, count := echoServer(t, 5, func(w http.ResponseWriter) { w.WriteHeader(http.StatusBadRequest) })
	iv := &invoker{http: newHTTPClient(4), url: srv.URL}
	res := runLoad(context.Background(), iv, 4, 100, []byte(`{"k":"marker"}`), []byte(`"k":"marker"`), nil)
	if res.Sent != 100 || count.Load() != 100 {
		t.Fatalf("sent %d, server saw %d, want 100", res.Sent, count.Load())
	}
	if res.Errors != 20 || res.OK != 80 || res.Latency.N != 80 {
		t.Errorf("errors %d ok %d latencies %d, want 20/80/80", res.Errors, res.OK, res.Latency.N)
	}
	if res.ErrorKinds["HTTP 400"] != 20 || res.Died {
		t.Errorf("kinds %v died %v", res.ErrorKinds, res.Died)
	}
	if res.PerSec <= 0 || res.Concurrency != 4 {
		t.Errorf("per sec %v concurrency %d", res.PerSec, res.Concurrency)
	}
}

func TestRunLoadChecksBodyAndFunctionErrors(t *testing.T) {
	srv, _ := echoServer(t, 2, func(w http.ResponseWriter) {
		w.Header().Set("X-Amz-Function-Error", "Unhandled")
		w.Write([]byte(`{"errorMessage":"x"}`))
	})
	iv := &invoker{http: newHTTPClient(1), url: srv.URL}
	res := runLoad(context.Background(), iv, 1, 10, []byte(`{"a":1}`), []byte(`"a":1`), nil)
	if res.OK != 5 || res.ErrorKinds["function error"] != 5 {
		t.Errorf("ok %d kinds %v, want 5 ok and 5 function errors", res.OK, res.ErrorKinds)
	}
	// A body without the expected echo is an error too.
	res = runLoad(context.Background(), iv, 1, 2, []byte(`{"a":1}`), []byte(`"b":2`), nil)
	if res.OK != 0 || res.ErrorKinds["wrong body"] != 1 {
		t.Errorf("ok %d kinds %v, want a wrong body", res.OK, res.ErrorKinds)
	}
}

func TestRunLoadStopsWhenTheTargetDies(t *testing.T) {
	srv, count := echoServer(t, 0, nil)
	srv.Close() // every request now fails to connect
	iv := &invoker{http: newHTTPClient(2), url: srv.URL}
	res := runLoad(context.Background(), iv, 2, 1000, []byte(`{}`), nil, func() bool { return false })
	if !res.Died || res.Sent > 2 || res.OK != 0 {
		t.Errorf("died %v sent %d ok %d: want a stop after the first failures", res.Died, res.Sent, res.OK)
	}
	if res.ErrorKinds["connection refused"] == 0 {
		t.Errorf("kinds %v, want connection refused", res.ErrorKinds)
	}
	_ = count
}

func TestInvokeRecordsHeaders(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Amz-Invocation-Type") != "Event" {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.Header().Set("X-Amzn-RequestId", "abc")
		w.WriteHeader(http.StatusAccepted)
	}))
	defer srv.Close()
	iv := &invoker{http: newHTTPClient(1), url: srv.URL}
	c := iv.invoke(context.Background(), []byte(`{}`), "Event")
	if c.Err != nil || c.Status != http.StatusAccepted || c.RequestID != "abc" {
		t.Errorf("call = %+v", c)
	}
	if c.TTFB <= 0 || c.TTFB > c.Total {
		t.Errorf("TTFB %v not within (0, Total %v]", c.TTFB, c.Total)
	}
}

func TestKindsString(t *testing.T) {
	if got := kindsString(map[string]int{"b": 2, "a": 1}); got != "a x1, b x2" {
		t.Errorf("kindsString = %q", got)
	}
}

func TestZipper(t *testing.T) {
	bin := t.TempDir() + "/bootstrap"
	content := bytes.Repeat([]byte("ELF-ish function "), 1000)
	write(t, bin, string(content))
	z, err := newZipper(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"a", "b"} {
		b, err := z.zip(v)
		if err != nil {
			t.Fatal(err)
		}
		zr, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		files := map[string]*zip.File{}
		for _, f := range zr.File {
			files[f.Name] = f
		}
		bs, ver := files["bootstrap"], files["version"]
		if bs == nil || ver == nil || len(zr.File) != 2 {
			t.Fatalf("zip %s has %d files: %v", v, len(zr.File), files)
		}
		if bs.Mode().Perm() != 0o755 {
			t.Errorf("bootstrap mode %v, want 0755", bs.Mode())
		}
		if got := readZipFile(t, bs); !bytes.Equal(got, content) {
			t.Errorf("bootstrap content differs (%d bytes)", len(got))
		}
		if got := strings.TrimSpace(string(readZipFile(t, ver))); got != v {
			t.Errorf("version = %q, want %q", got, v)
		}
	}
}

func readZipFile(t *testing.T, f *zip.File) []byte {
	t.Helper()
	rc, err := f.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMergeLoads(t *testing.T) {
	a := LoadResult{Concurrency: 2, Sent: 3, OK: 2, Errors: 1, Wall: 2 * time.Second,
		ErrorKinds: map[string]int{"HTTP 400": 1}, FirstErrors: []string{"x"}, lats: durs(1, 9)}
	b := LoadResult{Concurrency: 2, Sent: 2, OK: 2, Wall: 2 * time.Second, Died: true,
		ErrorKinds: map[string]int{}, FirstErrors: []string{"x", "y"}, lats: durs(3, 5)}
	m := mergeLoads(LoadResult{}, a)
	m = mergeLoads(m, b)
	if m.Sent != 5 || m.OK != 4 || m.Errors != 1 || !m.Died || m.Wall != 4*time.Second || m.Concurrency != 2 {
		t.Errorf("merged counts: %+v", m)
	}
	if m.PerSec != 1 {
		t.Errorf("PerSec = %v, want 4 ok / 4 s", m.PerSec)
	}
	if m.Latency.N != 4 || m.Latency.P50 != 3*time.Millisecond || m.Latency.Max != 9*time.Millisecond {
		t.Errorf("merged latency: %+v", m.Latency)
	}
	if m.ErrorKinds["HTTP 400"] != 1 || !reflect.DeepEqual(m.FirstErrors, []string{"x", "y"}) {
		t.Errorf("merged errors: %v %v", m.ErrorKinds, m.FirstErrors)
	}
}
