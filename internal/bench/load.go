package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// newHTTPClient returns the one client shape used against both systems, so
// that client-side costs are the same on both sides of every ratio:
// keep-alive connections, enough idle connections for the highest
// concurrency, no compression, no proxy.
func newHTTPClient(maxConc int) *http.Client {
	if maxConc < 2 {
		maxConc = 2
	}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        maxConc * 2,
			MaxIdleConnsPerHost: maxConc * 2,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
	}
}

// invoker sends invocations to one URL.
type invoker struct {
	http *http.Client
	url  string
}

// call is the outcome of one invocation as the client saw it.
type call struct {
	Start     time.Time
	TTFB      time.Duration // until the first byte of the response
	Total     time.Duration // until the whole body was read
	Status    int
	RequestID string
	FuncError string
	Body      []byte
	Err       error
}

// ok reports whether the call succeeded: a 2xx status without a function
// error, and, when want is set, a body containing want.
func (c call) ok(want []byte) bool {
	if c.Err != nil || c.Status < 200 || c.Status > 299 || c.FuncError != "" {
		return false
	}
	return want == nil || bytes.Contains(c.Body, want)
}

// describe is a one-line account of a failed call.
func (c call) describe() string {
	switch {
	case c.Err != nil:
		return c.Err.Error()
	case c.FuncError != "":
		return fmt.Sprintf("function error %s: %s", c.FuncError, truncate(string(c.Body), 120))
	default:
		return fmt.Sprintf("HTTP %d: %s", c.Status, truncate(strings.TrimSpace(string(c.Body)), 120))
	}
}

// invoke sends one invocation of type invType ("" leaves the header out,
// which both systems treat as RequestResponse).
func (iv *invoker) invoke(ctx context.Context, payload []byte, invType string) call {
	var c call
	var first time.Time
	trace := &httptrace.ClientTrace{GotFirstResponseByte: func() { first = time.Now() }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(ctx, trace), http.MethodPost, iv.url, bytes.NewReader(payload))
	if err != nil {
		c.Err = err
		return c
	}
	req.Header.Set("Content-Type", "application/json")
	if invType != "" {
		req.Header.Set("X-Amz-Invocation-Type", invType)
	}
	c.Start = time.Now()
	resp, err := iv.http.Do(req)
	if err != nil {
		c.Total = time.Since(c.Start)
		c.Err = err
		return c
	}
	c.Body, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	c.Total = time.Since(c.Start)
	if first.IsZero() {
		c.TTFB = c.Total
	} else {
		c.TTFB = first.Sub(c.Start)
	}
	c.Status = resp.StatusCode
	c.RequestID = resp.Header.Get("X-Amzn-Requestid")
	c.FuncError = resp.Header.Get("X-Amz-Function-Error")
	if err != nil {
		c.Err = fmt.Errorf("reading response: %w", err)
	}
	return c
}

// LoadResult is one closed-loop load run: Concurrency clients each send
// their next invocation as soon as the previous one answered.
type LoadResult struct {
	Concurrency int
	// Sent invocations; fewer than asked when the target died mid-run.
	Sent   int
	OK     int
	Errors int
	// Latency of the successful invocations (whole response read).
	Latency Summary
	Wall    time.Duration
	// PerSec is successful invocations per second of wall time.
	PerSec float64
	// FirstErrors are up to three distinct error descriptions, and
	// ErrorKinds counts every error by kind ("HTTP 400", "connection refused", ...).
	FirstErrors []string
	ErrorKinds  map[string]int
	// Died is set when the target process exited during the run.
	Died bool
	// lats are the successful invocations' latencies, kept for merging.
	lats []time.Duration
}

// mergeLoads combines two runs at the same concurrency (blocks of one
// measurement): counts add up, wall times add up, percentiles are those of
// all latencies together.
func mergeLoads(a, b LoadResult) LoadResult {
	m := LoadResult{
		Concurrency: max(a.Concurrency, b.Concurrency),
		Sent:        a.Sent + b.Sent,
		OK:          a.OK + b.OK,
		Errors:      a.Errors + b.Errors,
		Wall:        a.Wall + b.Wall,
		Died:        a.Died || b.Died,
		ErrorKinds:  map[string]int{},
		lats:        append(append([]time.Duration(nil), a.lats...), b.lats...),
	}
	for _, k := range []map[string]int{a.ErrorKinds, b.ErrorKinds} {
		for kind, n := range k {
			m.ErrorKinds[kind] += n
		}
	}
	for _, e := range append(append([]string(nil), a.FirstErrors...), b.FirstErrors...) {
		if len(m.FirstErrors) < 3 && !contains(m.FirstErrors, e) {
			m.FirstErrors = append(m.FirstErrors, e)
		}
	}
	m.Latency = Summarize(m.lats)
	if m.Wall > 0 {
		m.PerSec = float64(m.OK) / m.Wall.Seconds()
	}
	return m
}

// runLoad sends total invocations of payload from conc concurrent clients.
// want, if set, must appear in each response body. alive, if set, is asked
// after each failure; once it reports false the run stops (the target
// crashed) and the remaining invocations are not sent.
func runLoad(ctx context.Context, iv *invoker, conc, total int, payload, want []byte, alive func() bool) LoadResult {
	if conc < 1 {
		conc = 1
	}
	res := LoadResult{Concurrency: conc, ErrorKinds: map[string]int{}}
	var (
		next    atomic.Int64
		stopped atomic.Bool
		mu      sync.Mutex
		lats    = make([]time.Duration, 0, min(total, 1<<16))
	)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]time.Duration, 0, min(total/conc+1, 1<<14))
			defer func() {
				mu.Lock()
				lats = append(lats, local...)
				mu.Unlock()
			}()
			for !stopped.Load() && ctx.Err() == nil {
				if next.Add(1) > int64(total) {
					return
				}
				c := iv.invoke(ctx, payload, "")
				if c.ok(want) {
					local = append(local, c.Total)
					mu.Lock()
					res.Sent++
					res.OK++
					mu.Unlock()
					continue
				}
				if ctx.Err() != nil {
					return // cancelled: not the target's failure
				}
				mu.Lock()
				res.Sent++
				res.Errors++
				kind := errorKind(c)
				res.ErrorKinds[kind]++
				if len(res.FirstErrors) < 3 && !contains(res.FirstErrors, c.describe()) {
					res.FirstErrors = append(res.FirstErrors, c.describe())
				}
				mu.Unlock()
				if alive != nil && !alive() {
					stopped.Store(true)
					return
				}
			}
		}()
	}
	wg.Wait()
	res.Wall = time.Since(start)
	res.Died = stopped.Load()
	res.Latency = Summarize(lats)
	res.lats = lats
	if res.Wall > 0 {
		res.PerSec = float64(res.OK) / res.Wall.Seconds()
	}
	return res
}

// errorKind classifies a failed call for ErrorKinds.
func errorKind(c call) string {
	switch {
	case c.Err != nil:
		msg := c.Err.Error()
		for _, k := range []string{"connection refused", "connection reset", "EOF", "timeout", "broken pipe"} {
			if strings.Contains(msg, k) {
				return k
			}
		}
		return "transport error"
	case c.FuncError != "":
		return "function error"
	case c.Status >= 200 && c.Status <= 299:
		return "wrong body"
	default:
		return fmt.Sprintf("HTTP %d", c.Status)
	}
}

// kindsString renders ErrorKinds as "HTTP 400 x3, connection refused x1996".
func kindsString(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s x%d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}
