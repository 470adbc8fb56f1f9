// Package function holds a Lambda function's configuration as InvokeX stores
// and runs it, and the rules that every configuration must satisfy. It is the
// vocabulary shared by the frontend (which converts Lambda's JSON shapes to
// and from Config), the control plane (which stores it) and the harness
// (which runs a Config's code).
package function

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
)

// State is Lambda's function State.
type State string

const (
	StatePending  State = "Pending"
	StateActive   State = "Active"
	StateInactive State = "Inactive"
	StateFailed   State = "Failed"
)

// UpdateStatus is Lambda's LastUpdateStatus.
type UpdateStatus string

const (
	UpdateInProgress UpdateStatus = "InProgress"
	UpdateSuccessful UpdateStatus = "Successful"
	UpdateFailed     UpdateStatus = "Failed"
)

// LatestVersion is the only version InvokeX serves until versions land.
const LatestVersion = "$LATEST"

// Limits and defaults, as Lambda documents them.
const (
	DefaultTimeout    = 3   // seconds
	MaxTimeout        = 900 // seconds
	DefaultMemory     = 128 // MB
	MinMemory         = 128
	MaxMemory         = 10240
	DefaultEphemeral  = 512 // MB
	MinEphemeral      = 512
	MaxEphemeral      = 10240
	MaxEnvironmentLen = 4096 // bytes of all keys and values together
	MaxNameLen        = 64
	MaxDescriptionLen = 256
	MaxHandlerLen     = 128
)

// Config is one function's configuration at one revision. Values are copied
// between packages, never shared: callers that keep a Config must Clone it.
type Config struct {
	Name             string
	Runtime          string
	Handler          string
	Role             string
	Description      string
	Timeout          int // seconds
	MemorySize       int // MB
	EphemeralStorage int // MB
	Environment      map[string]string
	Architectures    []string
	Tags             map[string]string

	// CodeSha256 is the base64 SHA-256 of the deployment package, as Lambda
	// shows it; the blob store keys code by it.
	CodeSha256 string
	CodeSize   int64

	// RevisionID changes on every change of code or configuration.
	RevisionID string
	Version    string

	State                  State
	StateReason            string
	StateReasonCode        string
	LastUpdateStatus       UpdateStatus
	LastUpdateStatusReason string
	LastModified           time.Time

	// ReservedConcurrency caps concurrent executions; nil means unreserved
	// (the server-wide default cap applies); 0 throttles every invocation.
	ReservedConcurrency *int
}

// Clone returns a deep copy.
func (c *Config) Clone() *Config {
	if c == nil {
		return nil
	}
	n := *c
	n.Environment = cloneMap(c.Environment)
	n.Tags = cloneMap(c.Tags)
	n.Architectures = append([]string(nil), c.Architectures...)
	if c.ReservedConcurrency != nil {
		v := *c.ReservedConcurrency
		n.ReservedConcurrency = &v
	}
	return &n
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	n := make(map[string]string, len(m))
	for k, v := range m {
		n[k] = v
	}
	return n
}

// ARN returns the function's ARN in the given region and account.
func ARN(region, account, name string) string {
	return fmt.Sprintf("arn:aws:lambda:%s:%s:function:%s", region, account, name)
}

// ApplyDefaults fills zero fields with Lambda's defaults.
func (c *Config) ApplyDefaults() {
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MemorySize == 0 {
		c.MemorySize = DefaultMemory
	}
	if c.EphemeralStorage == 0 {
		c.EphemeralStorage = DefaultEphemeral
	}
	if len(c.Architectures) == 0 {
		c.Architectures = []string{"x86_64"}
	}
	if c.Version == "" {
		c.Version = LatestVersion
	}
}

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// arnRE matches full and partial function ARNs:
// arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER], ACCOUNT:function:NAME.
var arnRE = regexp.MustCompile(`^(?:arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]+:)?(?:\d{12}:)?function:([a-zA-Z0-9_-]{1,64})(?::(\$LATEST|[a-zA-Z0-9_-]+))?$`)

