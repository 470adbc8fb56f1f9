package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Proc is one process as /proc/<pid>/stat describes it.
type Proc struct {
	PID  int
	PPID int
	Comm string
	// CPU is the user plus system time the process has used, in clock
	// ticks (USER_HZ, 100 per second on Linux); 0 when stat was short.
	CPU int64
}

// clockTick is USER_HZ: the unit of /proc/<pid>/stat's utime and stime.
// It is 100 on every Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

// Mem is a process's memory in bytes. RSS counts every resident page the
// process maps, including pages shared with other processes (the same
// binary's text in every sandbox); PSS divides each shared page among its
// sharers, so PSS values add up to the real total; Private is what only
// this process uses (USS), i.e. what stopping it would free.
type Mem struct {
	RSS     int64
	PSS     int64
	Private int64
}

// Add returns m+o.
func (m Mem) Add(o Mem) Mem {
	return Mem{RSS: m.RSS + o.RSS, PSS: m.PSS + o.PSS, Private: m.Private + o.Private}
}

// Mean is m, a sum over n measurements, divided by n (m itself for n < 1).
func (m Mem) Mean(n int) Mem {
	if n < 1 {
		return m
	}
	k := int64(n)
	return Mem{RSS: m.RSS / k, PSS: m.PSS / k, Private: m.Private / k}
}

// procFS reads a /proc file system rooted at Root ("/proc" on a real
// system; tests use a fake tree).
type procFS struct{ Root string }

var hostProc = procFS{Root: "/proc"}

// parseStat parses the content of /proc/<pid>/stat. The command name is in
// parentheses and may itself contain spaces and parentheses, so the fields
// after it are found from the last ')'.
func parseStat(b []byte) (Proc, error) {
	s := string(b)
	open := strings.IndexByte(s, '(')
	closing := strings.LastIndexByte(s, ')')
	if open < 0 || closing < open {
		return Proc{}, fmt.Errorf("malformed stat %q", truncate(s, 80))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(s[:open]))
	if err != nil {
		return Proc{}, fmt.Errorf("malformed stat pid %q: %w", truncate(s, 80), err)
	}
	rest := strings.Fields(s[closing+1:])
	// rest[0] is the state, rest[1] the parent's pid.
	if len(rest) < 2 {
		return Proc{}, fmt.Errorf("malformed stat %q: too few fields", truncate(s, 80))
	}
	ppid, err := strconv.Atoi(rest[1])
	if err != nil {
		return Proc{}, fmt.Errorf("malformed stat ppid %q: %w", rest[1], err)
	}
	p := Proc{PID: pid, PPID: ppid, Comm: s[open+1 : closing]}
	// rest[11] and rest[12] are utime and stime.
	if len(rest) >= 13 {
		ut, err1 := strconv.ParseInt(rest[11], 10, 64)
		st, err2 := strconv.ParseInt(rest[12], 10, 64)
		if err1 == nil && err2 == nil {
			p.CPU = ut + st
		}
	}
	return p, nil
}

// parseStatusRSS returns VmRSS from /proc/<pid>/status, in bytes. A kernel
// thread (or a zombie) has no VmRSS line: that is an error.
func parseStatusRSS(b []byte) (int64, error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return parseKB(v)
		}
	}
	return 0, errors.New("no VmRSS line in status")
}

// parseSmapsRollup returns Rss, Pss and Private_Clean+Private_Dirty from
// /proc/<pid>/smaps_rollup, in bytes.
func parseSmapsRollup(b []byte) (Mem, error) {
	var m Mem
	var seen int
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch key {
		case "Rss":
			dst = &m.RSS
		case "Pss":
			dst = &m.PSS
		case "Private_Clean", "Private_Dirty":
			dst = &m.Private
		default:
			continue
		}
		v, err := parseKB(val)
		if err != nil {
			return Mem{}, fmt.Errorf("smaps_rollup %s: %w", key, err)
		}
		*dst += v
		seen++
	}
	if seen < 4 {
		return Mem{}, errors.New("smaps_rollup lacks Rss, Pss or Private_* lines")
	}
	return m, nil
}

// parseKB parses "   1234 kB" into bytes.
func parseKB(s string) (int64, error) {
	f := strings.Fields(s)
	if len(f) != 2 || f[1] != "kB" {
		return 0, fmt.Errorf("malformed size %q", strings.TrimSpace(s))
	}
	v, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("malformed size %q: %w", strings.TrimSpace(s), err)
	}
	return v * 1024, nil
}

