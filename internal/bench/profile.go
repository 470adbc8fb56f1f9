package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Roles a profile sample is attributed to.
const (
	roleServer   = "server"
	roleInit     = "sandbox init"
	roleAgent    = "sandbox agent"
	roleFunction = "function"
	roleClient   = "bench client"
	roleIdle     = "idle"
	roleOther    = "other"
)

// roleMap attributes threads to roles: the server process, each instance's
// init (a direct child of the server), the function processes (by command
// name) and the agents (everything else under the server), the benchmark
// itself, and the idle task.
func roleMap(procs []Proc, tasks func(pid int) []int, server, self int, fnComm string) map[int]string {
	roles := map[int]string{0: roleIdle}
	assign := func(pid int, role string) {
		roles[pid] = role
		for _, tid := range tasks(pid) {
			roles[tid] = role
		}
	}
	assign(server, roleServer)
	assign(self, roleClient)
	for root, g := range Subtrees(procs, server) {
		for _, p := range g {
			switch {
			case p.PID == root:
				assign(p.PID, roleInit)
			case p.Comm == fnComm:
				assign(p.PID, roleFunction)
			default:
				assign(p.PID, roleAgent)
			}
		}
	}
	return roles
}

// tasksOf lists the thread ids of pid.
func (p procFS) tasksOf(pid int) []int {
	ents, err := os.ReadDir(filepath.Join(p.Root, strconv.Itoa(pid), "task"))
	if err != nil {
		return nil
	}
	out := make([]int, 0, len(ents))
	for _, e := range ents {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, tid)
		}
	}
	return out
}

var (
	// "    25.74%    18226:sqlite.test" (perf report --sort pid).
	perfPidLine = regexp.MustCompile(`^\s*([0-9.]+)%\s+(\d+):(.*?)\s*$`)
	// "     5.12%  [.] runtime.futex" (perf report --sort sym).
	perfSymLine = regexp.MustCompile(`^\s*([0-9.]+)%\s+(\[[^\]]*\]\s+.*?)\s*$`)
	// "     6.00%     0.04%  [.] pkg.Func" (perf report --children --sort sym).
	perfChildrenLine = regexp.MustCompile(`^\s*([0-9.]+)%\s+[0-9.]+%\s+\[[^\]]*\]\s+(.*?)\s*$`)
)

// ownCode is the prefix of InvokeX's own symbols.
const ownCode = "github.com/invokex/invokex/internal/"

// skipInclusive reports whether an inclusive entry only repeats another:
// compiler-made wrappers (method values "-fm", "gowrap" closures, the
// frontend's per-route closures) and the processes' entry points.
func skipInclusive(name string) bool {
	switch name {
	case "cli.Main", "harness/driver/process.InitMain", "agent.Run":
		return true
	}
	return strings.HasSuffix(name, "-fm") || strings.Contains(name, ".gowrap") || strings.Contains(name, ".routes.")
}

// parsePerfInclusive returns the top n symbols of InvokeX's own code by
// inclusive share (the function and everything it called, kernel time of
// its system calls included), with the module prefix cut, without the
// entries skipInclusive names.
func parsePerfInclusive(out string, n int) []Share {
	var s []Share
	for _, line := range strings.Split(out, "\n") {
		m := perfChildrenLine.FindStringSubmatch(line)
		if m == nil || !strings.HasPrefix(m[2], ownCode) {
			continue
		}
		name := strings.TrimPrefix(m[2], ownCode)
		if skipInclusive(name) {
			continue
		}
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			continue
		}
		s = append(s, Share{Name: name, Percent: v})
	}
	sort.SliceStable(s, func(i, j int) bool { return s[i].Percent > s[j].Percent })
	if len(s) > n {
		s = s[:n]
	}
	return s
}

// parsePerfByRole sums `perf report --sort pid` percentages by role;
// threads without a role count as "other".
func parsePerfByRole(out string, roles map[int]string) []Share {
	sum := map[string]float64{}
	for _, line := range strings.Split(out, "\n") {
		m := perfPidLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			continue
		}
		tid, _ := strconv.Atoi(m[2])
		role, ok := roles[tid]
		if !ok {
			role = roleOther
		}
		sum[role] += v
	}
	return sortedShares(sum)
}

// parsePerfSyms returns the top n `perf report --sort sym` lines.
func parsePerfSyms(out string, n int) []Share {
	var s []Share
	for _, line := range strings.Split(out, "\n") {
		m := perfSymLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil {
			continue
		}
		s = append(s, Share{Name: strings.Join(strings.Fields(m[2]), " "), Percent: v})
	}
	sort.SliceStable(s, func(i, j int) bool { return s[i].Percent > s[j].Percent })
	if len(s) > n {
		s = s[:n]
	}
	return s
}

