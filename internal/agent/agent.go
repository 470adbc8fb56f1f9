// Package agent runs inside every sandbox: it serves the Lambda Runtime API
// to the function's runtime and speaks package protocol to the harness.
package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
)

// Options configures Run.
type Options struct {
	// RuntimeAPIAddr is where the Runtime API listens; default 127.0.0.1:9001.
	// Port 0 picks a free port.
	RuntimeAPIAddr string
	// Logger receives the agent's own diagnostics (not function output).
	Logger *slog.Logger
}

// Run serves the harness on conn until Shutdown, until conn closes, or until ctx is done.
func Run(ctx context.Context, conn io.ReadWriteCloser, opts Options) error {
	return errors.New("agent: not implemented yet")
}
