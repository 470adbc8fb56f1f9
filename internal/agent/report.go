package agent

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/protocol"
)

// Error types the agent reports, as Lambda names them.
const (
	errTypeExit          = "Runtime.ExitError"
	errTypeEntrypoint    = "Runtime.InvalidEntrypoint"
	errTypeUnknown       = "Runtime.Unknown"
	errTypeTimeout       = "Sandbox.Timedout"
	errTypeTooLarge      = "Function.ResponseSizeTooLarge"
	errTypeInvalidState  = "Sandbox.InvalidState"
	functionErrUnhandled = "Unhandled"
)

// maxPayload is the largest response (and error) payload a runtime may
// post: Lambda's 6 MB synchronous response limit.
const maxPayload = 6 << 20

// tooLargeMessage is Lambda's own wording; it quotes 6291556 bytes although
// the limit it enforces is 6291456.
const tooLargeMessage = "Response payload size exceeded maximum allowed payload size (6291556 bytes)."

// lambdaTime formats a timestamp the way Lambda prints it in timeout messages.
func lambdaTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000Z")
}

// failure is why INIT or an invocation failed: the error document the
// caller sees and the error type the harness records.
type failure struct {
	errorType string
	// doc is the error JSON returned as payload (or InitDone.Error).
	doc []byte
	// logLine, if set, is added to the log before END (Lambda prints the
	// timeout and runtime-exit messages there too).
	logLine string
}

// info decodes the failure's document for InitDone.Error.
func (f *failure) info() *protocol.ErrorInfo {
	var ei protocol.ErrorInfo
	if err := json.Unmarshal(f.doc, &ei); err != nil || (ei.ErrorMessage == "" && ei.ErrorType == "") {
		ei = protocol.ErrorInfo{ErrorMessage: string(f.doc)}
	}
	if ei.ErrorType == "" {
		ei.ErrorType = f.errorType
	}
	return &ei
}

// newFailure builds a failure with a document {"errorMessage","errorType"}.
func newFailure(errorType, message string) *failure {
	doc, _ := json.Marshal(protocol.ErrorInfo{ErrorMessage: message, ErrorType: errorType})
	return &failure{errorType: errorType, doc: doc}
}

// withRequestID prefixes msg the way Lambda does inside an invocation.
func withRequestID(requestID, msg string) string {
	if requestID == "" {
		return msg
	}
	return "RequestId: " + requestID + " " + msg
}

// exitReason describes how a process ended, in os.ProcessState's words.
func exitReason(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return "exit status " + strconv.Itoa(ws.ExitStatus())
	case ws.Signaled():
		return "signal: " + ws.Signal().String()
	}
	return "unknown wait status " + strconv.Itoa(int(ws))
}

// exitFailure is Lambda's Runtime.ExitError for a runtime that exited.
func exitFailure(requestID string, ws unix.WaitStatus) *failure {
	msg := "Error: Runtime exited with error: " + exitReason(ws)
	if ws.Exited() && ws.ExitStatus() == 0 {
		msg = "Error: Runtime exited without providing a reason"
	}
	msg = withRequestID(requestID, msg)
	f := newFailure(errTypeExit, msg)
	f.logLine = msg + "\n" + errTypeExit + "\n"
	return f
}

// timeoutFailure is Lambda's timeout document: errorMessage only.
func timeoutFailure(now time.Time, requestID string, timeout time.Duration) *failure {
	msg := fmt.Sprintf("%s %s Task timed out after %.2f seconds", lambdaTime(now), requestID, timeout.Seconds())
	doc, _ := json.Marshal(protocol.ErrorInfo{ErrorMessage: msg})
	return &failure{errorType: errTypeTimeout, doc: doc, logLine: msg + "\n"}
}

// initTimeoutFailure reports an INIT that exceeded its bound.
func initTimeoutFailure(now time.Time, requestID string, timeout time.Duration) *failure {
	msg := lambdaTime(now) + " "
	if requestID != "" {
		msg += requestID + " "
	}
	msg += fmt.Sprintf("INIT timed out after %.2f seconds", timeout.Seconds())
	f := newFailure(errTypeTimeout, msg)
	f.logLine = msg + "\n"
	return f
}

// tooLargeFailure is Lambda's Function.ResponseSizeTooLarge.
func tooLargeFailure() *failure {
	f := newFailure(errTypeTooLarge, tooLargeMessage)
	f.logLine = tooLargeMessage + "\n"
	return f
}

// postedError turns a body the runtime posted to /error or /init/error into
// a failure. The body is passed through when it is a JSON object, as Lambda
// does; the error type is the header's, else the body's errorType.
func postedError(body []byte, headerType string) *failure {
	var ei protocol.ErrorInfo
	isObject := json.Valid(body) && bytes.HasPrefix(bytes.TrimSpace(body), []byte("{"))
	if isObject {
		_ = json.Unmarshal(body, &ei) // fields of other types just stay empty
	}
	errorType := headerType
	if errorType == "" {
		errorType = ei.ErrorType
	}
	if errorType == "" {
		errorType = errTypeUnknown
	}
	if isObject {
		return &failure{errorType: errorType, doc: body}
	}
	return newFailure(errorType, string(body))
}

// toMB rounds KiB up to whole MB, at least 1.
func toMB(kb int64) int {
	return max(int((kb+1023)/1024), 1)
}

// invocationLog assembles an invocation's log without copying the output:
// what came before it (INIT, between invocations), START, its own output,
// extra (the failure's log line), END and REPORT. The Lambda lines are never
// subject to the cap. It also returns the uncapped length of that log.
func invocationLog(pre, body *capBuffer, requestID, version, extra, report string) ([][]byte, int64) {
	var segs [][]byte
	total := pre.Total() + body.Total()
	line := func(s string) {
		segs = append(segs, []byte(s))
		total += int64(len(s))
	}
	segs = append(segs, pre.Segments()...)
	if !pre.endsInNewline() {
		line("\n")
	}
	line(protocol.StartLine(requestID, version))
	segs = append(segs, body.Segments()...)
	if !body.endsInNewline() {
		line("\n")
	}
	if extra != "" {
		line(extra)
	}
	line(protocol.EndLine(requestID))
	line(report)
	return segs, total
}
