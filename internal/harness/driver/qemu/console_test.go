package qemu

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestLineLog(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	l := newLineLog(log, slog.LevelDebug, slog.LevelInfo)
	l.Write([]byte("[    0.1] booting\npart"))
	l.Write([]byte("ial line\n"))
	l.Write([]byte(`{"level":"ERROR","msg":"guest alarm","k":"v"}` + "\n"))
	l.Write([]byte("unterminated"))
	l.flush()
	s := out.String()
	for _, want := range []string{
		`level=DEBUG msg="vm output" line="[    0.1] booting"`,
		`line="partial line"`,
		// The guest's record keeps its attributes but not its ERROR level.
		`level=INFO msg="guest alarm" k=v`,
		`line=unterminated`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("log lacks %q:\n%s", want, s)
		}
	}
	if got := l.lastLines(); !strings.HasSuffix(got, "unterminated") || !strings.HasPrefix(got, "[    0.1] booting; partial line") {
		t.Errorf("lastLines = %q", got)
	}
}

func TestLineLogBudget(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	l := newLineLog(log, slog.LevelDebug, slog.LevelInfo)
	line := strings.Repeat("x", 1000) + "\n"
	for range 4 * maxLogBudget / len(line) {
		l.Write([]byte(line))
	}
	// One overlong line without a newline is capped too.
	l.Write(bytes.Repeat([]byte("y"), 10*maxLogLine))
	l.flush()
	if out.Len() > maxLogBudget+64<<10 {
		t.Errorf("logged %d bytes, budget %d", out.Len(), maxLogBudget)
	}
	if !strings.Contains(out.String(), "vm output dropped over the log budget") {
		t.Errorf("no note of the dropped output")
	}
	if n := len(l.lastLines()); n > tailLines*(maxLogLine+2) {
		t.Errorf("tail of %d bytes", n)
	}
}
