package vminit

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/cpuset"
)

// TestMain lets this test binary be the warm-up's runtime, as the agent
// binary is in a spare VM.
func TestMain(m *testing.M) {
	if IsWarmUpRuntime() {
		os.Exit(WarmUpRuntimeMain())
	}
	os.Exit(m.Run())
}

// TestWarmUp runs the warm-up on the host: the agent starts this binary as
// the runtime, which takes and answers every invocation over the Runtime
// API, and the agent has ended it when warmUp returns.
func TestWarmUp(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	before, err := cpuset.Allowed()
	if err != nil {
		t.Fatal(err)
	}
	if err := warmUp(ctx, log); err != nil {
		t.Fatalf("warmUp: %v", err)
	}
	if kids := children(t); len(kids) != 0 {
		t.Errorf("the warm-up left processes: %v", kids)
	}
	// The real agent splits the CPUs the init may use between itself and
	// the runtime: the warm-up must leave them all.
	if after, err := cpuset.Allowed(); err != nil || !slices.Equal(after, before) {
		t.Errorf("the warm-up left this process on CPUs %v (%v), was %v", after, err, before)
	}
}

// TestWarmUpRuntimeFails: a runtime whose Runtime API answers wrongly
// stops with the reason, so a broken warm-up shows in the init's log.
func TestWarmUpRuntimeFails(t *testing.T) {
	for name, h := range map[string]http.HandlerFunc{
		"next refused": func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", http.StatusForbidden) },
		"no request id": func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte("{}"))
		},
		"response refused": func(w http.ResponseWriter, r *http.Request) {
			if strings.HasSuffix(r.URL.Path, "/next") {
				w.Header().Set("Lambda-Runtime-Aws-Request-Id", "r1")
				_, _ = w.Write([]byte("{}"))
				return
			}
			http.Error(w, "too large", http.StatusRequestEntityTooLarge)
		},
	} {
		srv := httptest.NewServer(h)
		err := echoEvents(strings.TrimPrefix(srv.URL, "http://"))
		srv.Close()
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// The agent going away (the end of every warm-up) ends it too.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
	}()
	defer ln.Close()
	if err := echoEvents(ln.Addr().String()); err == nil {
		t.Error("closed connection: no error")
	}
}

// children lists the processes whose parent is this one.
func children(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	self := os.Getpid()
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(self) {
			out = append(out, s[:i+1])
		}
	}
	return out
}
