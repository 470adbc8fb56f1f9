// Package client is the InvokeX CLI's HTTP client. It speaks Lambda's own
// management and Invoke APIs (the same paths and JSON the AWS SDKs use) plus
// InvokeX's /invokex/v1 extras, and turns Lambda-style error responses into
// *APIError values whose text is one clear line.
package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Client talks to one InvokeX endpoint. Safe for concurrent use.
type Client struct {
	Endpoint string
	HTTP     *http.Client
}

// New returns a client for endpoint (e.g. "http://127.0.0.1:9000").
func New(endpoint string) *Client {
	return &Client{Endpoint: strings.TrimRight(endpoint, "/"), HTTP: &http.Client{}}
}

// APIError is an error response of the server: Lambda's exception name and message.
type APIError struct {
	Status  int
	Type    string
	Message string
}

func (e *APIError) Error() string {
	if e.Type == "" {
		return fmt.Sprintf("HTTP %d: %s", e.Status, e.Message)
	}
	return e.Type + ": " + e.Message
}

// FunctionConfiguration is the subset of Lambda's shape the CLI shows.
type FunctionConfiguration struct {
	FunctionName     string
	FunctionArn      string
	Runtime          string
	Handler          string
	CodeSize         int64
	CodeSha256       string
	Description      string
	Timeout          int
	MemorySize       int
	LastModified     string
	Version          string
	State            string
	LastUpdateStatus string
	RevisionId       string
	Environment      *struct{ Variables map[string]string } `json:",omitempty"`
}

// CreateInput is CreateFunction's body.
type CreateInput struct {
	FunctionName string
	Runtime      string
	Handler      string `json:",omitempty"`
	Description  string `json:",omitempty"`
	Timeout      int    `json:",omitempty"`
	MemorySize   int    `json:",omitempty"`
	Environment  *Env   `json:",omitempty"`
	Code         struct{ ZipFile []byte }
}

// Env is Lambda's Environment shape.
type Env struct{ Variables map[string]string }

// ConfigInput is UpdateFunctionConfiguration's body; nil fields are unchanged.
type ConfigInput struct {
	Runtime     *string `json:",omitempty"`
	Handler     *string `json:",omitempty"`
	Description *string `json:",omitempty"`
	Timeout     *int    `json:",omitempty"`
	MemorySize  *int    `json:",omitempty"`
	Environment *Env    `json:",omitempty"`
}

// Progress is called while a request body is uploaded.
type Progress func(sent, total int64)

// CreateFunction uploads a new function.
func (c *Client) CreateFunction(ctx context.Context, in *CreateInput, p Progress) (*FunctionConfiguration, error) {
	var out FunctionConfiguration
	return &out, c.doJSON(ctx, http.MethodPost, "/2015-03-31/functions", in, &out, p)
}

// UpdateFunctionCode replaces a function's code.
func (c *Client) UpdateFunctionCode(ctx context.Context, name string, zip []byte, p Progress) (*FunctionConfiguration, error) {
	var out FunctionConfiguration
	body := struct{ ZipFile []byte }{zip}
	return &out, c.doJSON(ctx, http.MethodPut, "/2015-03-31/functions/"+url.PathEscape(name)+"/code", body, &out, p)
}

// UpdateFunctionConfiguration changes the given fields.
func (c *Client) UpdateFunctionConfiguration(ctx context.Context, name string, in *ConfigInput) (*FunctionConfiguration, error) {
	var out FunctionConfiguration
	return &out, c.doJSON(ctx, http.MethodPut, "/2015-03-31/functions/"+url.PathEscape(name)+"/configuration", in, &out, nil)
}

// GetFunctionConfiguration returns a function's configuration.
func (c *Client) GetFunctionConfiguration(ctx context.Context, name string) (*FunctionConfiguration, error) {
	var out FunctionConfiguration
	return &out, c.doJSON(ctx, http.MethodGet, "/2015-03-31/functions/"+url.PathEscape(name)+"/configuration", nil, &out, nil)
}

// ListFunctions returns every function, following pagination.
func (c *Client) ListFunctions(ctx context.Context) ([]FunctionConfiguration, error) {
	var all []FunctionConfiguration
	marker := ""
	for {
		q := url.Values{"MaxItems": {"50"}}
		if marker != "" {
			q.Set("Marker", marker)
		}
		var page struct {
			Functions  []FunctionConfiguration
			NextMarker string
		}
		if err := c.doJSON(ctx, http.MethodGet, "/2015-03-31/functions/?"+q.Encode(), nil, &page, nil); err != nil {
			return nil, err
		}
		all = append(all, page.Functions...)
		if page.NextMarker == "" {
			return all, nil
		}
		marker = page.NextMarker
	}
}

// DeleteFunction removes a function.
func (c *Client) DeleteFunction(ctx context.Context, name string) error {
	return c.doJSON(ctx, http.MethodDelete, "/2015-03-31/functions/"+url.PathEscape(name), nil, nil, nil)
}

