package runtimes

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Paths where the sandbox expects InvokeX's runtime interface clients
// (SupportFiles is mounted at /var/runtime).
const (
	pythonBootstrap = "/var/runtime/python/bootstrap.py"
	nodeBootstrap   = "/var/runtime/nodejs/bootstrap.mjs"
	taskBootstrap   = "/var/task/bootstrap"
)

// known lists every runtime identifier, in the order Builtin returns them.
// version is the interpreter version the identifier needs ("3.11", "20").
var known = []struct {
	id      string
	family  Family
	version string
}{
	{"provided.al2023", FamilyProvided, ""},
	{"provided.al2", FamilyProvided, ""},
	{"provided", FamilyProvided, ""}, // deprecated by AWS, still accepted
	{"python3.9", FamilyPython, "3.9"},
	{"python3.10", FamilyPython, "3.10"},
	{"python3.11", FamilyPython, "3.11"},
	{"python3.12", FamilyPython, "3.12"},
	{"python3.13", FamilyPython, "3.13"},
	{"python3.14", FamilyPython, "3.14"},
	{"nodejs18.x", FamilyNode, "18"},
	{"nodejs20.x", FamilyNode, "20"},
	{"nodejs22.x", FamilyNode, "22"},
	{"nodejs24.x", FamilyNode, "24"},
}

// Builtin returns every runtime identifier InvokeX knows, marked unavailable.
// Interpreted runtimes have no Interpreter or Bootstrap until Detect finds
// an interpreter for them.
func Builtin() []*Runtime {
	out := make([]*Runtime, 0, len(known))
	for _, k := range known {
		rt := &Runtime{
			ID:           k.id,
			Family:       k.family,
			Reason:       "not probed on this host",
			ExecutionEnv: "AWS_Lambda_" + k.id,
		}
		switch k.family {
		case FamilyProvided:
			rt.HandlerFormat = "bootstrap"
			rt.Bootstrap = []string{taskBootstrap}
		case FamilyPython:
			rt.HandlerFormat = "file.function"
			rt.DefaultHandler = "lambda_function.lambda_handler"
		case FamilyNode:
			rt.HandlerFormat = "file.export"
			rt.DefaultHandler = "index.handler"
		}
		out = append(out, rt)
	}
	return out
}

// host says where Detect looks for interpreters and what the sandbox can see.
type host struct {
	// pythonDirs hold versioned interpreters (python3.11), most preferred first.
	pythonDirs []string
	// pythonGeneric are unversioned interpreters (python3), probed for their version.
	pythonGeneric []string
	nodePaths     []string
	// visibleRoots are the host directories the sandbox mounts; an
	// interpreter that resolves elsewhere cannot run in it.
	visibleRoots []string
}

// hostDefault is where Debian, Ubuntu, Fedora and the official language
// images put interpreters. Only these are considered: the sandbox sees the
// host's /usr, /lib*, /bin and /sbin, never /root or /opt, so a pyenv or
// nvm interpreter could not run there.
var hostDefault = host{
	pythonDirs:    []string{"/usr/bin", "/usr/local/bin"},
	pythonGeneric: []string{"/usr/bin/python3", "/usr/local/bin/python3"},
	nodePaths:     []string{"/usr/bin/node", "/usr/local/bin/node"},
	visibleRoots:  []string{"/usr/", "/bin/", "/sbin/", "/lib/", "/lib32/", "/lib64/", "/libx32/"},
}

// probeTimeout bounds one `--version` run, so a wedged binary cannot stall
// the server's start.
const probeTimeout = 5 * time.Second

// Detect returns Builtin with Available set from probing this host.
// Provided runtimes are always available (their bootstrap is a static
// binary shipped in the package). A pythonX.Y or nodejsN.x runtime is
// available when a host interpreter of exactly that version exists at a
// path the sandbox can see; Interpreter is its resolved absolute path.
// Detect runs each interpreter at most once per call and stops probing when
// ctx is done (the runtimes left are reported unavailable, with the reason).
func Detect(ctx context.Context) []*Runtime {
	return detect(ctx, hostDefault)
}