func sortedShares(m map[string]float64) []Share {
	s := make([]Share, 0, len(m))
	for k, v := range m {
		s = append(s, Share{Name: k, Percent: v})
	}
	sort.Slice(s, func(i, j int) bool {
		if s[i].Percent != s[j].Percent {
			return s[i].Percent > s[j].Percent
		}
		return s[i].Name < s[j].Name
	})
	return s
}

// perfCapture is a perf recording taken while InvokeX ran a load, waiting
// to be analysed. perf resolves symbols only after the sandboxes are gone:
// while they live, perf looks for the invokex binary inside their mount
// namespaces, fails, and then leaves the server without symbols too.
type perfCapture struct {
	dst      *ProfileResult
	res      ProfileResult
	notes    []string
	perf     string
	data     string
	buildIDs string
	roles    map[int]string
}

// capturePerf runs load (which must return when its context is done) for
// secs seconds while perf records the whole machine, so that the sandboxes
// and functions are seen too. It also takes the server's /debug/pprof
// profile when withPprof is set and the server serves one. The result is
// analysed by analyzePerf once the server has stopped.
func (r *runner) capturePerf(ctx context.Context, srv *ixServer, dst *ProfileResult, label string, secs int, withPprof bool, load func(context.Context)) {
	c := &perfCapture{dst: dst, res: ProfileResult{Seconds: secs, Load: label}, roles: map[int]string{}}
	r.captures = append(r.captures, c)
	pprofOK := false
	if withPprof {
		if req, err := http.NewRequestWithContext(ctx, http.MethodGet, srv.endpoint+"/debug/pprof/", nil); err == nil {
			if resp, err := r.http.Do(req); err == nil {
				resp.Body.Close()
				pprofOK = resp.StatusCode == http.StatusOK
			}
		}
		if !pprofOK {
			c.notes = append(c.notes, "the server serves no /debug/pprof, so no Go profile of it")
		}
	}
	perf, perfErr := exec.LookPath("perf")
	if perfErr != nil {
		c.notes = append(c.notes, "perf is not installed (apt-get install linux-perf), so no system-wide profile")
	}
	if !pprofOK && perfErr != nil {
		return
	}

	lctx, cancel := context.WithTimeout(ctx, time.Duration(secs)*time.Second+time.Second)
	defer cancel()
	loadDone := make(chan struct{})
	go func() {
		defer close(loadDone)
		load(lctx)
	}()
	defer func() { cancel(); <-loadDone }()
	// Let the load reach its steady state before sampling.
	time.Sleep(300 * time.Millisecond)

	var perfCmd *exec.Cmd
	var perfStderr strings.Builder
	// perf's build-id cache, private to this run (its default is ~/.debug).
	c.buildIDs = filepath.Join(r.work, "perf-buildid")
	c.data = filepath.Join(r.work, "perf-"+strconv.Itoa(len(r.captures))+".data")
	if perfErr == nil {
		perfCmd = exec.Command(perf, "--buildid-dir", c.buildIDs, "record", "-a", "-g", "-F", "999", "-e", "cpu-clock",
			"-o", c.data, "--", "sleep", strconv.Itoa(secs))
		perfCmd.Stdout = io.Discard
		perfCmd.Stderr = &perfStderr
		if err := perfCmd.Start(); err != nil {
			c.notes = append(c.notes, "perf record: "+err.Error())
			perfCmd = nil
		}
	}
	// Threads are attributed by a snapshot of the process tree taken now
	// and another when perf is done (Go starts threads under load).
	snapshot := func() {
		if procs, err := r.fs.Procs(); err == nil {
			for tid, role := range roleMap(procs, r.fs.tasksOf, srv.pid(), os.Getpid(), r.fnComm) {
				c.roles[tid] = role
			}
		}
	}
	snapshot()
	if pprofOK {
		c.res.PprofTop = r.fetchPprof(ctx, srv, secs, &c.notes)
		if c.res.PprofTop != "" {
			c.res.Tool = "pprof"
		}
	}
	if perfCmd != nil {
		if err := perfCmd.Wait(); err != nil {
			c.notes = append(c.notes, "perf record: "+err.Error()+": "+lastLine(perfStderr.String()))
		} else {
			c.perf = perf
		}
		snapshot()
	}
}

