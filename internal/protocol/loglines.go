package protocol

import (
	"strconv"
	"strings"
	"time"
)

// The log lines Lambda wraps every invocation's output in. The agent writes
// them for invocations it runs; the harness writes them for invocations
// that never reached an agent (INIT failure, sandbox exit, no answer).

// StartLine is "START RequestId: <id> Version: <version>\n".
func StartLine(requestID, version string) string {
	return "START RequestId: " + requestID + " Version: " + version + "\n"
}

// EndLine is "END RequestId: <id>\n".
func EndLine(requestID string) string {
	return "END RequestId: " + requestID + "\n"
}

// Report is what a REPORT line says.
type Report struct {
	RequestID    string
	Duration     time.Duration
	MemoryMB     int
	MaxMemoryMB  int
	InitDuration time.Duration // shown when > 0 (INIT preceded the invocation)
	// RestoreDuration is shown when > 0 (the environment was restored from
	// a snapshot for this invocation), with Lambda's billed figure.
	RestoreDuration time.Duration
	Status          string // shown when set, e.g. "timeout"
	ErrorType       string // shown when set
}

// Line is Lambda's tab-separated REPORT line, ending in "\n".
func (r Report) Line() string {
	var b strings.Builder
	b.WriteString("REPORT RequestId: ")
	b.WriteString(r.RequestID)
	b.WriteString("\tDuration: " + Millis(r.Duration) + " ms")
	b.WriteString("\tBilled Duration: " + strconv.FormatInt(BilledMillis(r.Duration), 10) + " ms")
	b.WriteString("\tMemory Size: " + strconv.Itoa(r.MemoryMB) + " MB")
	b.WriteString("\tMax Memory Used: " + strconv.Itoa(r.MaxMemoryMB) + " MB")
	if r.InitDuration > 0 {
		b.WriteString("\tInit Duration: " + Millis(r.InitDuration) + " ms")
	}
	if r.RestoreDuration > 0 {
		b.WriteString("\tRestore Duration: " + Millis(r.RestoreDuration) + " ms")
		b.WriteString("\tBilled Restore Duration: " + strconv.FormatInt(BilledMillis(r.RestoreDuration), 10) + " ms")
	}
	if r.Status != "" {
		b.WriteString("\tStatus: " + r.Status)
	}
	if r.ErrorType != "" {
		b.WriteString("\tError Type: " + r.ErrorType)
	}
	b.WriteByte('\n')
	return b.String()
}

// Millis formats a duration as milliseconds with two decimals ("1.23").
func Millis(d time.Duration) string {
	return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 2, 64)
}

// BilledMillis rounds a duration up to whole milliseconds, at least 1.
func BilledMillis(d time.Duration) int64 {
	return max(int64((d+time.Millisecond-1)/time.Millisecond), 1)
}
