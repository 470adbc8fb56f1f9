package runtimes

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

func byID(rts []*Runtime) map[string]*Runtime {
	m := map[string]*Runtime{}
	for _, rt := range rts {
		m[rt.ID] = rt
	}
	return m
}

func TestBuiltin(t *testing.T) {
	rts := Builtin()
	var ids []string
	for _, rt := range rts {
		ids = append(ids, rt.ID)
		if rt.Available || rt.Reason == "" {
			t.Errorf("%s: Available %v Reason %q, want unavailable with a reason", rt.ID, rt.Available, rt.Reason)
		}
		if rt.ExecutionEnv != "AWS_Lambda_"+rt.ID {
			t.Errorf("%s: ExecutionEnv %q", rt.ID, rt.ExecutionEnv)
		}
	}
	want := []string{"provided.al2023", "provided.al2", "provided",
		"python3.9", "python3.10", "python3.11", "python3.12", "python3.13", "python3.14",
		"nodejs18.x", "nodejs20.x", "nodejs22.x", "nodejs24.x"}
	if !slices.Equal(ids, want) {
		t.Fatalf("Builtin IDs = %v, want %v", ids, want)
	}
	m := byID(rts)
	checks := []struct {
		id                     string
		family                 Family
		format, defaultHandler string
	}{
		{"provided.al2023", FamilyProvided, "bootstrap", ""},
		{"python3.12", FamilyPython, "file.function", "lambda_function.lambda_handler"},
		{"nodejs22.x", FamilyNode, "file.export", "index.handler"},
	}
	for _, c := range checks {
		rt := m[c.id]
		if rt.Family != c.family || rt.HandlerFormat != c.format || rt.DefaultHandler != c.defaultHandler {
			t.Errorf("%s = %+v", c.id, rt)
		}
	}
	if !slices.Equal(m["provided"].Bootstrap, []string{"/var/task/bootstrap"}) {
		t.Errorf("provided Bootstrap = %v", m["provided"].Bootstrap)
	}
	// Each call returns fresh rows: callers may modify them.
	rts[0].ID = "changed"
	if Builtin()[0].ID != "provided.al2023" {
		t.Error("Builtin shares its rows between calls")
	}
}

// TestDetectThisHost checks Detect against what this machine has, found
// independently of Detect.
func TestDetectThisHost(t *testing.T) {
	m := byID(Detect(context.Background()))
	for _, id := range []string{"provided.al2023", "provided.al2", "provided"} {
		if !m[id].Available || m[id].Reason != "" {
			t.Errorf("%s: Available %v Reason %q", id, m[id].Available, m[id].Reason)
		}
	}
	for _, rt := range m {
		if rt.Family == FamilyProvided {
			continue
		}
		if rt.Available {
			if !strings.HasPrefix(rt.Interpreter, "/usr/") && !strings.HasPrefix(rt.Interpreter, "/bin/") {
				t.Errorf("%s: Interpreter %q is not where the sandbox can see it", rt.ID, rt.Interpreter)
			}
			out, err := exec.Command(rt.Interpreter, "--version").CombinedOutput()
			if err != nil {
				t.Fatalf("%s: %s --version: %v", rt.ID, rt.Interpreter, err)
			}
			v := strings.TrimSpace(string(out))
			switch rt.Family {
			case FamilyPython:
				if !strings.HasPrefix(v, "Python "+strings.TrimPrefix(rt.ID, "python")+".") {
					t.Errorf("%s: interpreter reports %q", rt.ID, v)
				}
				if !slices.Equal(rt.Bootstrap, []string{rt.Interpreter, "/var/runtime/python/bootstrap.py"}) {
					t.Errorf("%s: Bootstrap %v", rt.ID, rt.Bootstrap)
				}
			case FamilyNode:
				major := strings.TrimSuffix(strings.TrimPrefix(rt.ID, "nodejs"), ".x")
				if !strings.HasPrefix(v, "v"+major+".") {
					t.Errorf("%s: interpreter reports %q", rt.ID, v)
				}
				if !slices.Equal(rt.Bootstrap, []string{rt.Interpreter, "/var/runtime/nodejs/bootstrap.mjs"}) {
					t.Errorf("%s: Bootstrap %v", rt.ID, rt.Bootstrap)
				}
			}
		} else if rt.Reason == "" || rt.Interpreter != "" {
			t.Errorf("%s: unavailable with Reason %q Interpreter %q", rt.ID, rt.Reason, rt.Interpreter)
		}
	}
	// /usr/bin/python3 and /usr/bin/node, when present, must be found.
	if out, err := exec.Command("/usr/bin/python3", "--version").CombinedOutput(); err == nil {
		id := "python" + strings.Join(strings.Split(strings.Fields(string(out))[1], ".")[:2], ".")
		if rt, ok := m[id]; ok && !rt.Available {
			t.Errorf("/usr/bin/python3 is %s but %s is unavailable: %s", out, id, rt.Reason)
		}
	}
	if out, err := exec.Command("/usr/bin/node", "--version").CombinedOutput(); err == nil {
		id := "nodejs" + strings.Split(strings.TrimPrefix(strings.TrimSpace(string(out)), "v"), ".")[0] + ".x"
		if rt, ok := m[id]; ok && !rt.Available {
			t.Errorf("/usr/bin/node is %s but %s is unavailable: %s", out, id, rt.Reason)
		}
	}
}

