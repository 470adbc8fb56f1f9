package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
)

// Bounds of what one VM may put into the harness's log (its serial
// console and QEMU's stderr): a misbehaving guest must not flood the
// host's log or disk. Nothing of the console is written to a file.
const (
	maxLogLine   = 4 << 10
	maxLogBudget = 256 << 10
	tailLines    = 12
)

// lineLog splits a stream (the guest console, QEMU's stderr) into lines,
// logs each through slog until a byte budget is spent, and keeps the last
// lines for error messages. Lines that are slog JSON records (the guest's
// init logs that way) are re-logged with their own level and attributes,
// but never above level max: the guest is not trusted to raise alarms.
type lineLog struct {
	log   *slog.Logger
	level slog.Level // for plain lines
	max   slog.Level

	mu      sync.Mutex
	partial []byte
	budget  int
	dropped int
	tail    []string
}

func newLineLog(log *slog.Logger, level, max slog.Level) *lineLog {
	return &lineLog{log: log, level: level, max: max, budget: maxLogBudget}
}

func (l *lineLog) Write(p []byte) (int, error) {
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
func (l *lineLog) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.partial) > 0 {
		l.emit(l.partial)
		l.partial = nil
	}
	if l.dropped > 0 {
		l.log.Warn("vm output dropped over the log budget", "lines", l.dropped)
		l.dropped = 0
	}
}

// lastLines returns the last lines, for error messages.
func (l *lineLog) lastLines() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	tail := l.tail
	if len(l.partial) > 0 {
		tail = append(tail[:len(tail):len(tail)], strings.TrimSpace(string(l.partial)))
	}
	return strings.Join(tail, "; ")
}

func (l *lineLog) emit(line []byte) {
	if len(line) > maxLogLine {
		line = line[:maxLogLine]
	}
	s := strings.TrimSpace(strings.ToValidUTF8(string(line), "?"))
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
	if !strings.HasPrefix(s, "{") || json.Unmarshal([]byte(s), &rec) != nil {
		l.log.Log(context.Background(), l.level, "vm output", "line", s)
		return
	}
	msg, _ := rec["msg"].(string)
	level := l.level
	if lv, ok := rec["level"].(string); ok {
		var parsed slog.Level
		if parsed.UnmarshalText([]byte(lv)) == nil {
			level = parsed
		}
	}
	level = min(level, l.max)
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
