// Package agentbin finds the agent binary a server runs in its sandboxes.
//
// Every sandbox runs the agent: as the process sandbox's init, or as a
// microVM's /sbin/init. Two binaries can be it. cmd/invokex-agent links only
// the agent and is what a server should use (an idle instance holds a few
// MiB instead of paying for the whole platform's initialisers and pages,
// and a VM reads a third of the bytes at boot). The invokex binary itself
// has the same entry points and is the fallback, so a lone invokex binary
// still works.
package agentbin

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/protocol"
)

// Name is the slim agent's file name, looked for next to the server's
// executable.
const Name = "invokex-agent"

// VersionArg makes the agent print protocol.Version and exit.
const VersionArg = "protocol-version"

// EnvPath names an agent binary explicitly (overrides the search).
const EnvPath = "INVOKEX_AGENT"

// probeTimeout bounds asking a candidate for its protocol version.
const probeTimeout = 5 * time.Second

// Choice is the binary Find picked and why.
type Choice struct {
	// Path is the agent binary (absolute).
	Path string
	// Slim is true for cmd/invokex-agent, false when the server's own
	// executable is used.
	Slim bool
	// Reason says why a slim agent was not used ("" when it was).
	Reason string
}

// Find returns the agent binary for a server whose executable is self:
// $INVOKEX_AGENT if set (an error if it is unusable: an explicit choice is
// never silently replaced), else invokex-agent next to self if it speaks
// this build's protocol, else self.
func Find(ctx context.Context, self string) (Choice, error) {
	if p := os.Getenv(EnvPath); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			return Choice{}, fmt.Errorf("%s: %w", EnvPath, err)
		}
		if err := Check(ctx, abs); err != nil {
			return Choice{}, fmt.Errorf("%s=%s: %w", EnvPath, p, err)
		}
		return Choice{Path: abs, Slim: true}, nil
	}
	slim := filepath.Join(filepath.Dir(self), Name)
	if _, err := os.Stat(slim); err != nil {
		return Choice{Path: self, Reason: "no " + Name + " next to " + self}, nil
	}
	if err := Check(ctx, slim); err != nil {
		return Choice{Path: self, Reason: err.Error()}, nil
	}
	return Choice{Path: slim, Slim: true}, nil
}

// Check runs bin with VersionArg and fails unless it prints this build's
// protocol.Version: a stale agent left from an older build is refused.
func Check(ctx context.Context, bin string) error {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, VersionArg)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	cmd.Env = []string{}
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(errOut.String())
		if msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		return fmt.Errorf("agent %s: asking its protocol version: %v: %w", bin, err, errdefs.ErrInvalidParameter)
	}
	got := strings.TrimSpace(out.String())
	if got != protocol.Version {
		return fmt.Errorf("agent %s speaks %q, this server %q (rebuild it: go build ./cmd/invokex-agent): %w",
			bin, got, protocol.Version, errdefs.ErrInvalidParameter)
	}
	return nil
}
