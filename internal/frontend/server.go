// Package frontend serves Lambda's own HTTP APIs (the 2015-03-31 family of
// paths, JSON shapes, status codes and error format) so that unmodified AWS
// SDKs work against InvokeX, plus InvokeX's own /invokex/v1 API.
//
// The frontend owns everything HTTP: routing, request ids, body limits,
// decoding and encoding Lambda's shapes, and the single translation of
// errdefs kinds into Lambda exceptions (errors.go). Everything else is the
// control plane's job, reached through controlplane.API.
//
// Function names arrive in URL paths and are only ever used after
// function.ParseName accepted them, so a decoded name such as "../x" never
// reaches the control plane.
package frontend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/errdefs"
)

// Defaults for Config's zero fields.
const (
	DefaultRegion  = "us-east-1"
	DefaultAccount = "000000000000"
	// DefaultMaxSyncPayload is Lambda's 6 MB limit on a synchronous request
	// and on its response.
	DefaultMaxSyncPayload = 6 << 20
	// DefaultMaxAsyncPayload is Lambda's 256 KB limit on an Event request.
	DefaultMaxAsyncPayload = 256 << 10
	// DefaultMaxCodeUpload fits a 50 MB zip, base64-encoded (4/3) inside a
	// JSON document, with room for the other fields.
	DefaultMaxCodeUpload = 70 << 20
	// maxJSONBody caps every other JSON request body.
	maxJSONBody = 1 << 20
)

// Config configures a Server.
type Config struct {
	// API is the control plane. Required.
	API controlplane.API
	// Region and Account appear in ARNs (defaults us-east-1, 000000000000).
	Region  string
	Account string
	// Logger receives one line per request and every internal error.
	// Defaults to slog.Default().
	Logger *slog.Logger
	// Metrics, when set, receives the frontend's collectors and is served
	// at /metrics.
	Metrics *prometheus.Registry
	// MaxSyncPayload caps a RequestResponse/DryRun request body and a
	// synchronous response payload (default 6 MB).
	MaxSyncPayload int64
	// MaxAsyncPayload caps an Event request body (default 256 KB).
	MaxAsyncPayload int64
	// MaxCodeUpload caps CreateFunction and UpdateFunctionCode bodies.
	MaxCodeUpload int64
}

// Server is the frontend's http.Handler. It is safe for concurrent use.
type Server struct {
	api     controlplane.API
	cfg     Config
	log     *slog.Logger
	mux     *http.ServeMux
	metrics *metrics
}

