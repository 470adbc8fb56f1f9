package process

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
)

// Bounds of what one sandbox may put into the harness's log: its init and
// agent write diagnostics to stderr, and a misbehaving sandbox must not be
// able to flood the host's log.
const (
	maxLogLine   = 4 << 10
	maxLogBudget = 1 << 20
	tailLines    = 8
)

// lineLogger is the sandbox's stderr: it splits the stream into lines and
// logs each through slog with the instance's key. Lines that are slog JSON
// records (the init and agent log that way) are re-logged at their own
// level with their own attributes. It keeps the last lines for errors.
type lineLogger struct {
	log *slog.Logger

	mu      sync.Mutex
	partial []byte
	budget  int
	dropped int
	tail    []string
}

func newLineLogger(log *slog.Logger) *lineLogger {
	return &lineLogger{log: log, budget: maxLogBudget}
}

func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := maxLogLine - len(l.partial)
			if room > 0 {
				l.partial = append(l.partial, p[:min(room, len(p))]...)
			}
			break
		}
		line := p[:i]
		if len(l.partial) > 0 {
			room := max(maxLogLine-len(l.partial), 0)
			line = append(l.partial, line[:min(room, len(line))]...)
			l.partial = nil
		}
		l.emit(line)
		p = p[i+1:]
	}
	return n, nil
}

// flush logs an unterminated last line and how much was dropped.
func (l *lineLogger) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.partial) > 0 {
		l.emit(l.partial)
		l.partial = nil
	}
	if l.dropped > 0 {
		l.log.Warn("sandbox output dropped over the log budget", "lines", l.dropped)
		l.dropped = 0
	}
}

// lastLines returns the last lines the sandbox wrote, for error messages.
func (l *lineLogger) lastLines() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.tail, "; ")
}

func (l *lineLogger) emit(line []byte) {
	if len(line) > maxLogLine {
		line = line[:maxLogLine]
	}
	s := strings.TrimSpace(string(line))
	if s == "" {
		return
	}
	l.tail = append(l.tail, s)
	if len(l.tail) > tailLines {
		l.tail = l.tail[1:]
	}
	if l.budget < len(s) {
		l.dropped++
		return
	}
	l.budget -= len(s)
	var rec map[string]any
	if json.Unmarshal([]byte(s), &rec) != nil {
		l.log.Info("sandbox output", "line", s)
		return
	}
	msg, _ := rec["msg"].(string)
	var level slog.Level
	if lv, ok := rec["level"].(string); !ok || level.UnmarshalText([]byte(lv)) != nil {
		level = slog.LevelInfo
	}
	keys := make([]string, 0, len(rec))
	for k := range rec {
		if k != "msg" && k != "level" && k != "time" {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	args := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		args = append(args, k, rec[k])
	}
	l.log.Log(context.Background(), level, msg, args...)
}
