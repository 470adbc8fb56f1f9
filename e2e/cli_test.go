package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// cli runs the invokex binary against s and returns stdout, stderr and the exit code.
func cli(t *testing.T, s *server, stdin string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(invokexBin(), append([]string{"--endpoint", s.endpoint}, args...)...)
	cmd.Dir = repoRoot
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

func TestCLI(t *testing.T) {
	s := startServer(t, "")
	out, errOut, code := cli(t, s, "", "deploy", "./examples/hello-go", "--runtime", "provided.al2023")
	if code != 0 || !strings.Contains(out, "deployed hello-go") {
		t.Fatalf("deploy: code %d\n%s\n%s", code, out, errOut)
	}
	// Payload from an argument, a file and stdin.
	if out, errOut, code = cli(t, s, "", "invoke", "hello-go", `{"name":"arg"}`, "--tail"); code != 0 || !strings.Contains(out, "Hello, arg") || !strings.Contains(errOut, "REPORT RequestId:") {
		t.Fatalf("invoke with argument: code %d\n%s\n%s", code, out, errOut)
	}
	f := filepath.Join(t.TempDir(), "event.json")
	os.WriteFile(f, []byte(`{"name":"file"}`), 0o644)
	if out, _, code = cli(t, s, "", "invoke", "hello-go", "--file", f); code != 0 || !strings.Contains(out, "Hello, file") {
		t.Fatalf("invoke --file: code %d %s", code, out)
	}
	if out, _, code = cli(t, s, `{"name":"stdin"}`, "invoke", "hello-go"); code != 0 || !strings.Contains(out, "Hello, stdin") {
		t.Fatalf("invoke from stdin: code %d %s", code, out)
	}
	if out, _, code = cli(t, s, "", "logs", "hello-go"); code != 0 || strings.Count(out, "START RequestId:") != 3 {
		t.Fatalf("logs: code %d, want 3 invocations:\n%s", code, out)
	}
	// An Event invocation's record, by request id.
	out, _, code = cli(t, s, "", "invoke", "hello-go", `{"name":"async"}`, "--async")
	fields := strings.Fields(out)
	if code != 0 || len(fields) < 2 || fields[0] != "queued" {
		t.Fatalf("invoke --async: code %d %q", code, out)
	}
	eventually(t, time.Minute, func() error {
		out, errOut, code := cli(t, s, "", "invocation", fields[1])
		if code != 0 || !strings.Contains(out, "Succeeded") {
			return fmt.Errorf("invocation %s: code %d %s %s", fields[1], code, out, errOut)
		}
		if !strings.Contains(out, "greeting async") || !strings.Contains(out, "Event") {
			t.Fatalf("invocation record lacks the function's log or type:\n%s", out)
		}
		return nil
	})
	if out, _, code = cli(t, s, "", "ls"); code != 0 || !strings.Contains(out, "hello-go") || !strings.Contains(out, "provided.al2023") {
		t.Fatalf("ls: code %d %s", code, out)
	}
	// Redeploying updates in place.
	if out, errOut, code = cli(t, s, "", "deploy", "./examples/hello-go", "--runtime", "provided.al2023", "--memory", "256"); code != 0 {
		t.Fatalf("redeploy: code %d\n%s\n%s", code, out, errOut)
	}
	// Errors are one clear line, not a stack or usage text.
	_, errOut, code = cli(t, s, "", "invoke", "no-such-function", "{}")
	if code == 0 || strings.Count(strings.TrimSpace(errOut), "\n") != 0 || !strings.Contains(errOut, "ResourceNotFoundException") {
		t.Fatalf("invoking a missing function: code %d stderr %q", code, errOut)
	}
	if out, _, code = cli(t, s, "", "rm", "hello-go"); code != 0 || !strings.Contains(out, "deleted hello-go") {
		t.Fatalf("rm: code %d %s", code, out)
	}
	if out, _, _ = cli(t, s, "", "ls"); strings.Contains(out, "hello-go") {
		t.Fatalf("ls after rm still lists hello-go:\n%s", out)
	}
}
