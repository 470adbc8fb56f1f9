package frontend

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// fakeAPI is an in-memory controlplane.API that records its calls.
type fakeAPI struct {
	mu    sync.Mutex
	calls map[string]int
	fns   map[string]*function.Config
	code  map[string][]byte
	rev   int

	// err, when set, is returned by every method (the call is counted).
	err error
	// panicWith, when set, makes every method panic with it.
	panicWith any
	// invoke, when set, computes Invoke's result; the default echoes the payload.
	invoke func(in *controlplane.InvokeInput) *harness.InvokeResult
	// gate, when set, runs at the start of Invoke without the lock held;
	// its error is Invoke's.
	gate func(ctx context.Context) error

	lastInvoke   *controlplane.InvokeInput
	lastAsync    *controlplane.InvokeInput
	lastUpdate   *controlplane.ConfigUpdate
	lastRevision string
	lastCheck    [2]string
	lastLimit    int
	records      map[string]*invocation.Record
	runtimes     []*runtimes.Runtime

	// Published versions, by function, in number order; the $LATEST
	// revision each came from; the last number given per function.
	vers        map[string][]*function.Config
	verSource   map[string]string // "name:N" -> $LATEST revision
	verLast     map[string]int
	lastPublish *controlplane.PublishInput
	lastDelete  [2]string // name, qualifier of the last version deleted
	lastCode    [2]string // name, qualifier of the last FunctionCode
}

var _ controlplane.API = (*fakeAPI)(nil)

func newFake() *fakeAPI {
	return &fakeAPI{calls: map[string]int{}, fns: map[string]*function.Config{},
		code: map[string][]byte{}, records: map[string]*invocation.Record{},
		vers: map[string][]*function.Config{}, verSource: map[string]string{}, verLast: map[string]int{}}
}

// enter counts a call and returns the injected error, if any. Callers hold f.mu.
func (f *fakeAPI) enter(op string) error {
	f.calls[op]++
	if f.panicWith != nil {
		panic(f.panicWith)
	}
	return f.err
}

func (f *fakeAPI) totalCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.calls {
		n += c
	}
	return n
}

func (f *fakeAPI) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[op]
}

func (f *fakeAPI) nextRevision() string {
	f.rev++
	return fmt.Sprintf("rev-%d", f.rev)
}

func sha(zip []byte) string {
	sum := sha256.Sum256(zip)
	return base64.StdEncoding.EncodeToString(sum[:])
}

// put stores a function directly, as if created earlier.
func (f *fakeAPI) put(cfg *function.Config, zip []byte) *function.Config {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := cfg.Clone()
	c.ApplyDefaults()
	c.CodeSha256, c.CodeSize = sha(zip), int64(len(zip))
	c.RevisionID = f.nextRevision()
	c.State, c.LastUpdateStatus = function.StateActive, function.UpdateSuccessful
	c.LastModified = time.Date(2026, 3, 4, 5, 6, 7, 890_000_000, time.UTC)
	f.fns[c.Name] = c
	f.code[c.Name] = zip
	return c.Clone()
}

func (f *fakeAPI) CreateFunction(ctx context.Context, cfg *function.Config, zip []byte) (*function.Config, error) {
	f.mu.Lock()
	if err := f.enter("CreateFunction"); err != nil {
		f.mu.Unlock()
		return nil, err
	}
	_, exists := f.fns[cfg.Name]
	f.mu.Unlock()
	if exists {
		return nil, fmt.Errorf("Function already exist: %s: %w", cfg.Name, errdefs.ErrAlreadyExists)
	}
	c := cfg.Clone()
	c.ApplyDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return f.put(c, zip), nil
}

func (f *fakeAPI) get(name string) (*function.Config, error) {
	c, ok := f.fns[name]
	if !ok {
		return nil, fmt.Errorf("Function not found: %s: %w", function.ARN("us-east-1", "000000000000", name), errdefs.ErrNotFound)
	}
	return c, nil
}

func (f *fakeAPI) GetFunction(ctx context.Context, name string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("GetFunction"); err != nil {
		return nil, err
	}
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	return c.Clone(), nil
}

