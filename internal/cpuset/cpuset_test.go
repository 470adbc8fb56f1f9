package cpuset

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
)

func TestMaskList(t *testing.T) {
	in := []int{0, 3, 64, 65}
	if got := List(Mask(in)); !slices.Equal(got, in) {
		t.Errorf("List(Mask(%v)) = %v", in, got)
	}
	if got := List(Mask(nil)); len(got) != 0 {
		t.Errorf("List of the empty mask = %v", got)
	}
}

func allowedList(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no Cpus_allowed_list in /proc/%d/status", pid)
	return ""
}

func TestPinProcess(t *testing.T) {
	cpus, err := Allowed()
	if err != nil {
		t.Fatal(err)
	}
	if len(cpus) < 2 {
		t.Skipf("skipping: needs 2 CPUs, the test may use %v", cpus)
	}
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = child.Process.Kill(); _ = child.Wait() }()
	last := cpus[len(cpus)-1]
	if err := PinProcess(child.Process.Pid, []int{last}); err != nil {
		t.Fatalf("PinProcess: %v", err)
	}
	if got := allowedList(t, child.Process.Pid); got != strconv.Itoa(last) {
		t.Errorf("child allowed on %q after pinning to CPU %d", got, last)
	}
	if got := allowedList(t, os.Getpid()); got == strconv.Itoa(last) {
		t.Errorf("pinning the child narrowed the test process too (%q)", got)
	}
}
