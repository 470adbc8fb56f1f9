package vmm

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestConsoleLog checks the driver's policy for a VM's output (the
// mechanics are package hostproc's): kernel lines at debug, and a guest
// that cannot raise alarms above info through the console, nor its
// VMM through its stderr above warn.
func TestConsoleLog(t *testing.T) {
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	console := newConsoleLog(log)
	console.Write([]byte("[    0.1] booting\n"))
	console.Write([]byte(`{"level":"ERROR","msg":"guest alarm","k":"v"}` + "\n"))
	console.Flush()
	q := NewVMMLog(log, slog.LevelInfo)
	q.Write([]byte("qemu: warning: something\n"))
	q.Write([]byte(`{"level":"ERROR","msg":"qemu alarm"}` + "\n"))
	q.Flush()
	s := out.String()
	for _, want := range []string{
		`level=DEBUG msg="vm output" line="[    0.1] booting"`,
		`level=INFO msg="guest alarm" k=v`,
		`level=INFO msg="vm output" line="qemu: warning: something"`,
		`level=WARN msg="qemu alarm"`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("log lacks %q:\n%s", want, s)
		}
	}
}

func TestConsoleLogBudget(t *testing.T) {
	var out bytes.Buffer
	l := newConsoleLog(slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug})))
	line := strings.Repeat("x", 1000) + "\n"
	for range 4 * maxLogBudget / len(line) {
		l.Write([]byte(line))
	}
	l.Flush()
	if out.Len() > maxLogBudget+64<<10 {
		t.Errorf("logged %d bytes, budget %d", out.Len(), maxLogBudget)
	}
	if !strings.Contains(out.String(), "vm output dropped over the log budget") {
		t.Errorf("no note of the dropped output")
	}
	if n := strings.Count(l.LastLines(), "; ") + 1; n != tailLines {
		t.Errorf("LastLines has %d lines, want %d", n, tailLines)
	}
}
