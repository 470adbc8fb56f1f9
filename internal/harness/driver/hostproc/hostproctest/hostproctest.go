// Package hostproctest has test helpers for the drivers built on package
// hostproc.
package hostproctest

import (
	"log/slog"
	"sync"
	"testing"
)

// Logger returns a debug-level logger that writes to t's log until t
// ends and discards afterwards: a child's last lines may arrive (through
// its driver's waiting goroutine) after the test has returned, and
// logging to a finished test panics.
func Logger(t testing.TB) *slog.Logger {
	w := &tWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.done = true
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p))
	}
	return len(p), nil
}
