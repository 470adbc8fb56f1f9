package process

import (
	"slices"
	"testing"
)

func TestCPUPlacerSpreadsAndReleases(t *testing.T) {
	p := &cpuPlacer{cpus: []int{0, 1, 2, 3}, load: map[int]int{}}
	// 128 MB buys one vCPU: four sandboxes land on four different CPUs.
	var got [][]int
	seen := map[int]bool{}
	for range 4 {
		c := p.acquire(128)
		if len(c) != 1 {
			t.Fatalf("128 MB sandbox placed on %v, want one CPU", c)
		}
		if seen[c[0]] {
			t.Errorf("CPU %d given twice while others were free (placements so far %v)", c[0], got)
		}
		seen[c[0]] = true
		got = append(got, c)
	}
	// 2,000 MB buys two: the two least loaded after CPU 2 is released.
	p.release(got[2])
	p.release(got[0])
	two := p.acquire(2000)
	want := []int{got[0][0], got[2][0]}
	slices.Sort(want)
	if !slices.Equal(two, want) {
		t.Errorf("2000 MB sandbox placed on %v, want the two free CPUs %v", two, want)
	}
	// As many vCPUs as the host has: no placement at all.
	if c := p.acquire(10240); c != nil {
		t.Errorf("10240 MB sandbox on a 4-CPU host placed on %v, want nil (every CPU)", c)
	}
	// Releasing more than was acquired never goes negative.
	p.release([]int{3, 3, 3})
	if p.load[3] != 0 {
		t.Errorf("load of CPU 3 is %d after over-release, want 0", p.load[3])
	}
}

func TestCPUPlacerSingleCPUHost(t *testing.T) {
	p := &cpuPlacer{cpus: []int{5}, load: map[int]int{}}
	if c := p.acquire(128); c != nil {
		t.Errorf("on a one-CPU host placed on %v, want nil", c)
	}
	var nilPlacer *cpuPlacer
	if c := nilPlacer.acquire(128); c != nil {
		t.Errorf("nil placer gave %v", c)
	}
	nilPlacer.release([]int{1})
}

func TestNewCPUPlacerSeesOwnCPUs(t *testing.T) {
	p := newCPUPlacer()
	if len(p.cpus) == 0 {
		t.Fatal("no CPUs found in the affinity mask of the test process")
	}
}
