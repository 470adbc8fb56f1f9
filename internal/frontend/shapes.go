package frontend

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/invocation"
	"github.com/invokex/invokex/internal/runtimes"
)

// Lambda's JSON shapes, with Lambda's member names. Request shapes use
// pointers where "absent" and "zero" mean different things.

type environment struct {
	Variables map[string]string `json:"Variables"`
}

type ephemeralStorage struct {
	Size int `json:"Size"`
}

type tracingConfig struct {
	Mode string `json:"Mode"`
}

type loggingConfig struct {
	LogFormat string `json:"LogFormat"`
	LogGroup  string `json:"LogGroup"`
}

type snapStartResponse struct {
	ApplyOn            string `json:"ApplyOn"`
	OptimizationStatus string `json:"OptimizationStatus"`
}

// functionConfiguration is Lambda's FunctionConfiguration.
type functionConfiguration struct {
	FunctionName           string            `json:"FunctionName"`
	FunctionArn            string            `json:"FunctionArn"`
	Runtime                string            `json:"Runtime,omitempty"`
	Role                   string            `json:"Role"`
	Handler                string            `json:"Handler,omitempty"`
	CodeSize               int64             `json:"CodeSize"`
	CodeSha256             string            `json:"CodeSha256"`
	Description            string            `json:"Description"`
	Timeout                int               `json:"Timeout"`
	MemorySize             int               `json:"MemorySize"`
	LastModified           string            `json:"LastModified"`
	Version                string            `json:"Version"`
	Environment            *environment      `json:"Environment,omitempty"`
	State                  string            `json:"State,omitempty"`
	StateReason            string            `json:"StateReason,omitempty"`
	StateReasonCode        string            `json:"StateReasonCode,omitempty"`
	LastUpdateStatus       string            `json:"LastUpdateStatus,omitempty"`
	LastUpdateStatusReason string            `json:"LastUpdateStatusReason,omitempty"`
	PackageType            string            `json:"PackageType"`
	Architectures          []string          `json:"Architectures"`
	EphemeralStorage       ephemeralStorage  `json:"EphemeralStorage"`
	RevisionId             string            `json:"RevisionId"`
	TracingConfig          tracingConfig     `json:"TracingConfig"`
	LoggingConfig          loggingConfig     `json:"LoggingConfig"`
	SnapStart              snapStartResponse `json:"SnapStart"`
}

// toConfiguration renders cfg as Lambda's FunctionConfiguration. A
// published version's FunctionArn carries its number; $LATEST's is
// unqualified (toQualifiedConfiguration qualifies it).
func (s *Server) toConfiguration(cfg *function.Config) *functionConfiguration {
	arn := function.ARN(s.cfg.Region, s.cfg.Account, cfg.Name)
	if cfg.Version != "" && cfg.Version != function.LatestVersion {
		arn += ":" + cfg.Version
	}
	out := &functionConfiguration{
		FunctionName:           cfg.Name,
		FunctionArn:            arn,
		Runtime:                cfg.Runtime,
		Role:                   cfg.Role,
		Handler:                cfg.Handler,
		CodeSize:               cfg.CodeSize,
		CodeSha256:             cfg.CodeSha256,
		Description:            cfg.Description,
		Timeout:                cfg.Timeout,
		MemorySize:             cfg.MemorySize,
		Version:                cfg.Version,
		State:                  string(cfg.State),
		StateReason:            cfg.StateReason,
		StateReasonCode:        cfg.StateReasonCode,
		LastUpdateStatus:       string(cfg.LastUpdateStatus),
		LastUpdateStatusReason: cfg.LastUpdateStatusReason,
		PackageType:            "Zip",
		Architectures:          cfg.Architectures,
		EphemeralStorage:       ephemeralStorage{Size: cfg.EphemeralStorage},
		RevisionId:             cfg.RevisionID,
		TracingConfig:          tracingConfig{Mode: "PassThrough"},
		LoggingConfig:          loggingConfig{LogFormat: "Text", LogGroup: "/aws/lambda/" + cfg.Name},
		SnapStart:              toSnapStart(cfg),
	}
	if out.Role == "" {
		// Lambda always shows a role; InvokeX has no IAM, so it shows a
		// placeholder rather than an empty string SDK users may parse.
		out.Role = fmt.Sprintf("arn:aws:iam::%s:role/invokex", s.cfg.Account)
	}
	if !cfg.LastModified.IsZero() {
		out.LastModified = function.FormatTime(cfg.LastModified)
	}
	if out.Version == "" {
		out.Version = function.LatestVersion
	}
	if len(out.Architectures) == 0 {
		out.Architectures = []string{"x86_64"}
	}
	if len(cfg.Environment) > 0 {
		out.Environment = &environment{Variables: cfg.Environment}
	}
	return out
}

// toQualifiedConfiguration is toConfiguration with the FunctionArn
// qualified even for $LATEST (NAME:$LATEST), as Lambda shows it when the
// request named a qualifier and in ListVersionsByFunction.
func (s *Server) toQualifiedConfiguration(cfg *function.Config) *functionConfiguration {
	out := s.toConfiguration(cfg)
	if out.Version == function.LatestVersion {
		out.FunctionArn += ":" + function.LatestVersion
	}
	return out
}

