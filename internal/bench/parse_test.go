package bench

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

const rieLog = `25 Nov 2026 22:00:46,625 [INFO] (rapid) exec '/tmp/x/bootstrap' (cwd=/tmp/x, handler=)
START RequestId: 46d5faf0 Version: $LATEST
25 Nov 2026 22:00:47,055 [INFO] (rapid) INIT START(type: on-demand, phase: init)
25 Nov 2026 22:00:47,090 [INFO] (rapid) INIT REPORT(durationMs: 34.914000)
END RequestId: 46d5faf0
REPORT RequestId: 46d5faf0	Init Duration: 0.30 ms	Duration: 37.74 ms	Billed Duration: 38 ms	Memory Size: 3008 MB	Max Memory Used: 3008 MB	
`

func TestParseRIEInit(t *testing.T) {
	// rapid's INIT REPORT is the real init; the REPORT line's figure is not.
	d, ok := parseRIEInit([]byte(rieLog))
	if !ok || d != msToDuration(34.914) {
		t.Errorf("parseRIEInit = %v, %v; want 34.914ms", d, ok)
	}
	onlyReport := "REPORT RequestId: x\tInit Duration: 12.50 ms\tDuration: 1.00 ms\n"
	if d, ok := parseRIEInit([]byte(onlyReport)); !ok || d != 12500*time.Microsecond {
		t.Errorf("parseRIEInit(REPORT only) = %v, %v; want 12.5ms", d, ok)
	}
	if _, ok := parseRIEInit([]byte("START RequestId: x\nEND RequestId: x\n")); ok {
		t.Error("parseRIEInit of a warm log found an init")
	}
}

func TestParsePanic(t *testing.T) {
	log := rieLog + `25 Nov 2026 22:00:47,182 [INFO] (rapid) ReserveFailed: AlreadyReserved
panic: runtime error: invalid memory address or nil pointer dereference
[signal SIGSEGV: segmentation violation code=0x1 addr=0x40 pc=0x79d44a]

goroutine 53 [running]:
github.com/aws/aws-lambda-runtime-interface-emulator/internal/lambda/rapidcore.(*Server).Invoke.func2()
	/root/go/pkg/mod/github.com/aws/x/server.go:666 +0xea
`
	want := "panic: runtime error: invalid memory address or nil pointer dereference (in rapidcore.(*Server).Invoke.func2)"
	if got := parsePanic([]byte(log)); got != want {
		t.Errorf("parsePanic = %q\nwant %q", got, want)
	}
	if got := parsePanic([]byte(rieLog)); got != "" {
		t.Errorf("parsePanic without a panic = %q", got)
	}
}

const perfByPid = `# Overhead      Pid:Command
# ........  .......................
#
    31.11%      101:invokex
    20.00%      102:invokex
    19.61%        0:swapper
    10.00%      200:invokex
     9.00%      201:bootstrap
     5.00%      900:bench
     5.28%      777:kworker/u8:1-wr
`

func TestParsePerfByRole(t *testing.T) {
	roles := map[int]string{0: roleIdle, 101: roleServer, 102: roleServer, 200: roleInit, 201: roleFunction, 900: roleClient}
	got := parsePerfByRole(perfByPid, roles)
	want := []Share{
		{roleServer, 51.11}, {roleIdle, 19.61}, {roleInit, 10}, {roleFunction, 9}, {roleOther, 5.28}, {roleClient, 5},
	}
	if len(got) != len(want) {
		t.Fatalf("parsePerfByRole = %+v", got)
	}
	for i := range want {
		if got[i].Name != want[i].Name || abs(got[i].Percent-want[i].Percent) > 1e-9 {
			t.Errorf("share %d = %+v, want %+v", i, got[i], want[i])
		}
	}
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}