// Procs lists every process. Processes that exit while being read are
// skipped.
func (p procFS) Procs() ([]Proc, error) {
	ents, err := os.ReadDir(p.Root)
	if err != nil {
		return nil, fmt.Errorf("listing processes: %w", err)
	}
	var out []Proc
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(p.Root, e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		pr, err := parseStat(b)
		if err != nil {
			return nil, err
		}
		out = append(out, pr)
	}
	return out, nil
}

// Mem returns pid's memory: from smaps_rollup when the kernel has it
// (Linux 4.14+), else RSS alone from status (PSS and Private then equal RSS,
// an overestimate).
func (p procFS) Mem(pid int) (Mem, error) {
	dir := filepath.Join(p.Root, strconv.Itoa(pid))
	if b, err := os.ReadFile(filepath.Join(dir, "smaps_rollup")); err == nil {
		m, err := parseSmapsRollup(b)
		if err != nil {
			return Mem{}, fmt.Errorf("memory of pid %d: %w", pid, err)
		}
		return m, nil
	}
	b, err := os.ReadFile(filepath.Join(dir, "status"))
	if err != nil {
		return Mem{}, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	rss, err := parseStatusRSS(b)
	if err != nil {
		return Mem{}, fmt.Errorf("memory of pid %d: %w", pid, err)
	}
	return Mem{RSS: rss, PSS: rss, Private: rss}, nil
}

// Subtrees groups the descendants of root by root's direct child they
// descend from: the result maps each child's pid to that child and all its
// descendants (child first, the rest in pid order). Under the InvokeX server
// each direct child is one sandbox instance's init, so each group is one
// instance. A process whose parent chain loops or is broken is ignored.
func Subtrees(procs []Proc, root int) map[int][]Proc {
	byPID := make(map[int]Proc, len(procs))
	for _, p := range procs {
		byPID[p.PID] = p
	}
	// top returns the direct child of root that pid descends from.
	top := func(pid int) (int, bool) {
		cur := pid
		for steps := 0; steps < len(procs)+1; steps++ {
			p, ok := byPID[cur]
			if !ok {
				return 0, false
			}
			if p.PPID == root {
				return cur, true
			}
			if p.PPID <= 0 || p.PPID == cur {
				return 0, false
			}
			cur = p.PPID
		}
		return 0, false // a loop: only possible with a torn read of /proc
	}
	groups := map[int][]Proc{}
	for _, p := range procs {
		if p.PID == root {
			continue
		}
		if t, ok := top(p.PID); ok {
			groups[t] = append(groups[t], p)
		}
	}
	for t, g := range groups {
		sort.Slice(g, func(i, j int) bool {
			if (g[i].PID == t) != (g[j].PID == t) {
				return g[i].PID == t
			}
			return g[i].PID < g[j].PID
		})
	}
	return groups
}

// Descendants returns every descendant of root.
func Descendants(procs []Proc, root int) []Proc {
	var out []Proc
	for _, g := range Subtrees(procs, root) {
		out = append(out, g...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// parseCgroupFile returns the memory cgroup path of a process from
// /proc/<pid>/cgroup: the cgroup v2 path ("0::/a/b"), else the v1 memory
// controller's path ("4:memory:/a/b"). v2 is true for a v2 path.
func parseCgroupFile(b []byte) (path string, v2 bool, err error) {
	var v1 string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			continue
		}
		if f[0] == "0" && f[1] == "" {
			return f[2], true, nil
		}
		for _, c := range strings.Split(f[1], ",") {
			if c == "memory" {
				v1 = f[2]
			}
		}
	}
	if v1 != "" {
		return v1, false, nil
	}
	return "", false, errors.New("no memory cgroup in cgroup file")
}

// cgroupMemory returns the memory charged to pid's cgroup (v2
// memory.current, v1 memory.usage_in_bytes): the processes' memory plus
// kernel memory and page cache charged to the cgroup.
func cgroupMemory(fs procFS, pid int) (int64, error) {
	b, err := os.ReadFile(filepath.Join(fs.Root, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return 0, fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	path, v2, err := parseCgroupFile(b)
	if err != nil {
		return 0, fmt.Errorf("cgroup of pid %d: %w", pid, err)
	}
	file := filepath.Join("/sys/fs/cgroup", path, "memory.current")
	if !v2 {
		file = filepath.Join("/sys/fs/cgroup/memory", path, "memory.usage_in_bytes")
	}
	v, err := os.ReadFile(file)
	if err != nil {
		return 0, fmt.Errorf("cgroup memory of pid %d: %w", pid, err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(v)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("cgroup memory of pid %d: %w", pid, err)
	}
	return n, nil
}