func (f *fakeAPI) ListFunctions(ctx context.Context, marker string, max int) ([]*function.Config, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListFunctions"); err != nil {
		return nil, "", err
	}
	f.lastLimit = max
	names := make([]string, 0, len(f.fns))
	for n := range f.fns {
		if n > marker {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	next := ""
	if len(names) > max {
		names = names[:max]
		next = names[max-1]
	}
	out := make([]*function.Config, 0, len(names))
	for _, n := range names {
		out = append(out, f.fns[n].Clone())
	}
	return out, next, nil
}

func (f *fakeAPI) checkRevision(c *function.Config, revisionID string) error {
	f.lastRevision = revisionID
	if revisionID != "" && revisionID != c.RevisionID {
		return fmt.Errorf("The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id: %w", errdefs.ErrPreconditionFailed)
	}
	return nil
}

func (f *fakeAPI) UpdateFunctionCode(ctx context.Context, name string, zip []byte, revisionID string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("UpdateFunctionCode"); err != nil {
		return nil, err
	}
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	if err := f.checkRevision(c, revisionID); err != nil {
		return nil, err
	}
	c.CodeSha256, c.CodeSize, c.RevisionID = sha(zip), int64(len(zip)), f.nextRevision()
	f.code[name] = zip
	return c.Clone(), nil
}

func (f *fakeAPI) UpdateFunctionConfiguration(ctx context.Context, name string, upd *controlplane.ConfigUpdate, revisionID string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("UpdateFunctionConfiguration"); err != nil {
		return nil, err
	}
	f.lastUpdate = upd
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	if err := f.checkRevision(c, revisionID); err != nil {
		return nil, err
	}
	n := c.Clone()
	if upd.Timeout != nil {
		n.Timeout = *upd.Timeout
	}
	if upd.MemorySize != nil {
		n.MemorySize = *upd.MemorySize
	}
	if upd.Description != nil {
		n.Description = *upd.Description
	}
	if upd.Handler != nil {
		n.Handler = *upd.Handler
	}
	if upd.Environment != nil {
		n.Environment = *upd.Environment
	}
	if upd.SnapStart != nil {
		n.SnapStart.ApplyOn = *upd.SnapStart
	}
	if err := n.Validate(); err != nil {
		return nil, err
	}
	n.RevisionID = f.nextRevision()
	f.fns[name] = n
	return n.Clone(), nil
}

func (f *fakeAPI) DeleteFunction(ctx context.Context, name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("DeleteFunction"); err != nil {
		return err
	}
	if _, err := f.get(name); err != nil {
		return err
	}
	delete(f.fns, name)
	delete(f.code, name)
	return nil
}

func (f *fakeAPI) PutFunctionConcurrency(ctx context.Context, name string, n *int) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("PutFunctionConcurrency"); err != nil {
		return nil, err
	}
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	c.ReservedConcurrency = nil
	if n != nil {
		v := *n
		c.ReservedConcurrency = &v
	}
	return c.Clone(), nil
}

func (f *fakeAPI) FunctionCode(ctx context.Context, name, qualifier string) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("FunctionCode"); err != nil {
		return nil, err
	}
	f.lastCode = [2]string{name, qualifier}
	if qualifier != "" && qualifier != function.LatestVersion {
		if _, err := f.version(name, qualifier); err != nil {
			return nil, err
		}
		return bytes.Clone(f.code[name+":"+qualifier]), nil
	}
	if _, err := f.get(name); err != nil {
		return nil, err
	}
	return bytes.Clone(f.code[name]), nil
}

func (f *fakeAPI) version(name, q string) (*function.Config, error) {
	for _, v := range f.vers[name] {
		if v.Version == q {
			return v, nil
		}
	}
	return nil, fmt.Errorf("Function not found: %s:%s: %w", function.ARN("us-east-1", "000000000000", name), q, errdefs.ErrNotFound)
}

func (f *fakeAPI) PublishVersion(ctx context.Context, name string, in *controlplane.PublishInput) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("PublishVersion"); err != nil {
		return nil, err
	}
	f.lastPublish = in
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	if err := f.checkRevision(c, in.RevisionID); err != nil {
		return nil, err
	}
	if in.CodeSha256 != "" && in.CodeSha256 != c.CodeSha256 {
		return nil, errdefs.Invalid("CodeSHA256 (%s) is different from current CodeSHA256 in $LATEST (%s). Please try again with the CodeSHA256 in $LATEST.", in.CodeSha256, c.CodeSha256)
	}
	if vs := f.vers[name]; len(vs) > 0 && f.verSource[name+":"+vs[len(vs)-1].Version] == c.RevisionID {
		return vs[len(vs)-1].Clone(), nil
	}
	f.verLast[name]++
	v := c.Clone()
	v.Version = fmt.Sprint(f.verLast[name])
	v.RevisionID = f.nextRevision()
	if in.Description != "" {
		v.Description = in.Description
	}
	f.vers[name] = append(f.vers[name], v)
	f.verSource[name+":"+v.Version] = c.RevisionID
	f.code[name+":"+v.Version] = f.code[name]
	return v.Clone(), nil
}

// ListVersionsByFunction pages like the control plane: $LATEST first, then
// the versions; the marker is the last version listed.
func (f *fakeAPI) ListVersionsByFunction(ctx context.Context, name, marker string, max int) ([]*function.Config, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListVersionsByFunction"); err != nil {
		return nil, "", err
	}
	f.lastLimit = max
	c, err := f.get(name)
	if err != nil {
		return nil, "", err
	}
	all := append([]*function.Config{c}, f.vers[name]...)
	start := 0
	if marker != "" {
		start = -1
		for i, v := range all {
			if v.Version == marker {
				start = i + 1
			}
		}
		if start < 0 {
			return nil, "", errdefs.Invalid("unknown marker %q", marker)
		}
	}
	end := min(start+max, len(all))
	next := ""
	if end < len(all) {
		next = all[end-1].Version
	}
	out := make([]*function.Config, 0, end-start)
	for _, v := range all[start:end] {
		out = append(out, v.Clone())
	}
	return out, next, nil
}

