package process

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestLineLogger(t *testing.T) {
	var buf bytes.Buffer
	l := newLineLogger(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	// Lines arrive in arbitrary pieces.
	l.Write([]byte("plain one\npla"))
	l.Write([]byte("in two\n"))
	l.Write([]byte(`{"time":"x","level":"WARN","msg":"agent says","pid":7}` + "\n"))
	l.Write([]byte(strings.Repeat("y", 3*maxLogLine) + "\n"))
	l.Write([]byte("unterminated"))
	l.flush()
	out := buf.String()
	for _, want := range []string{
		`msg="sandbox output" line="plain one"`,
		`line="plain two"`,
		`level=WARN msg="agent says" pid=7`,
		`line=unterminated`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, strings.Repeat("y", maxLogLine+1)) {
		t.Errorf("a line longer than %d bytes was logged whole", maxLogLine)
	}
	if got := l.lastLines(); !strings.HasSuffix(got, "unterminated") {
		t.Errorf("lastLines() = %q, want it to end with the last line", got)
	}
}

func TestLineLoggerBudget(t *testing.T) {
	var buf bytes.Buffer
	l := newLineLogger(slog.New(slog.NewTextHandler(&buf, nil)))
	line := strings.Repeat("z", 1000) + "\n"
	for range 2 * maxLogBudget / 1000 {
		l.Write([]byte(line))
	}
	l.flush()
	if n := buf.Len(); n > maxLogBudget+maxLogBudget/4 {
		t.Errorf("logged %d bytes, budget is %d", n, maxLogBudget)
	}
	if !strings.Contains(buf.String(), "sandbox output dropped over the log budget") {
		t.Errorf("no report of dropped lines")
	}
}
