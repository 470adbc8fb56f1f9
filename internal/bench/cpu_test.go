package bench

import (
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
	p, err := parseStat([]byte("42 (invokex) S 1 42 42 0 -1 4194560 500 0 3 0 250 130 0 0 20 0 9 0\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p.CPU != 380 {
		t.Errorf("CPU = %d ticks, want 250+130", p.CPU)
	}
}

func TestPerInvoke(t *testing.T) {
	before := cpuSample{
		platform: map[int]int64{100: 1000},
		sandbox:  map[int]int64{200: 50, 300: 70}, // 300 exits during the load
		function: map[int]int64{201: 10},
		client:   500,
	}
	after := cpuSample{
		platform: map[int]int64{100: 1200},          // +200
		sandbox:  map[int]int64{200: 150, 400: 100}, // +100, and a new one with 100
		function: map[int]int64{201: 110},           // +100
		client:   900,                               // +400
	}
	got := perInvoke(before, after, 100)
	want := CPUPerInvoke{
		Platform: 400 * clockTick / 100, // server 200 + sandboxes 200
		Sandbox:  200 * clockTick / 100,
		Function: 100 * clockTick / 100,
		Client:   400 * clockTick / 100,
		Measured: true,
	}
	if got != want {
		t.Errorf("perInvoke = %+v, want %+v", got, want)
	}
	if want.Platform != 40*time.Millisecond {
		t.Errorf("tick arithmetic: platform %v, want 40ms", want.Platform)
	}
	if got := perInvoke(before, after, 0); got.Measured {
		t.Errorf("perInvoke over no invocations = %+v", got)
	}
}

func TestSampleCPU(t *testing.T) {
	fs := fakeProc(t, tree, nil, nil)
	s, err := sampleCPU(fs, 100, "bootstrap")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.platform) != 1 || len(s.sandbox) != 3 || len(s.function) != 2 {
		t.Errorf("sampleCPU = platform %v sandbox %v function %v; want 1 server, 3 sandbox, 2 function processes",
			s.platform, s.sandbox, s.function)
	}
}

func TestCPUTicksAddAndPer(t *testing.T) {
	a := cpuTicks{platform: 10, sandbox: 4, function: 6, client: 2}
	sum := a.add(cpuTicks{platform: 30, sandbox: 6, function: 4, client: 8})
	if sum != (cpuTicks{40, 10, 10, 10}) {
		t.Errorf("add = %+v", sum)
	}
	got := sum.per(20)
	if got.Platform != 20*time.Millisecond || got.Sandbox != 5*time.Millisecond || got.Function != 5*time.Millisecond || !got.Measured {
		t.Errorf("per = %+v", got)
	}
}

func TestParseProcStatBusy(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice
	stat := "cpu  100 5 50 1000 20 3 7 2 40 1\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
	got, err := parseProcStatBusy([]byte(stat))
	if err != nil || got != 100+5+50+3+7+2 {
		t.Errorf("parseProcStatBusy = %d, %v; want 167", got, err)
	}
	if _, err := parseProcStatBusy([]byte("intr 1 2 3\n")); err == nil {
		t.Error("parseProcStatBusy accepted a line that is not cpu")
	}
}

func TestOtherShare(t *testing.T) {
	// 2 cores × 1 s = 200 ticks of capacity; 150 busy, 100 ours: 25%.
	if got := otherShare(150, 100, time.Second, 2); got != 0.25 {
		t.Errorf("otherShare = %v, want 0.25", got)
	}
	if got := otherShare(90, 100, time.Second, 2); got != 0 {
		t.Errorf("otherShare with more of ours than busy = %v, want 0", got)
	}
	if got := otherShare(-1, 0, time.Second, 2); got != -1 {
		t.Errorf("otherShare unknown = %v", got)
	}
}