// InvokeOutput is what Invoke returned.
type InvokeOutput struct {
	StatusCode      int
	Payload         []byte
	FunctionError   string
	LogResult       string // decoded X-Amz-Log-Result
	ExecutedVersion string
	RequestID       string
}

// Invoke calls a function. invocationType is "RequestResponse", "Event" or
// "DryRun"; tail asks for the last 4 KB of the log.
func (c *Client) Invoke(ctx context.Context, name string, payload []byte, invocationType string, tail bool) (*InvokeOutput, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.Endpoint+"/2015-03-31/functions/"+url.PathEscape(name)+"/invocations", bytes.NewReader(payload))
	if err != nil {
		return nil, err
	}
	req.Header.Set("X-Amz-Invocation-Type", invocationType)
	if tail {
		req.Header.Set("X-Amz-Log-Type", "Tail")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode >= 300 {
		return nil, decodeError(resp, body)
	}
	out := &InvokeOutput{
		StatusCode:      resp.StatusCode,
		Payload:         body,
		FunctionError:   resp.Header.Get("X-Amz-Function-Error"),
		ExecutedVersion: resp.Header.Get("X-Amz-Executed-Version"),
		RequestID:       resp.Header.Get("X-Amzn-Requestid"),
	}
	if lr := resp.Header.Get("X-Amz-Log-Result"); lr != "" {
		b, err := base64.StdEncoding.DecodeString(lr)
		if err != nil {
			return nil, fmt.Errorf("decoding X-Amz-Log-Result: %w", err)
		}
		out.LogResult = string(b)
	}
	return out, nil
}

// Invocation is InvokeX's record of one invocation.
type Invocation struct {
	RequestId       string
	Function        string
	RevisionId      string
	Version         string
	Type            string
	Status          string
	ErrorType       string
	ErrorMessage    string
	Attempts        int
	Cold            bool
	Start           time.Time
	End             time.Time
	InitDurationMs  float64
	DurationMs      float64
	MaxMemoryUsedMB int
	LogBytes        int64
	Log             string
}

// GetInvocation returns the record of one invocation.
func (c *Client) GetInvocation(ctx context.Context, requestID string) (*Invocation, error) {
	var out Invocation
	return &out, c.doJSON(ctx, http.MethodGet, "/invokex/v1/invocations/"+url.PathEscape(requestID), nil, &out, nil)
}

// ListInvocations returns a function's newest invocation records, newest first.
func (c *Client) ListInvocations(ctx context.Context, name string, limit int) ([]Invocation, error) {
	var out struct{ Invocations []Invocation }
	p := "/invokex/v1/functions/" + url.PathEscape(name) + "/invocations?limit=" + strconv.Itoa(limit)
	return out.Invocations, c.doJSON(ctx, http.MethodGet, p, nil, &out, nil)
}

// Runtime is one row of the runtimes DB.
type Runtime struct {
	Id            string
	Family        string
	Available     bool
	Reason        string
	HandlerFormat string
}

// ListRuntimes returns the runtimes DB.
func (c *Client) ListRuntimes(ctx context.Context) ([]Runtime, error) {
	var out struct{ Runtimes []Runtime }
	return out.Runtimes, c.doJSON(ctx, http.MethodGet, "/invokex/v1/runtimes", nil, &out, nil)
}

// Healthy reports whether the server answers its health check.
func (c *Client) Healthy(ctx context.Context) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Endpoint+"/healthz", nil)
	if err != nil {
		return false
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (c *Client) doJSON(ctx context.Context, method, path string, in, out any, p Progress) error {
	var body io.Reader
	var size int64
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encoding request: %w", err)
		}
		size = int64(len(b))
		body = bytes.NewReader(b)
		if p != nil {
			body = &progressReader{r: body, total: size, fn: p}
		}
	}
	req, err := http.NewRequestWithContext(ctx, method, c.Endpoint+path, body)
	if err != nil {
		return err
	}
	if in != nil {
		req.ContentLength = size
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode >= 300 {
		return decodeError(resp, b)
	}
	if out == nil || len(b) == 0 {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("decoding response: %w", err)
	}
	return nil
}

func decodeError(resp *http.Response, body []byte) error {
	e := &APIError{Status: resp.StatusCode, Type: resp.Header.Get("X-Amzn-Errortype")}
	var doc struct {
		Message  string `json:"message"`
		Message2 string `json:"Message"`
	}
	if json.Unmarshal(body, &doc) == nil {
		e.Message = doc.Message
		if e.Message == "" {
			e.Message = doc.Message2
		}
	}
	if e.Message == "" {
		e.Message = strings.TrimSpace(string(body))
		if len(e.Message) > 200 {
			e.Message = e.Message[:200] + "..."
		}
	}
	if i := strings.IndexByte(e.Type, ':'); i >= 0 {
		e.Type = e.Type[:i]
	}
	return e
}

type progressReader struct {
	r     io.Reader
	sent  int64
	total int64
	fn    Progress
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.sent += int64(n)
	p.fn(p.sent, p.total)
	return n, err
}