func TestParsePerfSyms(t *testing.T) {
	out := `# Samples: 1K of event 'cpu-clock'
#
     6.60%  [k] _raw_spin_unlock_irqrestore
     0.40%  [.] runtime.mallocgc
     1.20%  [.] net/http.(*conn).serve
#
`
	got := parsePerfSyms(out, 2)
	want := []Share{{"[k] _raw_spin_unlock_irqrestore", 6.6}, {"[.] net/http.(*conn).serve", 1.2}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parsePerfSyms = %+v, want %+v", got, want)
	}
}

func TestRoleMap(t *testing.T) {
	tasks := func(pid int) []int {
		if pid == 100 {
			return []int{100, 105, 106}
		}
		return []int{pid}
	}
	roles := roleMap(tree, tasks, 100, 50, "bootstrap")
	want := map[int]string{
		0: roleIdle, 100: roleServer, 105: roleServer, 106: roleServer, 50: roleClient,
		200: roleInit, 201: roleFunction, 300: roleInit, 301: roleAgent, 302: roleFunction,
	}
	if !reflect.DeepEqual(roles, want) {
		t.Errorf("roleMap = %v\nwant %v", roles, want)
	}
	if got := tidsOf(roles, roleInit, roleAgent); got != "200,300,301" {
		t.Errorf("tidsOf(init, agent) = %q", got)
	}
}

func TestParseMachineFiles(t *testing.T) {
	cpu := "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R)  Xeon(R) CPU @ 2.00GHz\n"
	if got := parseCPUModel([]byte(cpu)); got != "Intel(R) Xeon(R) CPU @ 2.00GHz" {
		t.Errorf("parseCPUModel = %q", got)
	}
	if got := parseMemTotal([]byte("MemTotal:       24000000 kB\nMemFree: 1 kB\n")); got != 24000000*1024 {
		t.Errorf("parseMemTotal = %d", got)
	}
	if got := parseMemTotal([]byte("nothing")); got != 0 {
		t.Errorf("parseMemTotal(nothing) = %d", got)
	}
	m := probeMachine("")
	if m.Cores < 1 || !strings.HasPrefix(m.GoVersion, "go") {
		t.Errorf("probeMachine = %+v", m)
	}
}

func TestParsePerfInclusive(t *testing.T) {
	out := `# Children      Self  Symbol
    44.95%     0.00%  [.] runtime.goexit.abi0
     7.37%     0.00%  [.] github.com/invokex/invokex/internal/frontend.(*Server).invoke-fm
     7.36%     0.01%  [.] github.com/invokex/invokex/internal/frontend.(*Server).invoke
     1.67%     0.00%  [.] github.com/invokex/invokex/internal/controlplane.(*recordWriter).start.gowrap1
     9.00%     0.00%  [.] github.com/invokex/invokex/internal/cli.Main
     8.90%     0.00%  [.] github.com/invokex/invokex/internal/frontend.(*Server).routes.(*Server).handle.func15
     6.00%     0.04%  [.] github.com/invokex/invokex/internal/controlplane.(*Service).resolve
     4.08%     0.03%  [.] github.com/invokex/invokex/internal/controlplane/store/sqlite.(*functions).Get
`
	got := parsePerfInclusive(out, 2)
	want := []Share{{"frontend.(*Server).invoke", 7.36}, {"controlplane.(*Service).resolve", 6}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parsePerfInclusive = %+v, want %+v", got, want)
	}
}

func TestParseDriverStarts(t *testing.T) {
	log := `time=2026-11-25T22:31:28.419Z level=INFO msg="function created" component=controlplane function=c1
time=2026-11-25T22:31:28.645Z level=DEBUG msg="instance started" component=harness driver=process function=c1 instance=ix-1 driver_start=21.776817ms init=5.09498ms
time=2026-11-25T22:31:29.645Z level=DEBUG msg="instance started" component=harness driver=process function=c1 instance=ix-2 driver_start=950µs init=1s
time=2026-11-25T22:31:29.646Z level=DEBUG msg=request component=frontend operation=Invoke duration_ms=208.668
`
	got := parseDriverStarts([]byte(log))
	want := []time.Duration{21776817 * time.Nanosecond, 950 * time.Microsecond}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseDriverStarts = %v, want %v", got, want)
	}
}
