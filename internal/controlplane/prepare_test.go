package controlplane

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/harness"
)

// syncBuffer is a bytes.Buffer safe for the logger's concurrent writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestDeploysPrepareTheNewRevision(t *testing.T) {
	host := &preparingHost{}
	e := newEnv(t, func(c *Config) { c.Hosts = []harness.Host{host} })
	ctx := context.Background()

	created := e.create("f")
	if got := host.preparedCalls(); len(got) != 1 || got[0] != (prepareCall{"f", created.RevisionID, created.CodeSha256}) {
		t.Fatalf("after CreateFunction the host prepared %+v, want revision %s", got, created.RevisionID)
	}

	code, err := e.svc.UpdateFunctionCode(ctx, "f", bootstrapZip(t, "v2"), "")
	if err != nil {
		t.Fatal(err)
	}
	conf, err := e.svc.UpdateFunctionConfiguration(ctx, "f", &ConfigUpdate{Description: ptr("d")}, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.PutFunctionConcurrency(ctx, "f", ptr(2)); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"prepare " + created.RevisionID,
		// Prepared before the old revision is retired, so shared code stays.
		"prepare " + code.RevisionID, "retire " + code.RevisionID,
		"prepare " + conf.RevisionID, "retire " + conf.RevisionID,
	}
	if got := host.calls(); !slices.Equal(got, want) {
		t.Fatalf("host calls = %q, want %q", got, want)
	}
	if got := host.preparedCalls(); got[1].code != code.CodeSha256 {
		t.Fatalf("UpdateFunctionCode prepared code %s, want %s", got[1].code, code.CodeSha256)
	}
}

func TestFailedPrepareDoesNotFailTheDeploy(t *testing.T) {
	host := &preparingHost{fail: errors.New("disk full")}
	var logs syncBuffer
	e := newEnv(t, func(c *Config) {
		c.Hosts = []harness.Host{host}
		c.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	ctx := context.Background()
	created := e.create("f")
	if created.State != "Active" {
		t.Fatalf("state = %s, want Active", created.State)
	}
	if _, err := e.svc.UpdateFunctionCode(ctx, "f", bootstrapZip(t, "v2"), ""); err != nil {
		t.Fatalf("UpdateFunctionCode failed with its host's Prepare: %v", err)
	}
	if _, _, err := e.svc.Invoke(ctx, &InvokeInput{Function: "f", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), "preparing revision"); n != 2 {
		t.Fatalf("logged %d Prepare failures, want 2:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "disk full") {
		t.Fatalf("the log does not say why Prepare failed:\n%s", logs.String())
	}
}
