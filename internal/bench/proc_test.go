package bench

import (
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"testing"
)

func TestParseStat(t *testing.T) {
	p, err := parseStat([]byte("1234 (my (odd) prog) S 99 1234 1234 0 -1 4194560 100 0 0 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p != (Proc{PID: 1234, PPID: 99, Comm: "my (odd) prog"}) {
		t.Errorf("parseStat = %+v", p)
	}
	for _, bad := range []string{"", "1234 no parens S 1", "x (a) S 1", "12 (a) S", "12 (a) S notanumber"} {
		if _, err := parseStat([]byte(bad)); err == nil {
			t.Errorf("parseStat(%q) succeeded, want error", bad)
		}
	}
}

func TestParseStatusRSS(t *testing.T) {
	status := "Name:\tbootstrap\nVmPeak:\t  10000 kB\nVmRSS:\t    8300 kB\nThreads:\t5\n"
	got, err := parseStatusRSS([]byte(status))
	if err != nil || got != 8300*1024 {
		t.Errorf("parseStatusRSS = %d, %v; want %d", got, err, 8300*1024)
	}
	if _, err := parseStatusRSS([]byte("Name:\tkthreadd\n")); err == nil {
		t.Error("parseStatusRSS without VmRSS succeeded")
	}
	if _, err := parseStatusRSS([]byte("VmRSS:\t 12 MB\n")); err == nil {
		t.Error("parseStatusRSS with a unit other than kB succeeded")
	}
}

const smapsRollup = `00400000-7ffd4b1f2000 ---p 00000000 00:00 0                          [rollup]
Rss:               16640 kB
Pss:                6200 kB
Pss_Anon:           4000 kB
Shared_Clean:      10000 kB
Shared_Dirty:          0 kB
Private_Clean:       100 kB
Private_Dirty:      5000 kB
Referenced:        16640 kB
`

func TestParseSmapsRollup(t *testing.T) {
	m, err := parseSmapsRollup([]byte(smapsRollup))
	if err != nil {
		t.Fatal(err)
	}
	want := Mem{RSS: 16640 << 10, PSS: 6200 << 10, Private: 5100 << 10}
	if m != want {
		t.Errorf("parseSmapsRollup = %+v, want %+v", m, want)
	}
	if _, err := parseSmapsRollup([]byte("Rss: 1 kB\n")); err == nil {
		t.Error("parseSmapsRollup without Pss and Private_* succeeded")
	}
}

// fakeProc builds a /proc tree with the given processes; mem, if set,
// gives a process an smaps_rollup (else only a status with VmRSS).
func fakeProc(t *testing.T, procs []Proc, rollup map[int]string, rss map[int]int) procFS {
	t.Helper()
	root := t.TempDir()
	for _, p := range procs {
		dir := filepath.Join(root, strconv.Itoa(p.PID))
		if err := os.MkdirAll(filepath.Join(dir, "task", strconv.Itoa(p.PID)), 0o755); err != nil {
			t.Fatal(err)
		}
		stat := strconv.Itoa(p.PID) + " (" + p.Comm + ") S " + strconv.Itoa(p.PPID) + " 1 1 0 -1\n"
		write(t, filepath.Join(dir, "stat"), stat)
		if r, ok := rollup[p.PID]; ok {
			write(t, filepath.Join(dir, "smaps_rollup"), r)
		}
		if v, ok := rss[p.PID]; ok {
			write(t, filepath.Join(dir, "status"), "Name:\t"+p.Comm+"\nVmRSS:\t"+strconv.Itoa(v)+" kB\n")
		}
	}
	// Not processes: must be ignored.
	write(t, filepath.Join(root, "meminfo"), "MemTotal: 1 kB\n")
	if err := os.MkdirAll(filepath.Join(root, "sys"), 0o755); err != nil {
		t.Fatal(err)
	}
	return procFS{Root: root}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// A server (100) with two instances (init 200 → function 201; init 300 →
// agent 301 → function 302), an unrelated process (50) and the kernel
// (pid 2 with ppid 0).
var tree = []Proc{
	{PID: 1, PPID: 0, Comm: "systemd"},
	{PID: 2, PPID: 0, Comm: "kthreadd"},
	{PID: 50, PPID: 1, Comm: "sshd"},
	{PID: 100, PPID: 1, Comm: "invokex"},
	{PID: 200, PPID: 100, Comm: "invokex"},
	{PID: 201, PPID: 200, Comm: "bootstrap"},
	{PID: 300, PPID: 100, Comm: "invokex"},
	{PID: 302, PPID: 301, Comm: "bootstrap"},
	{PID: 301, PPID: 300, Comm: "invokex"},
}

func TestSubtrees(t *testing.T) {
	g := Subtrees(tree, 100)
	want := map[int][]Proc{
		200: {tree[4], tree[5]},
		300: {tree[6], tree[8], tree[7]},
	}
	if !reflect.DeepEqual(g, want) {
		t.Errorf("Subtrees = %+v\nwant %+v", g, want)
	}
	if g := Subtrees(tree, 201); len(g) != 0 {
		t.Errorf("Subtrees of a leaf = %+v, want none", g)
	}
	var pids []int
	for _, p := range Descendants(tree, 100) {
		pids = append(pids, p.PID)
	}
	if !reflect.DeepEqual(pids, []int{200, 201, 300, 301, 302}) {
		t.Errorf("Descendants = %v", pids)
	}
}

func TestSubtreesSurvivesLoopsAndOrphans(t *testing.T) {
	procs := []Proc{
		{PID: 100, PPID: 1, Comm: "server"},
		{PID: 200, PPID: 100, Comm: "init"},
		{PID: 7, PPID: 8, Comm: "a"}, // a loop, as a torn read could show
		{PID: 8, PPID: 7, Comm: "b"},
		{PID: 9, PPID: 4242, Comm: "orphan"}, // parent not listed
	}
	g := Subtrees(procs, 100)
	if len(g) != 1 || len(g[200]) != 1 {
		t.Errorf("Subtrees = %+v, want only instance 200", g)
	}
}

func TestProcFS(t *testing.T) {
	fs := fakeProc(t, tree, map[int]string{201: smapsRollup}, map[int]int{200: 16000})
	procs, err := fs.Procs()
	if err != nil {
		t.Fatal(err)
	}
	sort.Slice(procs, func(i, j int) bool { return procs[i].PID < procs[j].PID })
	want := append([]Proc(nil), tree...)
	sort.Slice(want, func(i, j int) bool { return want[i].PID < want[j].PID })
	if !reflect.DeepEqual(procs, want) {
		t.Errorf("Procs = %+v\nwant %+v", procs, want)
	}
	m, err := fs.Mem(201)
	if err != nil || m != (Mem{RSS: 16640 << 10, PSS: 6200 << 10, Private: 5100 << 10}) {
		t.Errorf("Mem(201) from smaps_rollup = %+v, %v", m, err)
	}
	// Without smaps_rollup: RSS from status stands for all three.
	m, err = fs.Mem(200)
	if err != nil || m != (Mem{RSS: 16000 << 10, PSS: 16000 << 10, Private: 16000 << 10}) {
		t.Errorf("Mem(200) from status = %+v, %v", m, err)
	}
	if _, err := fs.Mem(300); err == nil {
		t.Error("Mem of a process without memory files succeeded")
	}
	if got := fs.tasksOf(201); !reflect.DeepEqual(got, []int{201}) {
		t.Errorf("tasksOf(201) = %v", got)
	}
}

func TestProcFSOnThisProcess(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	procs, err := hostProc.Procs()
	if err != nil {
		t.Fatal(err)
	}
	self := os.Getpid()
	found := false
	for _, p := range procs {
		if p.PID == self {
			found = p.PPID == os.Getppid()
		}
	}
	if !found {
		t.Errorf("this process (%d, parent %d) not listed with its parent", self, os.Getppid())
	}
	m, err := hostProc.Mem(self)
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS <= 0 || m.PSS <= 0 || m.PSS > m.RSS {
		t.Errorf("Mem(self) = %+v: want 0 < PSS <= RSS", m)
	}
}

func TestParseCgroupFile(t *testing.T) {
	p, v2, err := parseCgroupFile([]byte("0::/invokex/abc/inst-1\n"))
	if err != nil || !v2 || p != "/invokex/abc/inst-1" {
		t.Errorf("v2: %q %v %v", p, v2, err)
	}
	p, v2, err = parseCgroupFile([]byte("12:pids:/x\n4:cpu,memory:/invokex/i\n1:name=systemd:/y\n"))
	if err != nil || v2 || p != "/invokex/i" {
		t.Errorf("v1: %q %v %v", p, v2, err)
	}
	if _, _, err := parseCgroupFile([]byte("3:pids:/x\n")); err == nil {
		t.Error("no memory cgroup: want an error")
	}
}

func TestMountsUnder(t *testing.T) {
	mi := []byte(`22 1 0:21 / / rw - ext4 /dev/vda rw
30 22 0:30 / /tmp/bench/data/sandboxes/i1/root ro - tmpfs tmpfs ro
31 22 0:31 / /tmp/bench/data\040dir/x rw - tmpfs tmpfs rw
32 22 0:32 / /tmp/benchmark rw - tmpfs tmpfs rw
`)
	got := mountsUnder(mi, "/tmp/bench/data")
	if !reflect.DeepEqual(got, []string{"/tmp/bench/data/sandboxes/i1/root"}) {
		t.Errorf("mountsUnder(data) = %v", got)
	}
	if got := mountsUnder(mi, "/tmp/bench/data dir"); !reflect.DeepEqual(got, []string{"/tmp/bench/data dir/x"}) {
		t.Errorf("mountsUnder with an escaped space = %v", got)
	}
	if got := mountsUnder(mi, "/tmp/bench"); len(got) != 2 {
		t.Errorf("mountsUnder(/tmp/bench) = %v, want 2 (not /tmp/benchmark)", got)
	}
}

func TestSafeRemoveAll(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "w")
	if err := os.MkdirAll(filepath.Join(dir, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := safeRemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("dir still there: %v", err)
	}
	// A mount below the directory stops the removal.
	if err := os.MkdirAll(filepath.Join(dir, "root"), 0o755); err != nil {
		t.Fatal(err)
	}
	mi := []byte("30 22 0:30 / " + filepath.Join(dir, "root") + " ro - tmpfs tmpfs ro\n")
	if err := removeUnlessMounted(dir, mi); err == nil {
		t.Error("removeUnlessMounted with a mount below succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir, "root")); err != nil {
		t.Errorf("dir removed despite the mount: %v", err)
	}
}
