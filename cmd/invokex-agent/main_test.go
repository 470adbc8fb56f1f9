package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/agentbin"
	"github.com/invokex/invokex/internal/guest"
)

// TestBinary builds the agent as the Makefile does and checks what the
// server checks before using it: it speaks this build's protocol, is
// static (a VM's init), and refuses to run as anything but the agent.
func TestBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "invokex-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	if err := agentbin.Check(context.Background(), bin); err != nil {
		t.Fatal(err)
	}
	if err := guest.CheckStatic(bin); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "run by InvokeX's drivers only") {
		t.Fatalf("run without a role: err=%v out=%s", err, out)
	}
}
