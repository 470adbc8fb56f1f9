package agentbin

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/protocol"
)

// script writes an executable that prints out (a stand-in agent).
func script(t *testing.T, path, out string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("#!/bin/sh\necho '"+out+"'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
}

func TestFind(t *testing.T) {
	ctx := context.Background()
	t.Setenv(EnvPath, "")
	dir := t.TempDir()
	self := filepath.Join(dir, "invokex")
	script(t, self, protocol.Version)

	c, err := Find(ctx, self)
	if err != nil || c.Path != self || c.Slim || !strings.Contains(c.Reason, "no "+Name) {
		t.Fatalf("without a slim agent: %+v, %v", c, err)
	}

	slim := filepath.Join(dir, Name)
	script(t, slim, "invokex-protocol/0")
	c, err = Find(ctx, self)
	if err != nil || c.Path != self || c.Slim || !strings.Contains(c.Reason, "invokex-protocol/0") {
		t.Fatalf("with a stale slim agent: %+v, %v", c, err)
	}

	script(t, slim, protocol.Version)
	c, err = Find(ctx, self)
	if err != nil || c.Path != slim || !c.Slim || c.Reason != "" {
		t.Fatalf("with a current slim agent: %+v, %v", c, err)
	}
}

func TestFindExplicit(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	self := filepath.Join(dir, "invokex")
	script(t, self, protocol.Version)
	other := filepath.Join(dir, "elsewhere")
	script(t, other, protocol.Version)

	t.Setenv(EnvPath, other)
	c, err := Find(ctx, self)
	if err != nil || c.Path != other || !c.Slim {
		t.Fatalf("explicit agent: %+v, %v", c, err)
	}

	// An explicit choice that does not work is an error, never replaced.
	script(t, other, "something else")
	if _, err := Find(ctx, self); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("explicit stale agent: err = %v", err)
	}
	t.Setenv(EnvPath, filepath.Join(dir, "missing"))
	if _, err := Find(ctx, self); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("explicit missing agent: err = %v", err)
	}
}