// fakeHost lays out interpreters as shell scripts: usr/bin under a temp
// dir is what the sandbox sees, opt is what it does not. Every run of a
// script is appended to runs.log, to count probes.
func fakeHost(t *testing.T) (host, string) {
	t.Helper()
	root := t.TempDir()
	usrBin := filepath.Join(root, "usr", "bin")
	opt := filepath.Join(root, "opt")
	for _, d := range []string{usrBin, opt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	log := filepath.Join(root, "runs.log")
	script := func(path, version string) {
		body := "#!/bin/sh\necho \"$0\" >> " + log + "\necho '" + version + "'\n"
		if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	script(filepath.Join(usrBin, "python3.12"), "Python 3.12.4")
	script(filepath.Join(usrBin, "python3.10"), "Python 3.10.1")
	script(filepath.Join(opt, "python3.13"), "Python 3.13.0")
	script(filepath.Join(usrBin, "node"), "v22.3.0")
	// python3 is python3.12 again: it must be run only once.
	must(t, os.Symlink("python3.12", filepath.Join(usrBin, "python3")))
	must(t, os.Symlink(filepath.Join(opt, "python3.13"), filepath.Join(usrBin, "python3.13")))
	// A broken interpreter.
	must(t, os.WriteFile(filepath.Join(usrBin, "python3.14"), []byte("#!/bin/sh\nexit 3\n"), 0o755))
	return host{
		pythonDirs:    []string{usrBin, filepath.Join(root, "usr", "local", "bin")},
		pythonGeneric: []string{filepath.Join(usrBin, "python3")},
		nodePaths:     []string{filepath.Join(usrBin, "node"), filepath.Join(root, "usr", "local", "bin", "node")},
		visibleRoots:  []string{filepath.Join(root, "usr") + "/"},
	}, root
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestDetectFakeHost(t *testing.T) {
	h, root := fakeHost(t)
	m := byID(detect(context.Background(), h))
	usrBin := filepath.Join(root, "usr", "bin")

	for id, path := range map[string]string{
		"python3.12": filepath.Join(usrBin, "python3.12"),
		"python3.10": filepath.Join(usrBin, "python3.10"),
		"nodejs22.x": filepath.Join(usrBin, "node"),
	} {
		rt := m[id]
		if !rt.Available || rt.Interpreter != path || rt.Reason != "" {
			t.Errorf("%s = %+v, want available at %s", id, rt, path)
		}
	}
	reasons := map[string][]string{
		"python3.11": {"no python3.11 interpreter on this host; have python3.10, python3.12"},
		"python3.9":  {"no python3.9 interpreter"},
		"python3.13": {"python3.13", "resolves to " + filepath.Join(root, "opt", "python3.13"), "sandbox cannot see"},
		"python3.14": {"does not run", "exit status 3"},
		"nodejs20.x": {"no node 20 interpreter on this host; have node 22 (" + filepath.Join(usrBin, "node") + ")"},
	}
	for id, parts := range reasons {
		rt := m[id]
		if rt.Available || rt.Interpreter != "" || rt.Bootstrap != nil {
			t.Errorf("%s = %+v, want unavailable", id, rt)
		}
		for _, p := range parts {
			if !strings.Contains(rt.Reason, p) {
				t.Errorf("%s: Reason %q lacks %q", id, rt.Reason, p)
			}
		}
	}

	if strings.Contains(m["python3.11"].Reason, "python3.14") {
		t.Errorf("python3.11: Reason %q blames another version's interpreter", m["python3.11"].Reason)
	}

	runs, err := os.ReadFile(filepath.Join(root, "runs.log"))
	must(t, err)
	if n := strings.Count(string(runs), "python3.12\n"); n != 1 {
		t.Errorf("python3.12 ran %d times in one Detect, want 1 (python3 is a link to it):\n%s", n, runs)
	}
}

func TestDetectCancelled(t *testing.T) {
	h, root := fakeHost(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m := byID(detect(ctx, h))
	if !m["provided.al2023"].Available {
		t.Error("provided.al2023 needs no probe but is unavailable")
	}
	for _, id := range []string{"python3.12", "nodejs22.x"} {
		if rt := m[id]; rt.Available || !strings.Contains(rt.Reason, context.Canceled.Error()) {
			t.Errorf("%s after cancel: Available %v Reason %q", id, rt.Available, rt.Reason)
		}
	}
	if _, err := os.Stat(filepath.Join(root, "runs.log")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("interpreters ran after ctx was cancelled (runs.log: %v)", err)
	}
}

func TestSupportFiles(t *testing.T) {
	for family, want := range map[Family]string{FamilyPython: "python/bootstrap.py", FamilyNode: "nodejs/bootstrap.mjs"} {
		fsys := SupportFiles(family)
		if fsys == nil {
			t.Fatalf("%s: nil", family)
		}
		b, err := fs.ReadFile(fsys, want)
		if err != nil || len(b) < 1000 {
			t.Errorf("%s: %s: %d bytes, %v", family, want, len(b), err)
		}
		entries, err := fs.ReadDir(fsys, ".")
		must(t, err)
		if len(entries) != 1 || entries[0].Name()+"/"+filepath.Base(want) != want {
			t.Errorf("%s: root holds %v, want only %s", family, entries, filepath.Dir(want))
		}
	}
	if SupportFiles(FamilyProvided) != nil {
		t.Error("provided has support files")
	}
	// The paths Bootstrap names are the ones SupportFiles provides.
	for _, rt := range Detect(context.Background()) {
		if !rt.Available || rt.Family == FamilyProvided {
			continue
		}
		p := strings.TrimPrefix(rt.Bootstrap[len(rt.Bootstrap)-1], "/var/runtime/")
		if _, err := fs.Stat(SupportFiles(rt.Family), p); err != nil {
			t.Errorf("%s: Bootstrap %v names a file SupportFiles lacks: %v", rt.ID, rt.Bootstrap, err)
		}
	}
}

func TestCheckCode(t *testing.T) {
	rts := byID(Builtin())
	pkg := func(files ...string) func(string) (bool, bool) {
		return func(p string) (bool, bool) {
			for _, f := range files {
				name, mode, _ := strings.Cut(f, ":")
				if name == p {
					return true, mode == "x"
				}
			}
			return false, false
		}
	}
	cases := []struct {
		runtime, handler string
		files            []string
		wantErr          string // "" for success
	}{
		{"provided.al2023", "", []string{"bootstrap:x"}, ""},
		{"provided.al2", "anything.here", []string{"bootstrap:x"}, ""},
		{"provided", "", []string{"main"}, "Couldn't find valid bootstrap(s): [/var/task/bootstrap]"},
		{"provided.al2023", "", []string{"bootstrap"}, "bootstrap in the deployment package is not executable"},

		{"python3.11", "app.handler", []string{"app.py"}, ""},
		{"python3.11", "", []string{"lambda_function.py"}, ""},
		{"python3.11", "pkg/mod.handler", []string{"pkg/mod.py"}, ""},
		{"python3.11", "pkg.mod.handler", []string{"pkg/mod.py"}, ""},
		{"python3.11", "pkg.handler", []string{"pkg/__init__.py"}, ""},
		{"python3.11", "app.handler", []string{"main.py"}, "Unable to import module 'app'"},
		{"python3.11", "pkg/mod.handler", []string{"mod.py"}, "pkg/mod.py"},
		{"python3.11", "app", []string{"app.py"}, "Handler 'app' is not valid for runtime python3.11"},
		{"python3.11", "app.", []string{"app.py"}, "must be of the form file.function"},
		{"python3.11", ".handler", []string{".py"}, "must be of the form file.function"},
		{"python3.11", "pkg//mod.handler", []string{"pkg/mod.py"}, "must be of the form"},
		{"python3.11", "../app.handler", []string{"app.py"}, "'..' is not allowed"},
		{"python3.11", "/app.handler", []string{"app.py"}, "absolute path"},
		{"python3.11", "app.han dler", []string{"app.py"}, "white space"},

		{"nodejs20.x", "index.handler", []string{"index.js"}, ""},
		{"nodejs20.x", "", []string{"index.mjs"}, ""},
		{"nodejs20.x", "index.handler", []string{"index.cjs"}, ""},
		{"nodejs20.x", "src/api/app.handler", []string{"src/api/app.mjs"}, ""},
		{"nodejs20.x", "index.api.handler", []string{"index.js"}, ""},
		{"nodejs20.x", "lib.handler", []string{"lib/index.js"}, ""},
		{"nodejs20.x", "index.handler", []string{"index.ts"}, "Cannot find module 'index'"},
		{"nodejs20.x", "src/app.handler", []string{"app.js"}, "src/app.js, src/app.mjs or src/app.cjs"},
		{"nodejs20.x", "index", []string{"index.js"}, "must be of the form file.export"},
		{"nodejs20.x", "index.", []string{"index.js"}, "must be of the form file.export"},
		{"nodejs20.x", "src/.handler", []string{"src/.js"}, "must be of the form file.export"},
		{"nodejs20.x", "../index.handler", []string{"index.js"}, "'..' is not allowed"},
	}
	for _, c := range cases {
		err := CheckCode(rts[c.runtime], c.handler, pkg(c.files...))
		switch {
		case c.wantErr == "" && err != nil:
			t.Errorf("%s %q %v: %v", c.runtime, c.handler, c.files, err)
		case c.wantErr != "" && err == nil:
			t.Errorf("%s %q %v: no error, want %q", c.runtime, c.handler, c.files, c.wantErr)
		case c.wantErr != "" && (!errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), c.wantErr)):
			t.Errorf("%s %q %v: %v, want ErrInvalidParameter with %q", c.runtime, c.handler, c.files, err, c.wantErr)
		}
	}
	if err := CheckCode(nil, "x", pkg()); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("nil runtime: %v", err)
	}
}
