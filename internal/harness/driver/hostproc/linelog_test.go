package hostproc

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func debugLogger(buf *bytes.Buffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func TestLineLog(t *testing.T) {
	var buf bytes.Buffer
	l := NewLineLog(debugLogger(&buf), LineLogOptions{Msg: "child output"})
	// Lines arrive in arbitrary pieces.
	l.Write([]byte("plain one\npla"))
	l.Write([]byte("in two\n"))
	l.Write([]byte(`{"time":"x","level":"WARN","msg":"agent says","pid":7}` + "\n"))
	l.Write([]byte(`{"msg":"no level","k":"v"}` + "\n"))
	l.Write([]byte("bad \xff utf-8\n"))
	l.Write([]byte(strings.Repeat("y", 3*MaxLine) + "\n"))
	l.Write([]byte("\n  \n"))
	l.Write([]byte("unterminated"))
	if got := l.LastLines(); !strings.HasSuffix(got, "; unterminated") {
		t.Errorf("before Flush, LastLines() = %q, want it to end with the unterminated line", got)
	}
	l.Flush()
	out := buf.String()
	for _, want := range []string{
		`level=INFO msg="child output" line="plain one"`,
		`line="plain two"`,
		// A record keeps its level, message and attributes, not its time.
		`level=WARN msg="agent says" pid=7`,
		`level=INFO msg="no level" k=v`,
		`line="bad ? utf-8"`,
		`line=unterminated`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "time=x") {
		t.Errorf("the record's own time was logged:\n%s", out)
	}
	if strings.Contains(out, strings.Repeat("y", MaxLine+1)) {
		t.Errorf("a line longer than %d bytes was logged whole", MaxLine)
	}
	if n := strings.Count(out, "\n"); n != 7 {
		t.Errorf("logged %d lines, want 7 (blank ones skipped):\n%s", n, out)
	}
	got := l.LastLines()
	if !strings.HasPrefix(got, "plain one; plain two; ") || !strings.HasSuffix(got, "; unterminated") {
		t.Errorf("LastLines() = %q", got)
	}
}

func TestLineLogLevels(t *testing.T) {
	var buf bytes.Buffer
	l := NewLineLog(debugLogger(&buf), LineLogOptions{Msg: "vm output", Level: slog.LevelDebug, Max: slog.LevelInfo})
	l.Write([]byte("[    0.1] booting\n"))
	l.Write([]byte(`{"level":"ERROR","msg":"guest alarm","k":"v"}` + "\n"))
	l.Write([]byte(`{"level":"nonsense","msg":"odd level"}` + "\n"))
	l.Flush()
	out := buf.String()
	for _, want := range []string{
		`level=DEBUG msg="vm output" line="[    0.1] booting"`,
		// The child's record keeps its attributes but not its ERROR level.
		`level=INFO msg="guest alarm" k=v`,
		`level=DEBUG msg="odd level"`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestLineLogBudget(t *testing.T) {
	var buf bytes.Buffer
	const budget = 64 << 10
	l := NewLineLog(debugLogger(&buf), LineLogOptions{Msg: "vm output", Budget: budget, Tail: 3})
	line := strings.Repeat("x", 1000) + "\n"
	for range 4 * budget / len(line) {
		l.Write([]byte(line))
	}
	// One overlong line without a newline is capped too.
	l.Write(bytes.Repeat([]byte("y"), 10*MaxLine))
	l.Flush()
	if n := buf.Len(); n > budget+budget/4 {
		t.Errorf("logged %d bytes, budget is %d", n, budget)
	}
	if !strings.Contains(buf.String(), "vm output dropped over the log budget") {
		t.Errorf("no note of the dropped lines")
	}
	// The tail keeps lines over the budget, at most Tail of them.
	got := l.LastLines()
	if n := strings.Count(got, "; ") + 1; n != 3 || !strings.HasSuffix(got, strings.Repeat("y", MaxLine)) {
		t.Errorf("LastLines() has %d lines (want 3) ending %q", n, got[max(len(got)-20, 0):])
	}
}

func TestLineLogDefaults(t *testing.T) {
	var buf bytes.Buffer
	l := NewLineLog(debugLogger(&buf), LineLogOptions{Msg: "sandbox output"})
	line := strings.Repeat("z", 1000) + "\n"
	for range 2 * (1 << 20) / 1000 {
		l.Write([]byte(line))
	}
	l.Flush()
	if n := buf.Len(); n < 1<<20 || n > (1<<20)+(1<<20)/4 {
		t.Errorf("logged %d bytes, want the default budget of 1 MiB", n)
	}
	if n := strings.Count(l.LastLines(), "; ") + 1; n != 8 {
		t.Errorf("LastLines() has %d lines, want the default 8", n)
	}
}