// ParseName accepts a function name, a full ARN or a partial ARN (as Lambda's
// FunctionName parameter does) and returns the bare name and the qualifier
// embedded in an ARN, if any. Anything else, including path tricks such as
// "../x", is ErrInvalidParameter.
func ParseName(s string) (name, qualifier string, err error) {
	if nameRE.MatchString(s) {
		return s, "", nil
	}
	if m := arnRE.FindStringSubmatch(s); m != nil {
		return m[1], m[2], nil
	}
	return "", "", errdefs.Invalid("1 validation error detected: Value '%s' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?", truncate(s, 140))
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// reservedEnv are the variables Lambda sets itself; users may not set them.
var reservedEnv = map[string]bool{
	"_HANDLER": true, "_X_AMZN_TRACE_ID": true, "AWS_REGION": true, "AWS_EXECUTION_ENV": true,
	"AWS_LAMBDA_FUNCTION_NAME": true, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": true,
	"AWS_LAMBDA_FUNCTION_VERSION": true, "AWS_LAMBDA_INITIALIZATION_TYPE": true,
	"AWS_LAMBDA_LOG_GROUP_NAME": true, "AWS_LAMBDA_LOG_STREAM_NAME": true,
	"AWS_ACCESS_KEY": true, "AWS_ACCESS_KEY_ID": true, "AWS_SECRET_ACCESS_KEY": true,
	"AWS_SESSION_TOKEN": true, "AWS_LAMBDA_RUNTIME_API": true, "LAMBDA_TASK_ROOT": true,
	"LAMBDA_RUNTIME_DIR": true, "AWS_DEFAULT_REGION": true,
}

// IsReservedEnv reports whether key is set by the platform and may not be
// set by a function's configuration.
func IsReservedEnv(key string) bool { return reservedEnv[key] }

var envKeyRE = regexp.MustCompile(`^[a-zA-Z]([a-zA-Z0-9_])*$`)

// Validate checks every field a caller can set. It does not check that the
// runtime exists (the runtimes DB does) nor the code (package codezip does).
// Errors are ErrInvalidParameter with Lambda-style messages.
func (c *Config) Validate() error {
	if !nameRE.MatchString(c.Name) {
		_, _, err := ParseName(c.Name)
		if err == nil {
			err = errdefs.Invalid("function name %q must be 1-64 characters of [a-zA-Z0-9-_]", c.Name)
		}
		return err
	}
	if c.Timeout < 1 || c.Timeout > MaxTimeout {
		return errdefs.Invalid("1 validation error detected: Value '%d' at 'timeout' failed to satisfy constraint: Member must have value between 1 and %d", c.Timeout, MaxTimeout)
	}
	if c.MemorySize < MinMemory || c.MemorySize > MaxMemory {
		return errdefs.Invalid("1 validation error detected: Value '%d' at 'memorySize' failed to satisfy constraint: Member must have value between %d and %d", c.MemorySize, MinMemory, MaxMemory)
	}
	if c.EphemeralStorage < MinEphemeral || c.EphemeralStorage > MaxEphemeral {
		return errdefs.Invalid("1 validation error detected: Value '%d' at 'ephemeralStorage.size' failed to satisfy constraint: Member must have value between %d and %d", c.EphemeralStorage, MinEphemeral, MaxEphemeral)
	}
	if len(c.Description) > MaxDescriptionLen {
		return errdefs.Invalid("description must be at most %d characters", MaxDescriptionLen)
	}
	if len(c.Handler) > MaxHandlerLen || strings.ContainsAny(c.Handler, "\x00\n") {
		return errdefs.Invalid("handler must be at most %d characters without control characters", MaxHandlerLen)
	}
	for _, a := range c.Architectures {
		if a != "x86_64" {
			return errdefs.Invalid("architecture %q is not supported on this host (supported: x86_64)", a)
		}
	}
	if len(c.Architectures) > 1 {
		return errdefs.Invalid("at most one architecture may be given")
	}
	return ValidateEnvironment(c.Environment)
}

// ValidateEnvironment checks variable names, reserved keys and the 4 KB cap.
func ValidateEnvironment(env map[string]string) error {
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	total := 0
	for _, k := range keys {
		if !envKeyRE.MatchString(k) {
			return errdefs.Invalid("environment variable name %q is invalid: it must start with a letter and contain only letters, digits and underscores", k)
		}
		if IsReservedEnv(k) {
			return errdefs.Invalid("Lambda was unable to configure your environment variables because the environment variables you have provided contains reserved keys that are currently not supported for modification. Reserved keys used in this request: %s", k)
		}
		if strings.ContainsRune(env[k], 0) {
			return errdefs.Invalid("environment variable %s contains a NUL byte", k)
		}
		total += len(k) + len(env[k])
	}
	if total > MaxEnvironmentLen {
		return errdefs.Invalid("Lambda was unable to configure your environment variables because the environment variables you have provided exceeded the 4KB limit. String measured: %d bytes", total)
	}
	return nil
}

// FormatTime formats t as Lambda's LastModified.
func FormatTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000-0700")
}