// toSnapStart renders the SnapStart setting: OptimizationStatus is On only
// for a published version restored from its snapshot, never for $LATEST.
func toSnapStart(cfg *function.Config) snapStartResponse {
	out := snapStartResponse{ApplyOn: string(cfg.SnapStart.ApplyOn), OptimizationStatus: string(function.OptimizationOff)}
	if out.ApplyOn == "" {
		out.ApplyOn = string(function.SnapStartNone)
	}
	if cfg.Version != "" && cfg.Version != function.LatestVersion && cfg.SnapStart.On() {
		out.OptimizationStatus = string(function.OptimizationOn)
	}
	return out
}

// functionCodeLocation is GetFunction's Code member.
type functionCodeLocation struct {
	RepositoryType string `json:"RepositoryType"`
	Location       string `json:"Location"`
}

type concurrency struct {
	ReservedConcurrentExecutions *int `json:"ReservedConcurrentExecutions,omitempty"`
}

type getFunctionOutput struct {
	Configuration *functionConfiguration `json:"Configuration"`
	Code          functionCodeLocation   `json:"Code"`
	Tags          map[string]string      `json:"Tags,omitempty"`
	Concurrency   *concurrency           `json:"Concurrency,omitempty"`
}

type listFunctionsOutput struct {
	Functions  []*functionConfiguration `json:"Functions"`
	NextMarker string                   `json:"NextMarker,omitempty"`
}

// codeInput is CreateFunction's Code member. Only ZipFile is supported; the
// others are decoded so that using them is an explicit error rather than a
// function silently created without code.
type codeInput struct {
	ZipFile         []byte `json:"ZipFile"`
	S3Bucket        string `json:"S3Bucket"`
	S3Key           string `json:"S3Key"`
	S3ObjectVersion string `json:"S3ObjectVersion"`
	ImageUri        string `json:"ImageUri"`
}

type ephemeralStorageInput struct {
	Size *int `json:"Size"`
}

type environmentInput struct {
	Variables map[string]string `json:"Variables"`
}

// snapStartInput is the SnapStart member of CreateFunction and
// UpdateFunctionConfiguration; an absent ApplyOn means None.
type snapStartInput struct {
	ApplyOn *string `json:"ApplyOn"`
}

func (in *snapStartInput) applyOn() function.SnapStartApplyOn {
	if in == nil || in.ApplyOn == nil {
		return function.SnapStartNone
	}
	return function.SnapStartApplyOn(*in.ApplyOn)
}

// publishVersionInput is PublishVersion's request body.
type publishVersionInput struct {
	CodeSha256  string `json:"CodeSha256"`
	Description string `json:"Description"`
	RevisionId  string `json:"RevisionId"`
}

type listVersionsOutput struct {
	Versions   []*functionConfiguration `json:"Versions"`
	NextMarker string                   `json:"NextMarker,omitempty"`
}

// createFunctionInput is CreateFunction's request body. Members InvokeX
// does not implement (VpcConfig, DeadLetterConfig, ...) are ignored, as
// unknown members are; Layers are refused because ignoring them would
// create a function that cannot find its dependencies.
type createFunctionInput struct {
	FunctionName     string                 `json:"FunctionName"`
	Runtime          string                 `json:"Runtime"`
	Role             string                 `json:"Role"`
	Handler          string                 `json:"Handler"`
	Code             *codeInput             `json:"Code"`
	Description      string                 `json:"Description"`
	Timeout          *int                   `json:"Timeout"`
	MemorySize       *int                   `json:"MemorySize"`
	Environment      *environmentInput      `json:"Environment"`
	EphemeralStorage *ephemeralStorageInput `json:"EphemeralStorage"`
	Architectures    []string               `json:"Architectures"`
	PackageType      string                 `json:"PackageType"`
	Publish          bool                   `json:"Publish"`
	Tags             map[string]string      `json:"Tags"`
	Layers           []string               `json:"Layers"`
	SnapStart        *snapStartInput        `json:"SnapStart"`
}

type updateFunctionCodeInput struct {
	ZipFile         []byte   `json:"ZipFile"`
	S3Bucket        string   `json:"S3Bucket"`
	S3Key           string   `json:"S3Key"`
	S3ObjectVersion string   `json:"S3ObjectVersion"`
	ImageUri        string   `json:"ImageUri"`
	RevisionId      string   `json:"RevisionId"`
	Publish         bool     `json:"Publish"`
	DryRun          bool     `json:"DryRun"`
	Architectures   []string `json:"Architectures"`
}

