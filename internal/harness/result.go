package harness

import (
	"bytes"
	"fmt"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/protocol"
)

// Results the harness makes itself, when the agent could not report one:
// INIT failed, the sandbox died, or the agent stopped answering. They look
// like what Lambda returns in the same situation, so a client cannot tell
// who wrote them.

const (
	functionErrorUnhandled = "Unhandled"
	errorTypeExit          = "Runtime.ExitError"
	errorTypeTimeout       = "Sandbox.Timedout"
)

// initErrorResult is the answer to an invocation whose cold start failed in
// INIT: the error document as payload and the INIT output before START, as
// Lambda logs it.
func (h *Harness) initErrorResult(req *InvokeRequest, i *instance, done protocol.InitDone, initLog []byte, start time.Time) *InvokeResult {
	info := *done.Error
	if info.ErrorType == "" {
		info.ErrorType = "Runtime.Unknown"
	}
	end := h.now()
	var log bytes.Buffer
	log.Write(initLog)
	if n := len(initLog); n > 0 && initLog[n-1] != '\n' {
		log.WriteByte('\n')
	}
	writeSyntheticLog(&log, req, "", logReport{
		duration: i.initTook, initDuration: done.InitDuration,
		status: "error", errorType: info.ErrorType,
	})
	return h.syntheticResult(req, i, info, &log, start, end, done.InitDuration, true)
}

// exitResult answers an invocation whose sandbox exited or whose agent
// went away.
func (h *Harness) exitResult(req *InvokeRequest, i *instance, start time.Time, cold bool) *InvokeResult {
	info := protocol.ErrorInfo{
		ErrorMessage: fmt.Sprintf("RequestId: %s Error: Runtime exited without providing a reason", req.RequestID),
		ErrorType:    errorTypeExit,
	}
	end := h.now()
	var log bytes.Buffer
	writeSyntheticLog(&log, req, info.ErrorMessage, logReport{
		duration: end.Sub(start), status: "error", errorType: info.ErrorType,
	})
	var initDur time.Duration
	if cold {
		initDur = i.initDuration
	}
	return h.syntheticResult(req, i, info, &log, start, end, initDur, cold)
}

// timeoutResult answers an invocation the agent did not answer within the
// function's timeout plus the safety margin.
func (h *Harness) timeoutResult(req *InvokeRequest, i *instance, start time.Time, cold bool) *InvokeResult {
	end := h.now()
	msg := fmt.Sprintf("%s %s Task timed out after %.2f seconds",
		end.UTC().Format("2006-01-02T15:04:05.000Z"), req.RequestID, float64(req.Function.Timeout))
	info := protocol.ErrorInfo{ErrorMessage: msg}
	var log bytes.Buffer
	writeSyntheticLog(&log, req, msg, logReport{
		duration: time.Duration(req.Function.Timeout) * time.Second, status: "timeout",
	})
	var initDur time.Duration
	if cold {
		initDur = i.initDuration
	}
	res := h.syntheticResult(req, i, info, &log, start, end, initDur, cold)
	res.ErrorType = errorTypeTimeout
	return res
}

func (h *Harness) syntheticResult(req *InvokeRequest, i *instance, info protocol.ErrorInfo, log *bytes.Buffer, start, end time.Time, initDur time.Duration, cold bool) *InvokeResult {
	b := log.Bytes()
	logBytes := int64(len(b))
	if len(b) > invocation.MaxLogBytes {
		b = b[:invocation.MaxLogBytes]
	}
	return &InvokeResult{
		RequestID:     req.RequestID,
		Payload:       errorPayload(info),
		FunctionError: functionErrorUnhandled,
		ErrorType:     info.ErrorType,
		Log:           b,
		LogBytes:      logBytes,
		Start:         start,
		End:           end,
		Duration:      end.Sub(start),
		InitDuration:  initDur,
		Cold:          cold,
		Instance:      i.id,
	}
}

type logReport struct {
	duration     time.Duration
	initDuration time.Duration
	status       string
	errorType    string
}

// writeSyntheticLog writes START, an optional message line, END and REPORT
// in Lambda's format.
func writeSyntheticLog(b *bytes.Buffer, req *InvokeRequest, msg string, r logReport) {
	version := req.Function.Version
	if version == "" {
		version = function.LatestVersion
	}
	b.WriteString(protocol.StartLine(req.RequestID, version))
	if msg != "" {
		b.WriteString(msg + "\n")
	}
	b.WriteString(protocol.EndLine(req.RequestID))
	b.WriteString(protocol.Report{
		RequestID:    req.RequestID,
		Duration:     r.duration,
		MemoryMB:     req.Function.MemorySize,
		InitDuration: r.initDuration,
		Status:       r.status,
		ErrorType:    r.errorType,
	}.Line())
}
