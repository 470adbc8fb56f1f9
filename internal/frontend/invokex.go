package frontend

import (
	"net/http"
	"regexp"
	"strconv"

	"github.com/invokex/invokex/internal/errdefs"
)

// InvokeX's own API under /invokex/v1: invocation records, the deployment
// package behind GetFunction's Code.Location, and the runtimes DB. Errors
// use Lambda's format so one client decodes both APIs.

const (
	defaultInvocationsLimit = 50
	// Each record carries up to 256 KiB of log, so a page is capped to keep
	// one request under ~25 MiB of server memory.
	maxInvocationsLimit = 100
)

// requestIDRE accepts the request ids InvokeX hands out (UUIDs) and other
// simple tokens, never anything with path or control characters.
var requestIDRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,128}$`)

func (s *Server) getInvocation(w http.ResponseWriter, r *http.Request) error {
	id := r.PathValue("requestId")
	if !requestIDRE.MatchString(id) {
		return errdefs.Invalid("request id %q must be 1-128 characters of [a-zA-Z0-9_-]", truncate(id, 140))
	}
	rec, err := s.api.GetInvocation(r.Context(), id)
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusOK, toRecord(rec))
}

func (s *Server) listInvocations(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	limit := defaultInvocationsLimit
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxInvocationsLimit {
			return errdefs.Invalid("limit must be an integer between 1 and %d", maxInvocationsLimit)
		}
		limit = n
	}
	recs, err := s.api.ListInvocations(r.Context(), name, limit)
	if err != nil {
		return err
	}
	out := struct {
		Invocations []*invocationRecord `json:"Invocations"`
	}{Invocations: make([]*invocationRecord, 0, len(recs))}
	for _, rec := range recs {
		out.Invocations = append(out.Invocations, toRecord(rec))
	}
	return writeJSON(w, http.StatusOK, out)
}

func (s *Server) getFunctionCode(w http.ResponseWriter, r *http.Request) error {
	name, q, err := resolveName(r)
	if err != nil {
		return err
	}
	zip, err := s.api.FunctionCode(r.Context(), name, q)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Content-Type", "application/zip")
	h.Set("Content-Length", strconv.Itoa(len(zip)))
	// name passed function.ParseName: it is safe inside the quoted filename.
	h.Set("Content-Disposition", `attachment; filename="`+name+`.zip"`)
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(zip) // the status is sent; a client gone mid-body cannot be told
	}
	return nil
}

func (s *Server) listRuntimes(w http.ResponseWriter, r *http.Request) error {
	rts, err := s.api.ListRuntimes(r.Context())
	if err != nil {
		return err
	}
	out := struct {
		Runtimes []runtimeInfo `json:"Runtimes"`
	}{Runtimes: make([]runtimeInfo, 0, len(rts))}
	for _, rt := range rts {
		out.Runtimes = append(out.Runtimes, toRuntimeInfo(rt))
	}
	return writeJSON(w, http.StatusOK, out)
}
