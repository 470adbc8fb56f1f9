package harness

import (
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/runtimes"
)

func TestBuildEnv(t *testing.T) {
	fn := &function.Config{
		Name: "orders", Handler: "app.handler", MemorySize: 256, Version: "$LATEST",
		Environment: map[string]string{
			"ZED":                    "last",
			"APP_MODE":               "prod",
			"AWS_REGION":             "evil-1",      // reserved: dropped
			"AWS_LAMBDA_RUNTIME_API": "10.0.0.1:80", // reserved: dropped
			"_HANDLER":               "other",       // reserved: dropped
			"LANG":                   "C.UTF-8",     // extendable: replaces the default
		},
	}
	rt := &runtimes.Runtime{ID: "python3.12", Family: runtimes.FamilyPython, ExecutionEnv: "AWS_Lambda_python3.12"}
	env := buildEnv(envInput{Function: fn, Runtime: rt, Region: "eu-west-1", LogStream: "2026/01/02/[$LATEST]abc"})

	got := map[string]string{}
	var order []string
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			t.Fatalf("entry %q is not KEY=VALUE", kv)
		}
		if _, dup := got[k]; dup {
			t.Fatalf("key %s appears twice in %v", k, env)
		}
		got[k] = v
		order = append(order, k)
	}
	want := map[string]string{
		"_HANDLER":                        "app.handler",
		"AWS_LAMBDA_RUNTIME_API":          "127.0.0.1:9001",
		"LAMBDA_TASK_ROOT":                "/var/task",
		"LAMBDA_RUNTIME_DIR":              "/var/runtime",
		"AWS_LAMBDA_FUNCTION_NAME":        "orders",
		"AWS_LAMBDA_FUNCTION_VERSION":     "$LATEST",
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
		"AWS_LAMBDA_INITIALIZATION_TYPE":  "on-demand",
		"AWS_LAMBDA_LOG_GROUP_NAME":       "/aws/lambda/orders",
		"AWS_LAMBDA_LOG_STREAM_NAME":      "2026/01/02/[$LATEST]abc",
		"AWS_REGION":                      "eu-west-1",
		"AWS_DEFAULT_REGION":              "eu-west-1",
		"AWS_EXECUTION_ENV":               "AWS_Lambda_python3.12",
		"TZ":                              ":UTC",
		"LANG":                            "C.UTF-8",
		"PATH":                            "/usr/local/bin:/usr/bin/:/bin:/opt/bin",
		"LD_LIBRARY_PATH":                 "/var/lang/lib:/lib64:/usr/lib64:/var/runtime:/var/runtime/lib:/var/task:/var/task/lib:/opt/lib",
		"APP_MODE":                        "prod",
		"ZED":                             "last",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("env has %d keys, want %d: %v", len(got), len(want), env)
	}
	// User variables come after Lambda's, sorted.
	if n := len(order); order[n-2] != "APP_MODE" || order[n-1] != "ZED" || order[0] != "_HANDLER" {
		t.Errorf("order = %v", order)
	}
}

func TestLogStreamName(t *testing.T) {
	at := time.Date(2026, 3, 4, 23, 59, 0, 0, time.UTC)
	name := logStreamName(at, "")
	if !regexp.MustCompile(`^2026/03/04/\[\$LATEST\][0-9a-f]{32}$`).MatchString(name) {
		t.Fatalf("log stream %q", name)
	}
	if logStreamName(at, "") == name {
		t.Fatalf("two environments got the same log stream")
	}
	if id := newInstanceID(); !regexp.MustCompile(`^[a-z0-9-]{1,40}$`).MatchString(id) {
		t.Fatalf("instance id %q is not a valid driver.Spec.ID", id)
	}
}

func TestDecodeClientContext(t *testing.T) {
	for in, want := range map[string]string{
		"":                         "",
		"eyJjdXN0b20iOnsiYSI6MX19": `{"custom":{"a":1}}`,
		"not base64!":              "not base64!",
	} {
		if got := decodeClientContext(in); got != want {
			t.Errorf("decodeClientContext(%q) = %q, want %q", in, got, want)
		}
	}
}
