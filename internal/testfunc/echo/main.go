// Command echo is the benchmark's function: a minimal aws-lambda-go
// function (deployed as a provided runtime's "bootstrap", and run as is by
// the AWS Lambda Runtime Interface Emulator) that answers with its event.
//
// The response is {"version": V, "event": <the event>}, where V is the
// content of the file "version" beside the code (in $LAMBDA_TASK_ROOT, else
// the working directory), or "" without one: the benchmark ships each
// deployment with its own version file so it can tell which code answered
// without changing the binary. An event {"sleep_ms": N} makes the function
// sleep N ms first, to hold an instance busy.
package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-lambda-go/lambda"
)

// version is read once, at init, like any function's static configuration.
var version = readVersion()

func readVersion() string {
	dir := os.Getenv("LAMBDA_TASK_ROOT")
	if dir == "" {
		dir = "."
	}
	b, err := os.ReadFile(filepath.Join(dir, "version"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

type response struct {
	Version string          `json:"version"`
	Event   json.RawMessage `json:"event"`
}

func handle(ctx context.Context, event json.RawMessage) (response, error) {
	var in struct {
		SleepMs int `json:"sleep_ms"`
	}
	// Events that are not objects are echoed as they are.
	if json.Unmarshal(event, &in) == nil && in.SleepMs > 0 {
		t := time.NewTimer(time.Duration(in.SleepMs) * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return response{}, ctx.Err()
		}
	}
	if len(event) == 0 {
		event = json.RawMessage("null")
	}
	return response{Version: version, Event: event}, nil
}

func main() { lambda.Start(handle) }