func (f *fakeAPI) GetFunctionVersion(ctx context.Context, name, qualifier string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("GetFunctionVersion"); err != nil {
		return nil, err
	}
	if qualifier == "" || qualifier == function.LatestVersion {
		c, err := f.get(name)
		if err != nil {
			return nil, err
		}
		return c.Clone(), nil
	}
	v, err := f.version(name, qualifier)
	if err != nil {
		return nil, err
	}
	return v.Clone(), nil
}

func (f *fakeAPI) DeleteFunctionVersion(ctx context.Context, name, version string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("DeleteFunctionVersion"); err != nil {
		return err
	}
	f.lastDelete = [2]string{name, version}
	if version == function.LatestVersion {
		return errdefs.Invalid("$LATEST version cannot be deleted without deleting the function.")
	}
	if _, err := f.version(name, version); err != nil {
		return err
	}
	f.vers[name] = slices.DeleteFunc(f.vers[name], func(v *function.Config) bool { return v.Version == version })
	return nil
}

func (f *fakeAPI) Invoke(ctx context.Context, in *controlplane.InvokeInput) (*harness.InvokeResult, *function.Config, error) {
	f.mu.Lock()
	gate := f.gate
	f.mu.Unlock()
	if gate != nil {
		if err := gate(ctx); err != nil {
			return nil, nil, fmt.Errorf("invoking %s: %w", in.Function, err)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("Invoke"); err != nil {
		return nil, nil, err
	}
	f.lastInvoke = in
	c, err := f.get(in.Function)
	if err != nil {
		return nil, nil, err
	}
	if in.Qualifier != "" && in.Qualifier != function.LatestVersion {
		if c, err = f.version(in.Function, in.Qualifier); err != nil {
			return nil, nil, err
		}
	}
	res := &harness.InvokeResult{RequestID: in.RequestID, Payload: in.Payload}
	if f.invoke != nil {
		res = f.invoke(in)
	}
	return res, c.Clone(), nil
}

func (f *fakeAPI) InvokeAsync(ctx context.Context, in *controlplane.InvokeInput) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("InvokeAsync"); err != nil {
		return err
	}
	f.lastAsync = in
	_, err := f.get(in.Function)
	return err
}

func (f *fakeAPI) CheckInvoke(ctx context.Context, name, qualifier string) (*function.Config, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("CheckInvoke"); err != nil {
		return nil, err
	}
	f.lastCheck = [2]string{name, qualifier}
	c, err := f.get(name)
	if err != nil {
		return nil, err
	}
	return c.Clone(), nil
}

func (f *fakeAPI) GetInvocation(ctx context.Context, requestID string) (*invocation.Record, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("GetInvocation"); err != nil {
		return nil, err
	}
	rec, ok := f.records[requestID]
	if !ok {
		return nil, fmt.Errorf("invocation %s: %w", requestID, errdefs.ErrNotFound)
	}
	return rec, nil
}

func (f *fakeAPI) ListInvocations(ctx context.Context, fn string, limit int) ([]*invocation.Record, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListInvocations"); err != nil {
		return nil, err
	}
	f.lastLimit = limit
	var out []*invocation.Record
	for _, rec := range f.records {
		if rec.Function == fn {
			out = append(out, rec)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Start.After(out[j].Start) })
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

func (f *fakeAPI) ListRuntimes(ctx context.Context) ([]*runtimes.Runtime, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.enter("ListRuntimes"); err != nil {
		return nil, err
	}
	return f.runtimes, nil
}

// lockedBuffer is a log sink the server's goroutines and the test can share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// env is one frontend under test: the fake behind it, an HTTP server, the
// real AWS SDK client pointed at it and the captured log.
type env struct {
	fake   *fakeAPI
	srv    *httptest.Server
	sdk    *lambda.Client
	log    *lockedBuffer
	reg    *prometheus.Registry
	config Config
}

func newEnv(t *testing.T, mods ...func(*Config)) *env {
	t.Helper()
	e := &env{fake: newFake(), log: &lockedBuffer{}, reg: prometheus.NewRegistry()}
	e.config = Config{
		API:     e.fake,
		Logger:  slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Metrics: e.reg,
	}
	for _, m := range mods {
		m(&e.config)
	}
	e.srv = httptest.NewServer(New(e.config))
	t.Cleanup(e.srv.Close)
	e.sdk = lambda.New(lambda.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(e.srv.URL),
		Credentials:  credentials.NewStaticCredentialsProvider("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ""),
		Retryer:      aws.NopRetryer{},
		HTTPClient:   e.srv.Client(),
	})
	return e
}

// locked runs fn with the fake's lock held, for reading what it recorded.
func (f *fakeAPI) locked(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}

func (f *fakeAPI) setErr(err error) { f.locked(func() { f.err = err }) }

func (f *fakeAPI) setInvoke(fn func(in *controlplane.InvokeInput) *harness.InvokeResult) {
	f.locked(func() { f.invoke = fn })
}

func (f *fakeAPI) addRecord(rec *invocation.Record) {
	f.locked(func() { f.records[rec.RequestID] = rec })
}