// updateFunctionConfigurationInput decodes into pointers so that only the
// members the client sent change.
type updateFunctionConfigurationInput struct {
	Runtime          *string                `json:"Runtime"`
	Handler          *string                `json:"Handler"`
	Role             *string                `json:"Role"`
	Description      *string                `json:"Description"`
	Timeout          *int                   `json:"Timeout"`
	MemorySize       *int                   `json:"MemorySize"`
	EphemeralStorage *ephemeralStorageInput `json:"EphemeralStorage"`
	Environment      *environmentInput      `json:"Environment"`
	RevisionId       string                 `json:"RevisionId"`
	Layers           []string               `json:"Layers"`
	SnapStart        *snapStartInput        `json:"SnapStart"`
}

type putConcurrencyInput struct {
	ReservedConcurrentExecutions *int `json:"ReservedConcurrentExecutions"`
}

// invocationRecord is InvokeX's JSON form of an invocation.Record.
type invocationRecord struct {
	RequestId       string  `json:"RequestId"`
	Function        string  `json:"Function"`
	RevisionId      string  `json:"RevisionId"`
	Version         string  `json:"Version"`
	Type            string  `json:"Type"`
	Status          string  `json:"Status"`
	ErrorType       string  `json:"ErrorType,omitempty"`
	ErrorMessage    string  `json:"ErrorMessage,omitempty"`
	Attempts        int     `json:"Attempts"`
	Cold            bool    `json:"Cold"`
	Start           string  `json:"Start,omitempty"`
	End             string  `json:"End,omitempty"`
	InitDurationMs  float64 `json:"InitDurationMs"`
	DurationMs      float64 `json:"DurationMs"`
	MaxMemoryUsedMB int     `json:"MaxMemoryUsedMB"`
	LogBytes        int64   `json:"LogBytes"`
	Log             string  `json:"Log"`
}

func toRecord(rec *invocation.Record) *invocationRecord {
	return &invocationRecord{
		RequestId:       rec.RequestID,
		Function:        rec.Function,
		RevisionId:      rec.RevisionID,
		Version:         rec.Version,
		Type:            string(rec.Type),
		Status:          string(rec.Status),
		ErrorType:       rec.ErrorType,
		ErrorMessage:    rec.ErrorMessage,
		Attempts:        rec.Attempts,
		Cold:            rec.Cold,
		Start:           formatRecordTime(rec.Start),
		End:             formatRecordTime(rec.End),
		InitDurationMs:  millis(rec.InitDuration),
		DurationMs:      millis(rec.Duration),
		MaxMemoryUsedMB: rec.MaxMemoryMB,
		LogBytes:        rec.LogBytes,
		Log:             string(rec.Log),
	}
}

// formatRecordTime leaves a zero time (a queued invocation has no End)
// out rather than sending year 1.
func formatRecordTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

type runtimeInfo struct {
	Id            string `json:"Id"`
	Family        string `json:"Family"`
	Available     bool   `json:"Available"`
	Reason        string `json:"Reason,omitempty"`
	HandlerFormat string `json:"HandlerFormat"`
}

func toRuntimeInfo(rt *runtimes.Runtime) runtimeInfo {
	return runtimeInfo{Id: rt.ID, Family: string(rt.Family), Available: rt.Available,
		Reason: rt.Reason, HandlerFormat: rt.HandlerFormat}
}

// readBody reads at most limit bytes of the request body. A larger body is
// ErrTooLarge; it is refused by its Content-Length before anything is read
// when the client declared one.
func readBody(w http.ResponseWriter, r *http.Request, limit int64, tooLarge string) ([]byte, error) {
	if r.ContentLength > limit {
		return nil, fmt.Errorf("%s: %w", tooLarge, errdefs.ErrTooLarge)
	}
	// MaxBytesReader also tells the server to close the connection instead
	// of draining an oversized body.
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, fmt.Errorf("%s: %w", tooLarge, errdefs.ErrTooLarge)
		}
		return nil, fmt.Errorf("reading request body: %w", err)
	}
	return b, nil
}

// decodeJSON reads a JSON request body of at most limit bytes into v.
// Unknown members are ignored, as Lambda ignores members it does not know.
func decodeJSON(w http.ResponseWriter, r *http.Request, limit int64, op string, v any) error {
	b, err := readBody(w, r, limit, fmt.Sprintf("Request must be smaller than %d bytes for the %s operation", limit, op))
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("Could not parse request body into json: %s: %w", jsonErrorText(err), errdefs.ErrInvalidRequestContent)
	}
	return nil
}

// jsonErrorText describes a decoding error without echoing the body.
func jsonErrorText(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	var be base64.CorruptInputError
	switch {
	case errors.As(err, &be):
		return fmt.Sprintf("a blob member is not valid base64 (at byte %d)", int64(be))
	case errors.As(err, &se):
		return fmt.Sprintf("syntax error at offset %d", se.Offset)
	case errors.As(err, &te):
		return fmt.Sprintf("member %s must be %s, not %s", te.Field, te.Type, te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF) || err.Error() == "unexpected end of JSON input":
		return "unexpected end of input"
	default:
		return "malformed request body"
	}
}

// writeJSON sends v with status.
func writeJSON(w http.ResponseWriter, status int, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding response: %w", err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	// The status is sent: a failed write (client gone) cannot be reported
	// and no error may be written over it.
	_, _ = w.Write(b)
	return nil
}
