package harness

import (
	"crypto/rand"
	"encoding/hex"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

// Paths and defaults of the environment Lambda gives every runtime.
const (
	taskRoot         = "/var/task"
	runtimeRoot      = "/var/runtime"
	runtimeAPIHolder = "127.0.0.1:9001" // the agent replaces it with its real address
	defaultPath      = "/usr/local/bin:/usr/bin/:/bin:/opt/bin"
	defaultLDPath    = "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib"
	initTypeOnDemand = "on-demand"
)

// envInput is what buildEnv needs besides the function's configuration.
type envInput struct {
	Function  *function.Config
	Runtime   *runtimes.Runtime
	Region    string
	LogStream string
	// InitType is AWS_LAMBDA_INITIALIZATION_TYPE; default on-demand.
	InitType string
}

// buildEnv returns the runtime's complete environment as KEY=VALUE: Lambda's
// variables first, then the user's sorted by key. A user key that Lambda
// reserves (function.IsReservedEnv) is dropped, so a configuration that
// slipped past validation can never redirect AWS_LAMBDA_RUNTIME_API or
// impersonate another function. Keys Lambda sets but lets users extend
// (TZ, LANG, PATH, LD_LIBRARY_PATH) take the user's value in place, so no
// key appears twice.
func buildEnv(in envInput) []string {
	fn, rt := in.Function, in.Runtime
	version := fn.Version
	if version == "" {
		version = function.LatestVersion
	}
	memory := fn.MemorySize
	if memory == 0 {
		memory = function.DefaultMemory
	}
	initType := in.InitType
	if initType == "" {
		initType = initTypeOnDemand
	}
	base := [][2]string{
		{"_HANDLER", fn.Handler},
		{"AWS_LAMBDA_RUNTIME_API", runtimeAPIHolder},
		{"LAMBDA_TASK_ROOT", taskRoot},
		{"LAMBDA_RUNTIME_DIR", runtimeRoot},
		{"AWS_LAMBDA_FUNCTION_NAME", fn.Name},
		{"AWS_LAMBDA_FUNCTION_VERSION", version},
		{"AWS_LAMBDA_FUNCTION_MEMORY_SIZE", strconv.Itoa(memory)},
		{"AWS_LAMBDA_INITIALIZATION_TYPE", initType},
		{"AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/" + fn.Name},
		{"AWS_LAMBDA_LOG_STREAM_NAME", in.LogStream},
		{"AWS_REGION", in.Region},
		{"AWS_DEFAULT_REGION", in.Region},
		{"AWS_EXECUTION_ENV", rt.ExecutionEnv},
		{"TZ", ":UTC"},
		{"LANG", "en_US.UTF-8"},
		{"PATH", defaultPath},
		{"LD_LIBRARY_PATH", defaultLDPath},
	}
	index := make(map[string]int, len(base))
	for i, kv := range base {
		index[kv[0]] = i
	}
	keys := make([]string, 0, len(fn.Environment))
	for k := range fn.Environment {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var user []string
	for _, k := range keys {
		if k == "" || strings.ContainsAny(k, "=\x00") || function.IsReservedEnv(k) {
			continue
		}
		if i, ok := index[k]; ok {
			base[i][1] = fn.Environment[k]
			continue
		}
		user = append(user, k+"="+fn.Environment[k])
	}
	env := make([]string, 0, len(base)+len(user))
	for _, kv := range base {
		env = append(env, kv[0]+"="+kv[1])
	}
	return append(env, user...)
}

// logStreamName returns a Lambda-shaped log stream name for a new execution
// environment: YYYY/MM/DD/[VERSION]<32 hex>.
func logStreamName(now time.Time, version string) string {
	if version == "" {
		version = function.LatestVersion
	}
	return now.UTC().Format("2006/01/02") + "/[" + version + "]" + randomHex(16)
}

// randomHex returns n random bytes as lowercase hex.
func randomHex(n int) string {
	b := make([]byte, n)
	// crypto/rand.Read never returns an error (Go 1.24+); it panics instead.
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// newInstanceID returns a short id valid as driver.Spec.ID ([a-z0-9-], <= 40 bytes).
func newInstanceID() string { return "ix-" + randomHex(8) }