// New returns a Server serving every route of the frontend. It panics if
// cfg.API is nil (a wiring bug, not a runtime condition).
func New(cfg Config) *Server {
	if cfg.API == nil {
		panic("frontend: Config.API is nil")
	}
	if cfg.Region == "" {
		cfg.Region = DefaultRegion
	}
	if cfg.Account == "" {
		cfg.Account = DefaultAccount
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxSyncPayload <= 0 {
		cfg.MaxSyncPayload = DefaultMaxSyncPayload
	}
	if cfg.MaxAsyncPayload <= 0 {
		cfg.MaxAsyncPayload = DefaultMaxAsyncPayload
	}
	if cfg.MaxCodeUpload <= 0 {
		cfg.MaxCodeUpload = DefaultMaxCodeUpload
	}
	s := &Server{api: cfg.API, cfg: cfg, log: cfg.Logger, mux: http.NewServeMux()}
	if cfg.Metrics != nil {
		s.metrics = newMetrics(cfg.Metrics)
	}
	s.routes()
	return s
}

// routes registers every operation. The operation name labels metrics and
// log lines.
func (s *Server) routes() {
	// Lambda's management API. ListFunctions is sent without the trailing
	// slash by current SDKs and with it by older ones.
	s.handle("POST /2015-03-31/functions", "CreateFunction", s.createFunction)
	s.handle("GET /2015-03-31/functions", "ListFunctions", s.listFunctions)
	s.handle("GET /2015-03-31/functions/{$}", "ListFunctions", s.listFunctions)
	s.handle("GET /2015-03-31/functions/{name}", "GetFunction", s.getFunction)
	s.handle("DELETE /2015-03-31/functions/{name}", "DeleteFunction", s.deleteFunction)
	s.handle("GET /2015-03-31/functions/{name}/configuration", "GetFunctionConfiguration", s.getFunctionConfiguration)
	s.handle("PUT /2015-03-31/functions/{name}/configuration", "UpdateFunctionConfiguration", s.updateFunctionConfiguration)
	s.handle("PUT /2015-03-31/functions/{name}/code", "UpdateFunctionCode", s.updateFunctionCode)
	s.handle("POST /2015-03-31/functions/{name}/versions", "PublishVersion", s.publishVersion)
	s.handle("GET /2015-03-31/functions/{name}/versions", "ListVersionsByFunction", s.listVersionsByFunction)
	s.handle("PUT /2017-10-31/functions/{name}/concurrency", "PutFunctionConcurrency", s.putFunctionConcurrency)
	s.handle("GET /2019-09-30/functions/{name}/concurrency", "GetFunctionConcurrency", s.getFunctionConcurrency)
	s.handle("DELETE /2017-10-31/functions/{name}/concurrency", "DeleteFunctionConcurrency", s.deleteFunctionConcurrency)
	s.handle("DELETE /2019-09-30/functions/{name}/concurrency", "DeleteFunctionConcurrency", s.deleteFunctionConcurrency)
	s.handle("POST /2015-03-31/functions/{name}/invocations", "Invoke", s.invoke)

	// InvokeX's own API.
	s.handle("GET /invokex/v1/invocations/{requestId}", "GetInvocation", s.getInvocation)
	s.handle("GET /invokex/v1/functions/{name}/invocations", "ListInvocations", s.listInvocations)
	s.handle("GET /invokex/v1/functions/{name}/code", "GetFunctionCode", s.getFunctionCode)
	s.handle("GET /invokex/v1/runtimes", "ListRuntimes", s.listRuntimes)
	s.handle("GET /healthz", "Health", func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, err := w.Write([]byte("ok"))
		return err
	})
	if s.cfg.Metrics != nil {
		h := promhttp.HandlerFor(s.cfg.Metrics, promhttp.HandlerOpts{})
		s.handle("GET /metrics", "Metrics", func(w http.ResponseWriter, r *http.Request) error {
			h.ServeHTTP(w, r)
			return nil
		})
	}
}

// handlerFunc is an operation. It writes its success response itself and
// returns an error instead of writing one, so that every error goes
// through writeError.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

