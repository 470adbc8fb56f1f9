package hostproc

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"sort"
	"strings"
	"sync"
)

// MaxLine is the longest line a LineLog logs or keeps; the rest of a
// longer line is dropped.
const MaxLine = 4 << 10

// LineLogOptions configures NewLineLog. The zero value is usable except
// for Msg.
type LineLogOptions struct {
	// Msg is the message of plain lines, e.g. "sandbox output"; the note
	// of lines dropped over the budget is Msg + " dropped over the log
	// budget".
	Msg string
	// Level is the level of plain lines (and of records without a valid
	// level); default (zero) slog.LevelInfo.
	Level slog.Level
	// Max, if set, caps the level of the child's own records: a child is
	// not trusted to raise alarms in the host's log.
	Max slog.Leveler
	// Budget is how many bytes of lines are logged in all; default 1 MiB.
	Budget int
	// Tail is how many last lines LastLines keeps; default 8.
	Tail int
}

// LineLog is an io.Writer for a child's output (stdout, stderr, a serial
// console) that must not be able to flood the host's log. It splits the
// stream into lines and logs each through slog until a byte budget is
// spent; lines that are slog JSON records (the drivers' inits and agents
// log that way) are re-logged with their own message, level and
// attributes. It keeps the last lines for error messages.
//
// A LineLog is safe for concurrent use; Write never fails.
type LineLog struct {
	log  *slog.Logger
	opts LineLogOptions

	mu      sync.Mutex
	partial []byte
	budget  int
	dropped int
	tail    []string
}

// NewLineLog returns a LineLog logging through log.
func NewLineLog(log *slog.Logger, opts LineLogOptions) *LineLog {
	if opts.Budget <= 0 {
		opts.Budget = 1 << 20
	}
	if opts.Tail <= 0 {
		opts.Tail = 8
	}
	return &LineLog{log: log, opts: opts, budget: opts.Budget}
}

// Write logs every complete line in p and holds back an unterminated one
// (at most MaxLine bytes of it) for the next Write or Flush.
func (l *LineLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := MaxLine - len(l.partial)
			if room > 0 {
				l.partial = append(l.partial, p[:min(room, len(p))]...)
			}
			break
		}
		line := p[:i]
		if len(l.partial) > 0 {
			room := max(MaxLine-len(l.partial), 0)
			line = append(l.partial, line[:min(room, len(line))]...)
			l.partial = nil
		}
		l.emit(line)
		p = p[i+1:]
	}
	return n, nil
}

// Flush logs an unterminated last line and how many lines were dropped
// over the budget. Call it once the stream has ended.
func (l *LineLog) Flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.partial) > 0 {
		l.emit(l.partial)
		l.partial = nil
	}
	if l.dropped > 0 {
		l.log.Warn(l.opts.Msg+" dropped over the log budget", "lines", l.dropped)
		l.dropped = 0
	}
}

// LastLines returns the last lines (an unterminated one included), joined
// by "; ", for error messages. Lines over the budget are kept too.
func (l *LineLog) LastLines() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	tail := l.tail
	if len(l.partial) > 0 {
		tail = append(tail[:len(tail):len(tail)], strings.TrimSpace(string(l.partial)))
	}
	return strings.Join(tail, "; ")
}

func (l *LineLog) emit(line []byte) {
	if len(line) > MaxLine {
		line = line[:MaxLine]
	}
	s := strings.TrimSpace(strings.ToValidUTF8(string(line), "?"))
	if s == "" {
		return
	}
	l.tail = append(l.tail, s)
	if len(l.tail) > l.opts.Tail {
		l.tail = l.tail[1:]
	}
	if l.budget < len(s) {
		l.dropped++
		return
	}
	l.budget -= len(s)
	var rec map[string]any
	if !strings.HasPrefix(s, "{") || json.Unmarshal([]byte(s), &rec) != nil {
		l.log.Log(context.Background(), l.opts.Level, l.opts.Msg, "line", s)
		return
	}
	msg, _ := rec["msg"].(string)
	level := l.opts.Level
	if lv, ok := rec["level"].(string); ok {
		var parsed slog.Level
		if parsed.UnmarshalText([]byte(lv)) == nil {
			level = parsed
		}
	}
	if l.opts.Max != nil {
		level = min(level, l.opts.Max.Level())
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