func detect(ctx context.Context, h host) []*Runtime {
	p := &prober{ctx: ctx, host: h, cache: map[string]probeResult{}}
	pythons := p.pythons()
	nodes := p.nodes()

	out := Builtin()
	for _, rt := range out {
		switch rt.Family {
		case FamilyProvided:
			rt.Available, rt.Reason = true, ""
		case FamilyPython:
			fillInterpreted(rt, pythons, pythonBootstrap)
		case FamilyNode:
			fillInterpreted(rt, nodes, nodeBootstrap)
		}
	}
	return out
}

func fillInterpreted(rt *Runtime, f *found, bootstrap string) {
	v := versionOf(rt.ID)
	if path, ok := f.paths[v]; ok {
		rt.Available, rt.Reason = true, ""
		rt.Interpreter = path
		rt.Bootstrap = []string{path, bootstrap}
		return
	}
	rt.Reason = f.reason(v)
}

// UseInterpreter makes an interpreted runtime available with the
// interpreter at path (as the sandbox sees it): its bootstrap command runs
// InvokeX's runtime interface client for the family with it. For a VM
// driver, path is inside the runtime's root image, not on the host.
func (rt *Runtime) UseInterpreter(path string) {
	rt.Available, rt.Reason = true, ""
	rt.Interpreter = path
	switch rt.Family {
	case FamilyPython:
		rt.Bootstrap = []string{path, pythonBootstrap}
	case FamilyNode:
		rt.Bootstrap = []string{path, nodeBootstrap}
	}
}

// Version is the interpreter version an interpreted runtime needs
// ("3.11", "18"), "" for provided and unknown runtimes.
func Version(id string) string { return versionOf(id) }

func versionOf(id string) string {
	for _, k := range known {
		if k.id == id {
			return k.version
		}
	}
	return ""
}

// found is what probing one language found on the host.
type found struct {
	lang     string            // "python" or "node", for messages
	paths    map[string]string // version -> resolved interpreter path
	problems map[string]string // version -> why its interpreter cannot be used
	notes    []string          // problems with interpreters of unknown version
	err      error             // probing was cut short (ctx done)
}

func newFound(lang string) *found {
	return &found{lang: lang, paths: map[string]string{}, problems: map[string]string{}}
}

func (f *found) name(version string) string {
	if f.lang == "node" {
		return "node " + version
	}
	return f.lang + version
}

// reason says why no interpreter of version can be used, e.g. "no
// python3.12 interpreter on this host; have python3.11".
func (f *found) reason(version string) string {
	if msg, ok := f.problems[version]; ok {
		return msg
	}
	if f.err != nil {
		return fmt.Sprintf("no %s interpreter found: host probe stopped: %v", f.name(version), f.err)
	}
	versions := make([]string, 0, len(f.paths))
	for v := range f.paths {
		versions = append(versions, v)
	}
	slices.SortFunc(versions, compareVersions)
	have := make([]string, 0, len(versions))
	for _, v := range versions {
		if f.lang == "node" {
			have = append(have, fmt.Sprintf("%s (%s)", f.name(v), f.paths[v]))
		} else {
			have = append(have, f.name(v))
		}
	}
	msg := fmt.Sprintf("no %s interpreter on this host; have ", f.name(version))
	if len(have) == 0 {
		msg += "none"
	} else {
		msg += strings.Join(have, ", ")
	}
	for _, n := range f.notes {
		msg += "; " + n
	}
	return msg
}

func (f *found) add(version, path string) {
	if _, ok := f.paths[version]; !ok {
		f.paths[version] = path
		delete(f.problems, version)
	}
}

func (f *found) problem(version, msg string) {
	if _, ok := f.paths[version]; ok {
		return
	}
	if _, ok := f.problems[version]; !ok {
		f.problems[version] = msg
	}
}

// compareVersions orders "3.9" before "3.10" and "18" before "20".
func compareVersions(a, b string) int {
	a1, a2, _ := strings.Cut(a, ".")
	b1, b2, _ := strings.Cut(b, ".")
	x, _ := strconv.Atoi(a1)
	y, _ := strconv.Atoi(b1)
	if x != y {
		return x - y
	}
	x, _ = strconv.Atoi(a2)
	y, _ = strconv.Atoi(b2)
	return x - y
}

// prober runs host interpreters with --version, once per resolved path.
type prober struct {
	ctx   context.Context
	host  host
	cache map[string]probeResult
}

