// Package function holds a Lambda function's configuration as InvokeX stores
// and runs it, and the rules that every configuration must satisfy. It is the
// vocabulary shared by the frontend (which converts Lambda's JSON shapes to
// and from Config), the control plane (which stores it) and the harness
// (which runs a Config's code).
package function

import (
	"errors"
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

// LatestVersion is the qualifier of a function's unpublished, mutable
// configuration; published versions are numbered "1", "2", ...
const LatestVersion = "$LATEST"

// SnapStartApplyOn is Lambda's SnapStart.ApplyOn: whether publishing a
// version snapshots its initialised execution environment.
type SnapStartApplyOn string

const (
	SnapStartNone              SnapStartApplyOn = "None"
	SnapStartPublishedVersions SnapStartApplyOn = "PublishedVersions"
)

// OptimizationStatus is Lambda's SnapStart.OptimizationStatus: whether
// invocations of a published version restore from its snapshot.
type OptimizationStatus string

const (
	OptimizationOn  OptimizationStatus = "On"
	OptimizationOff OptimizationStatus = "Off"
)

// SnapStart is a configuration's SnapStart setting. ApplyOn is what the
// user set on $LATEST and published versions copy; OptimizationStatus is
// On only on a published version whose snapshot every host has taken
// ($LATEST is always Off, as on Lambda). Empty values read as None and Off.
type SnapStart struct {
	ApplyOn            SnapStartApplyOn
	OptimizationStatus OptimizationStatus
}

// Enabled reports whether publishing a version of this configuration takes
// a snapshot.
func (s SnapStart) Enabled() bool { return s.ApplyOn == SnapStartPublishedVersions }

// On reports whether invocations restore from a snapshot.
func (s SnapStart) On() bool { return s.OptimizationStatus == OptimizationOn }

// ErrInitFailed marks an error as the function's own INIT phase failing
// (its runtime exited, reported an init error or overran the init
// timeout) rather than the platform's. A harness wraps it with a message
// meant for the function's owner, e.g. when taking a SnapStart snapshot;
// it is not an errdefs kind and never reaches the frontend as one.
var ErrInitFailed = errors.New("function initialization failed")

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

	// RevisionID changes on every change of code or configuration. Every
	// published version has its own, distinct from every $LATEST revision,
	// so that a host never serves two versions from one pool of instances.
	RevisionID string
	// Version is LatestVersion or a published version's number.
	Version string

	SnapStart SnapStart

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

// QualifiedARN returns the ARN of one version (or alias) of the function;
// an empty qualifier gives the unqualified ARN.
func QualifiedARN(region, account, name, qualifier string) string {
	if qualifier == "" {
		return ARN(region, account, name)
	}
	return ARN(region, account, name) + ":" + qualifier
}

// MaxVersion bounds published version numbers (Lambda's are 1 to 2^63-1
// in principle; nothing publishes that many).
const MaxVersion = 1<<53 - 1

// ParseVersion returns the number of a published version qualifier: a
// decimal number from 1 to MaxVersion without leading zeros ("1", "42").
// ok is false for $LATEST, aliases and anything else.
func ParseVersion(q string) (n int64, ok bool) {
	if q == "" || len(q) > 16 || q[0] == '0' {
		return 0, false
	}
	for i := 0; i < len(q); i++ {
		if q[i] < '0' || q[i] > '9' {
			return 0, false
		}
		n = n*10 + int64(q[i]-'0')
	}
	if n > MaxVersion {
		return 0, false
	}
	return n, true
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
	if c.SnapStart.ApplyOn == "" {
		c.SnapStart.ApplyOn = SnapStartNone
	}
	if c.SnapStart.OptimizationStatus == "" {
		c.SnapStart.OptimizationStatus = OptimizationOff
	}
}

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)

// arnRE matches full and partial function ARNs:
// arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER], ACCOUNT:function:NAME.
var arnRE = regexp.MustCompile(`^(?:arn:aws[a-zA-Z-]*:lambda:[a-z0-9-]+:)?(?:\d{12}:)?function:([a-zA-Z0-9_-]{1,64})(?::(\$LATEST|[a-zA-Z0-9_-]{1,128}))?$`)

// qualifiedNameRE matches Lambda's NAME:QUALIFIER form ("my-fn:7").
var qualifiedNameRE = regexp.MustCompile(`^([a-zA-Z0-9_-]{1,64}):(\$LATEST|[a-zA-Z0-9_-]{1,128})$`)

// ParseName accepts a function name, a name with a qualifier (NAME:7), a
// full ARN or a partial ARN (as Lambda's FunctionName parameter does) and
// returns the bare name and the qualifier embedded in it, if any. Anything
// else, including path tricks such as "../x", is ErrInvalidParameter.
// "function:x" is the partial ARN of x, as on Lambda, not x's qualifier.
func ParseName(s string) (name, qualifier string, err error) {
	if nameRE.MatchString(s) {
		return s, "", nil
	}
	if m := arnRE.FindStringSubmatch(s); m != nil {
		return m[1], m[2], nil
	}
	if m := qualifiedNameRE.FindStringSubmatch(s); m != nil {
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
	if err := ValidateSnapStart(c.SnapStart.ApplyOn); err != nil {
		return err
	}
	if c.SnapStart.Enabled() && strings.HasPrefix(c.Runtime, "nodejs") {
		// A restored Node.js process would hand every environment the same
		// Math.random and OpenSSL generator state, which no runtime hook
		// can reseed; Lambda offers no SnapStart for Node.js either.
		return errdefs.Invalid("%s is not supported for SnapStart enabled functions.", c.Runtime)
	}
	return ValidateEnvironment(c.Environment)
}

// ValidateSnapStart checks a SnapStart.ApplyOn value ("" reads as None).
func ValidateSnapStart(v SnapStartApplyOn) error {
	switch v {
	case "", SnapStartNone, SnapStartPublishedVersions:
		return nil
	}
	return errdefs.Invalid("1 validation error detected: Value '%s' at 'snapStart.applyOn' failed to satisfy constraint: Member must satisfy enum value set: [PublishedVersions, None]", truncate(string(v), 64))
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
