package agent

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestStatusField(t *testing.T) {
	status := []byte("Name:\tbootstrap\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\nPid:\t42\nPPid:\t1\n" +
		"VmPeak:\t  1237340 kB\nVmSize:\t  1237340 kB\nVmHWM:\t    9120 kB\nVmRSS:\t    8800 kB\nThreads:\t5\n")
	for key, want := range map[string]int64{"PPid": 1, "VmHWM": 9120, "VmRSS": 8800, "Pid": 42, "VmSwap": -1, "Vm": -1, "Name": -1} {
		if got := statusField(status, key); got != want {
			t.Errorf("statusField(%s) = %d, want %d", key, got, want)
		}
	}
	if got := statusField(status[:len(status)-20], "VmHWM"); got != 9120 {
		t.Errorf("statusField on a truncated file = %d", got)
	}
}

// Max Memory Used covers the invocation's own peak, even when the memory
// was given back before the response, and stays a high-water mark.
func TestMaxMemoryCoversTheInvocationsPeak(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	before := ta.invoke(action{Do: "echo"})
	mustSucceed(t, before)
	const allocMB = 96
	r := ta.invoke(action{Do: "alloc", N: allocMB})
	mustSucceed(t, r)
	if r.MaxMemoryMB < allocMB {
		t.Fatalf("MaxMemoryMB = %d after an invocation that held %d MiB (before it: %d)", r.MaxMemoryMB, allocMB, before.MaxMemoryMB)
	}
	after := ta.invoke(action{Do: "echo"})
	mustSucceed(t, after)
	if after.MaxMemoryMB < r.MaxMemoryMB {
		t.Fatalf("MaxMemoryMB fell from %d to %d: it is a peak", r.MaxMemoryMB, after.MaxMemoryMB)
	}
}

// statusOpenFor reports whether this process holds /proc/<pid>/status open.
func statusOpenFor(t *testing.T, pid int) bool {
	t.Helper()
	want := "/proc/" + strconv.Itoa(pid) + "/status"
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && target == want {
			return true
		}
	}
	return false
}

// The status file kept open for a runtime is closed when it is reset.
func TestPeakReaderClosedOnReset(t *testing.T) {
	t.Parallel()
	ta := startAgent(t)
	if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
		t.Fatalf("init: %+v %s", d.Error, body)
	}
	r := ta.invoke(action{Do: "pid"})
	mustSucceed(t, r)
	pid := decodeJSON[map[string]int](t, r.payload)["pid"]
	if !statusOpenFor(t, pid) {
		t.Fatalf("no open status file for runtime pid %d after an invocation", pid)
	}
	if r := ta.invoke(action{Do: "exit"}); !r.Reset {
		t.Fatalf("runtime exit did not reset: %+v", r.Result)
	}
	if statusOpenFor(t, pid) {
		t.Fatalf("status file of reset runtime pid %d still open", pid)
	}
	mustSucceed(t, ta.invoke(action{Do: "echo"}))
}