type probeResult struct {
	real   string // path with symlinks resolved
	output string
	err    error
}

var errNotExist = errors.New("does not exist")

// probe resolves path and runs it with --version. A missing path returns
// errNotExist without running anything.
func (p *prober) probe(path string) probeResult {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return probeResult{err: errNotExist}
	}
	if r, ok := p.cache[real]; ok {
		return r
	}
	r := probeResult{real: real}
	if st, err := os.Stat(real); err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		r.err = errNotExist
	} else if err := p.ctx.Err(); err != nil {
		return probeResult{real: real, err: err}
	} else {
		ctx, cancel := context.WithTimeout(p.ctx, probeTimeout)
		cmd := exec.CommandContext(ctx, real, "--version")
		// A clean environment: PYTHONHOME or NODE_OPTIONS must not change
		// what the probe reports.
		cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
		cmd.WaitDelay = time.Second
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil && p.ctx.Err() != nil {
			return probeResult{real: real, err: p.ctx.Err()}
		}
		r.output = strings.TrimSpace(string(out))
		if err != nil {
			r.err = fmt.Errorf("running %s --version: %w", real, err)
		}
	}
	p.cache[real] = r
	return r
}

// visible reports whether the sandbox can see a host path.
func (p *prober) visible(real string) bool {
	for _, root := range p.host.visibleRoots {
		if strings.HasPrefix(real, root) {
			return true
		}
	}
	return false
}

var (
	pythonVersionRE = regexp.MustCompile(`^Python (3\.\d+)\.\d+`)
	nodeVersionRE   = regexp.MustCompile(`^v(\d+)\.\d+\.\d+`)
)

// interpret probes path and returns the version it reports, or a reason it
// cannot serve as an interpreter. An absent path returns all empty; err is
// set only when ctx ended the probe.
func (p *prober) interpret(path string, re *regexp.Regexp) (version, real, problem string, err error) {
	r := p.probe(path)
	switch {
	case errors.Is(r.err, errNotExist):
		return "", "", "", nil
	case r.err != nil && p.ctx.Err() != nil:
		return "", "", "", p.ctx.Err()
	case r.err != nil:
		return "", r.real, fmt.Sprintf("%s does not run: %v", path, r.err), nil
	}
	m := re.FindStringSubmatch(r.output)
	if m == nil {
		return "", r.real, fmt.Sprintf("%s reports an unknown version %q", path, r.output), nil
	}
	if !p.visible(r.real) {
		return m[1], r.real, fmt.Sprintf("%s resolves to %s, which the sandbox cannot see", path, r.real), nil
	}
	return m[1], r.real, "", nil
}

func (p *prober) pythons() *found {
	f := newFound("python")
	var candidates []string
	for _, k := range known {
		if k.family != FamilyPython {
			continue
		}
		for _, dir := range p.host.pythonDirs {
			candidates = append(candidates, filepath.Join(dir, "python"+k.version))
		}
	}
	candidates = append(candidates, p.host.pythonGeneric...)
	for _, c := range candidates {
		named := strings.TrimPrefix(filepath.Base(c), "python")
		if named == "3" {
			named = ""
		}
		if !f.probeOne(p, c, named, pythonVersionRE) {
			break
		}
	}
	return f
}

func (p *prober) nodes() *found {
	f := newFound("node")
	for _, c := range p.host.nodePaths {
		if !f.probeOne(p, c, "", nodeVersionRE) {
			break
		}
	}
	return f
}

// probeOne records what candidate c offers and reports whether probing
// should go on. An interpreter is trusted for the version it reports, not
// the one its name suggests (named, "" if its name has none); a failure to
// report a version is blamed on the named version.
func (f *found) probeOne(p *prober, c, named string, re *regexp.Regexp) bool {
	v, real, problem, err := p.interpret(c, re)
	switch {
	case err != nil:
		f.err = err
		return false
	case v != "" && problem != "":
		f.problem(v, problem)
	case v != "":
		f.add(v, real)
	case problem != "" && named != "":
		f.problem(named, problem)
	case problem != "" && !slices.Contains(f.notes, problem):
		f.notes = append(f.notes, problem)
	}
	return true
}
