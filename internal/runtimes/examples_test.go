package runtimes

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The bundled examples, run the way the sandbox runs them: the Go one as a
// provided bootstrap, the others on InvokeX's RICs with the host's
// interpreters.

var examplesDir = filepath.Join("..", "..", "examples")

func checkHello(t *testing.T, f *fakeAPI, logLine *regexp.Regexp) {
	t.Helper()
	for _, c := range []struct{ event, want string }{
		{`{"name":"x"}`, "Hello, x!"},
		{`{}`, "Hello, world!"},
	} {
		res := f.invoke(t, c.event, nil)
		if m := decodeJSON(t, res); m["message"] != c.want || len(m) != 1 {
			t.Errorf("%s -> %s, want {\"message\":%q}", c.event, res.body, c.want)
		}
		if c.event == `{"name":"x"}` && !logLine.MatchString(strings.ReplaceAll(res.output, res.id, "<id>")) {
			t.Errorf("%s: log line missing from %q", c.event, res.output)
		}
	}
}

func TestExampleHelloPython(t *testing.T) {
	rt := detected(t, FamilyPython)
	dir, err := filepath.Abs(filepath.Join(examplesDir, "hello-python"))
	must(t, err)
	f := startRICIn(t, rt, "app.handler", dir)
	checkHello(t, f, regexp.MustCompile(`(?m)^request <id>: greeting x$`))
}

func TestExampleHelloNode(t *testing.T) {
	rt := detected(t, FamilyNode)
	dir, err := filepath.Abs(filepath.Join(examplesDir, "hello-node"))
	must(t, err)
	f := startRICIn(t, rt, "index.handler", dir)
	checkHello(t, f, regexp.MustCompile(`(?m)^\S+Z\t<id>\tINFO\tgreeting x$`))
}

func TestExampleHelloGo(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a Go binary")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go toolchain")
	}
	taskRoot := t.TempDir()
	bootstrap := filepath.Join(taskRoot, "bootstrap")
	cmd := exec.Command(goBin, "build", "-o", bootstrap, "./examples/hello-go")
	cmd.Dir = filepath.Join("..", "..")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building hello-go: %v\n%s", err, out)
	}
	rt := byID(Builtin())["provided.al2023"]
	lookup := func(p string) (bool, bool) {
		st, err := os.Stat(filepath.Join(taskRoot, p))
		return err == nil, err == nil && st.Mode()&0o111 != 0
	}
	if err := CheckCode(rt, "", lookup); err != nil {
		t.Fatalf("CheckCode rejects the built example: %v", err)
	}
	argv := []string{strings.Replace(rt.Bootstrap[0], "/var/task", taskRoot, 1)}
	f := newFakeAPI(t)
	startProcess(t, f, argv, "bootstrap", taskRoot)
	checkHello(t, f, regexp.MustCompile(`(?m)request <id>: greeting x$`))
}
