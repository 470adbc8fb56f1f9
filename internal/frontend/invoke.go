package frontend

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/invocation"
)

const (
	// maxClientContext is Lambda's cap on X-Amz-Client-Context (base64).
	maxClientContext = 3583
	// tailLogBytes is how much of the log X-Amz-Log-Result carries.
	tailLogBytes = 4096
	// functionErrorUnhandled is X-Amz-Function-Error for every function
	// error InvokeX reports.
	functionErrorUnhandled = "Unhandled"
)

// invoke serves Invoke: RequestResponse runs the function and returns its
// payload, Event queues it (202), DryRun only checks it could run (204).
// The body is read, within the limit of the invocation type, before the
// control plane is called, so an oversized request costs it nothing.
func (s *Server) invoke(w http.ResponseWriter, r *http.Request) error {
	name, qualifier, err := resolveName(r)
	if err != nil {
		return err
	}
	typ := invocation.Type(r.Header.Get("X-Amz-Invocation-Type"))
	if typ == "" {
		typ = invocation.TypeRequestResponse
	}
	limit := s.cfg.MaxSyncPayload
	switch typ {
	case invocation.TypeRequestResponse, invocation.TypeDryRun:
	case invocation.TypeEvent:
		limit = s.cfg.MaxAsyncPayload
	default:
		return errdefs.Invalid("1 validation error detected: Value '%s' at 'invocationType' failed to satisfy constraint: Member must satisfy enum value set: [Event, RequestResponse, DryRun]", truncate(string(typ), 64))
	}
	tail := false
	switch lt := r.Header.Get("X-Amz-Log-Type"); lt {
	case "", "None":
	case "Tail":
		tail = true
	default:
		return errdefs.Invalid("1 validation error detected: Value '%s' at 'logType' failed to satisfy constraint: Member must satisfy enum value set: [Tail, None]", truncate(lt, 64))
	}
	clientContext := r.Header.Get("X-Amz-Client-Context")
	if err := checkClientContext(clientContext); err != nil {
		return err
	}

	payload, err := readBody(w, r, limit, fmt.Sprintf("Request must be smaller than %d bytes for the InvokeFunction operation", limit))
	if err != nil {
		return err
	}
	if len(payload) > 0 && !json.Valid(payload) {
		return fmt.Errorf("Could not parse request body into json: the payload is not valid JSON: %w", errdefs.ErrInvalidRequestContent)
	}
	if len(payload) == 0 {
		// Lambda hands a function "{}" when the caller sent no payload;
		// runtimes such as aws-lambda-go fail to decode an empty event.
		payload = []byte("{}")
	}

	ctx := r.Context()
	switch typ {
	case invocation.TypeDryRun:
		if _, err := s.api.CheckInvoke(ctx, name, qualifier); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	case invocation.TypeEvent:
		if err := s.api.InvokeAsync(ctx, s.invokeInput(r, name, qualifier, payload, clientContext)); err != nil {
			return err
		}
		w.WriteHeader(http.StatusAccepted)
		return nil
	}

	res, cfg, err := s.api.Invoke(ctx, s.invokeInput(r, name, qualifier, payload, clientContext))
	if err != nil {
		return err
	}
	if res == nil {
		return fmt.Errorf("invoking %s: control plane returned no result", name)
	}
	out, functionError := res.Payload, res.FunctionError
	if int64(len(out)) > s.cfg.MaxSyncPayload {
		// Never a truncated 200: the oversized response is a function error.
		out = responseTooLarge(s.cfg.MaxSyncPayload)
		functionError = functionErrorUnhandled
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(out)))
	version := function.LatestVersion
	if cfg != nil && cfg.Version != "" {
		version = cfg.Version
	}
	h.Set("X-Amz-Executed-Version", version)
	if functionError != "" {
		h.Set("X-Amz-Function-Error", functionError)
	}
	if tail {
		h.Set("X-Amz-Log-Result", base64.StdEncoding.EncodeToString(lastBytes(res.Log, tailLogBytes)))
	}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(out) // the status is sent; a client gone mid-body cannot be told
	return nil
}

func (s *Server) invokeInput(r *http.Request, name, qualifier string, payload []byte, clientContext string) *controlplane.InvokeInput {
	return &controlplane.InvokeInput{
		RequestID:     requestID(r),
		Function:      name,
		Qualifier:     qualifier,
		Payload:       payload,
		ClientContext: clientContext,
		TraceID:       r.Header.Get("X-Amzn-Trace-Id"),
	}
}

// checkClientContext enforces Lambda's limit on X-Amz-Client-Context and
// that it is base64, since it is handed to the runtime as is.
func checkClientContext(cc string) error {
	if cc == "" {
		return nil
	}
	if len(cc) > maxClientContext {
		return errdefs.Invalid("Client context must be at most %d bytes of base64-encoded data", maxClientContext)
	}
	if _, err := base64.StdEncoding.DecodeString(cc); err != nil {
		return errdefs.Invalid("Client context must be valid base64")
	}
	return nil
}

// responseTooLarge is the error document Lambda returns in place of a
// response payload over the limit.
func responseTooLarge(limit int64) []byte {
	b, _ := json.Marshal(struct {
		ErrorMessage string `json:"errorMessage"`
		ErrorType    string `json:"errorType"`
	}{
		ErrorMessage: fmt.Sprintf("Response payload size exceeded maximum allowed payload size (%d bytes).", limit),
		ErrorType:    "Function.ResponseSizeTooLarge",
	})
	return b
}

func lastBytes(b []byte, n int) []byte {
	if len(b) <= n {
		return b
	}
	return b[len(b)-n:]
}