// analyzeCaptures analyses every pending capture into its report field.
func (r *runner) analyzeCaptures(ctx context.Context) {
	for _, c := range r.captures {
		*c.dst = r.analyzePerf(ctx, c)
	}
	r.captures = nil
}

// analyzePerf turns a capture into its ProfileResult. Call it after the
// server and its sandboxes have stopped (see perfCapture).
func (r *runner) analyzePerf(ctx context.Context, c *perfCapture) ProfileResult {
	res := c.res
	notes := c.notes
	if c.perf != "" {
		perf := c.perf
		for _, bin := range []string{r.opts.InvokexBin, r.bootstrap} {
			if out, err := exec.CommandContext(ctx, perf, "--buildid-dir", c.buildIDs, "buildid-cache", "-a", bin).CombinedOutput(); err != nil {
				notes = append(notes, fmt.Sprintf("perf buildid-cache %s: %v: %s", filepath.Base(bin), err, lastLine(string(out))))
			}
		}
		report := func(args ...string) (string, error) {
			base := []string{"--buildid-dir", c.buildIDs, "report", "-i", c.data, "--stdio", "-g", "none"}
			if args[0] != "--children" {
				base = append(base, "--no-children")
			}
			out, err := exec.CommandContext(ctx, perf, append(base, args...)...).Output()
			return string(out), err
		}
		if out, err := report("--sort", "pid", "--percent-limit", "0"); err == nil {
			res.ByRole = parsePerfByRole(out, c.roles)
			if res.Tool == "" {
				res.Tool = "perf"
			} else {
				res.Tool = "perf + " + res.Tool
			}
		} else {
			notes = append(notes, "perf report: "+err.Error())
		}
		for _, part := range []struct {
			self, paths *[]Share
			roles       []string
		}{
			{&res.Server, &res.ServerPaths, []string{roleServer}},
			{&res.Sandbox, &res.SandboxPaths, []string{roleInit, roleAgent}},
			{&res.Function, nil, []string{roleFunction}},
		} {
			tids := tidsOf(c.roles, part.roles...)
			if len(tids) == 0 {
				continue
			}
			out, err := report("--tid", tids, "--sort", "sym", "--percentage", "absolute", "--percent-limit", "0.2")
			if err != nil {
				notes = append(notes, "perf report: "+err.Error())
				continue
			}
			*part.self = parsePerfSyms(out, 10)
			if part.paths == nil {
				continue
			}
			out, err = report("--children", "--tid", tids, "--sort", "sym", "--percentage", "absolute", "--percent-limit", "0.5")
			if err != nil {
				notes = append(notes, "perf report --children: "+err.Error())
				continue
			}
			*part.paths = parsePerfInclusive(out, 15)
		}
		notes = append(notes, "perf record -a -g -F 999 -e cpu-clock; shares are of all samples of both cores, idle included")
	}
	res.Note = strings.Join(notes, "; ")
	return res
}

// tidsOf returns the comma-separated thread ids with one of the roles.
func tidsOf(roles map[int]string, want ...string) string {
	var ids []int
	for tid, role := range roles {
		if tid != 0 && contains(want, role) {
			ids = append(ids, tid)
		}
	}
	sort.Ints(ids)
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.Itoa(id)
	}
	return strings.Join(s, ",")
}

// fetchPprof takes a CPU profile from the server and renders its top.
func (r *runner) fetchPprof(ctx context.Context, srv *ixServer, secs int, notes *[]string) string {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", srv.endpoint, secs), nil)
	if err != nil {
		return ""
	}
	resp, err := r.http.Do(req)
	if err != nil {
		*notes = append(*notes, "pprof: "+err.Error())
		return ""
	}
	defer resp.Body.Close()
	path := filepath.Join(r.work, "server.pprof")
	f, err := os.Create(path)
	if err != nil {
		*notes = append(*notes, "pprof: "+err.Error())
		return ""
	}
	_, err = io.Copy(f, resp.Body)
	f.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		*notes = append(*notes, fmt.Sprintf("pprof: HTTP %d %v", resp.StatusCode, err))
		return ""
	}
	if r.opts.GoBin == "" {
		*notes = append(*notes, "pprof: no go tool to render the profile")
		return ""
	}
	out, err := exec.CommandContext(ctx, r.opts.GoBin, "tool", "pprof", "-top", "-nodecount=25", r.opts.InvokexBin, path).Output()
	if err != nil {
		*notes = append(*notes, "go tool pprof: "+err.Error())
		return ""
	}
	return string(out)
}