func (s *Server) handle(pattern, op string, h handlerFunc) {
	s.mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
		st := stateOf(r.Context())
		st.op = op
		if err := h(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

// reqState is what the middleware and the handlers share about one request.
type reqState struct {
	id  string
	op  string
	err error // the error sent to the client, for the request log line
}

type stateKey struct{}

func stateOf(ctx context.Context) *reqState {
	if st, ok := ctx.Value(stateKey{}).(*reqState); ok {
		return st
	}
	// Only reachable if a handler is called outside ServeHTTP (a bug);
	// a throwaway state keeps it from crashing.
	return &reqState{}
}

// requestID returns the id ServeHTTP assigned to the request.
func requestID(r *http.Request) string { return stateOf(r.Context()).id }

// ServeHTTP assigns the request id, routes the request, recovers panics and
// logs and counts the request once.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	st := &reqState{id: uuid.NewString(), op: "UnknownOperation"}
	r = r.WithContext(context.WithValue(r.Context(), stateKey{}, st))
	rw := &statusWriter{ResponseWriter: w}
	rw.Header().Set("X-Amzn-RequestId", st.id)

	defer func() {
		v := recover()
		if v != nil && v != http.ErrAbortHandler {
			s.log.Error("panic serving request", "request_id", st.id, "operation", st.op,
				"panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if !rw.wroteHeader {
				s.writeError(rw, r, errPanic)
			}
		}
		s.finish(r, st, rw.status(), time.Since(start))
		if v == http.ErrAbortHandler {
			// The handler asked net/http to abort the response; let it.
			panic(v)
		}
	}()

	if err := s.checkRoute(r); err != nil {
		s.writeError(rw, r, err)
		return
	}
	s.mux.ServeHTTP(rw, r)
}

// errPanic is what a recovered panic is reported as; it has no kind, so the
// client sees a generic ServiceException.
var errPanic = errors.New("handler panicked")

// checkRoute answers, in Lambda's error format, the requests the mux would
// answer in plain text: paths with empty, "." or ".." segments (the mux
// would redirect them), unknown routes and wrong methods.
func (s *Server) checkRoute(r *http.Request) error {
	p := r.URL.EscapedPath()
	if p == "" || p[0] != '/' || !isCleanPath(p) {
		return errdefs.Invalid("request path %q must not contain empty, '.' or '..' segments", truncate(p, 128))
	}
	if _, pattern := s.mux.Handler(r); pattern != "" {
		return nil
	}
	var allowed []string
	for _, m := range []string{http.MethodGet, http.MethodPost, http.MethodPut, http.MethodDelete} {
		if m == r.Method {
			continue
		}
		probe := r.Clone(r.Context())
		probe.Method = m
		if _, pattern := s.mux.Handler(probe); pattern != "" {
			allowed = append(allowed, m)
		}
	}
	if len(allowed) > 0 {
		return &routeError{status: http.StatusMethodNotAllowed, name: "MethodNotAllowedException",
			msg:   fmt.Sprintf("method %s is not allowed on this resource (allowed: %s)", r.Method, strings.Join(allowed, ", ")),
			allow: strings.Join(allowed, ", ")}
	}
	return &routeError{status: http.StatusNotFound, name: "UnknownOperationException",
		msg: "Unknown operation " + r.Method + " " + truncate(p, 128)}
}

// isCleanPath reports whether p is what the mux's path cleaning leaves
// unchanged (a trailing slash is allowed).
func isCleanPath(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// finish logs and counts one request.
func (s *Server) finish(r *http.Request, st *reqState, status int, d time.Duration) {
	level := slog.LevelDebug
	if status >= 400 {
		level = slog.LevelInfo
	}
	if s.log.Enabled(r.Context(), level) {
		attrs := []any{"method", r.Method, "path", truncate(r.URL.EscapedPath(), 256), "status", status,
			"request_id", st.id, "operation", st.op,
			"duration_ms", strconv.FormatFloat(float64(d.Microseconds())/1000, 'f', 3, 64)}
		if st.err != nil {
			attrs = append(attrs, "error", st.err.Error())
		}
		s.log.Log(r.Context(), level, "request", attrs...)
	}
	if s.metrics != nil {
		s.metrics.observe(st.op, status, d)
	}
}

// statusWriter records the status written. It passes Flush through so a
// streaming handler still works behind it.
type statusWriter struct {
	http.ResponseWriter
	code        int
	wroteHeader bool
}

func (w *statusWriter) WriteHeader(code int) {
	if !w.wroteHeader {
		w.code = code
		w.wroteHeader = true
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) status() int {
	if !w.wroteHeader {
		return http.StatusOK
	}
	return w.code
}

// metrics are the frontend's Prometheus collectors.
type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "invokex", Subsystem: "frontend", Name: "requests_total",
			Help: "HTTP requests served by the frontend, by operation and status code.",
		}, []string{"operation", "status"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "invokex", Subsystem: "frontend", Name: "request_duration_seconds",
			Help:    "Time to serve a frontend request, by operation.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"operation"}),
	}
	m.requests = register(reg, m.requests)
	m.duration = register(reg, m.duration)
	return m
}

// register registers c, or returns the collector already registered under
// the same name (two Servers sharing one registry share the collectors).
func register[C prometheus.Collector](reg *prometheus.Registry, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(fmt.Sprintf("frontend: registering metrics: %v", err))
	}
	return c
}

func (m *metrics) observe(op string, status int, d time.Duration) {
	m.requests.WithLabelValues(op, strconv.Itoa(status)).Inc()
	m.duration.WithLabelValues(op).Observe(d.Seconds())
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
