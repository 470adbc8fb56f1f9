package agent

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

func TestImageRanges(t *testing.T) {
	maps := []byte(`00400000-00700000 r-xp 00000000 fd:01 1234                               /bin/agent
00700000-00a00000 r--p 00300000 fd:01 1234                               /bin/agent
00a00000-00a40000 rw-p 00600000 fd:01 1234                               /bin/agent
00b00000-00b10000 r--p 00000000 fd:01 999                                /other
00c00000-00c10000 r--p 00000000 fd:02 1234                               /same-inode-other-device
00d00000-00d10000 r--s 00000000 fd:01 1234                               /bin/agent
c000000000-c000400000 rw-p 00000000 00:00 0
`)
	got := imageRanges(maps, 1234, 0xfd, 1)
	want := [][2]uintptr{{0x400000, 0x700000}, {0x700000, 0xa00000}}
	if len(got) != len(want) {
		t.Fatalf("imageRanges = %x, want %x", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("imageRanges = %x, want %x", got, want)
		}
	}
}

// TestTrimImage trims this test binary's own image and checks that it
// still runs (the pages come back on access) and that its text is no
// longer all resident.
func TestTrimImage(t *testing.T) {
	rss := func() int64 {
		b, err := os.ReadFile("/proc/self/status")
		if err != nil {
			t.Fatal(err)
		}
		return statusField(b, "RssFile")
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/exe", &st); err != nil {
		t.Fatal(err)
	}
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	if len(imageRanges(maps, st.Ino, unix.Major(st.Dev), unix.Minor(st.Dev))) == 0 {
		t.Fatal("found no read-only mapping of the test binary")
	}
	before := rss()
	trimImage()
	after := rss()
	if after >= before {
		t.Errorf("RssFile %d KiB before trimming, %d after: nothing dropped", before, after)
	}
	// Code and data of the binary still work after the trim.
	if got := statusField([]byte("VmHWM:\t  42 kB\n"), "VmHWM"); got != 42 {
		t.Errorf("statusField after trim = %d", got)
	}
}

func TestDropCaches(t *testing.T) {
	knob := filepath.Join(t.TempDir(), "drop_caches")
	if err := os.WriteFile(knob, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	old := dropCachesPath
	dropCachesPath = knob
	t.Cleanup(func() { dropCachesPath = old })
	dropCaches()
	if b, err := os.ReadFile(knob); err != nil || string(b) != "3\n" {
		t.Fatalf("drop_caches got %q (%v), want \"3\\n\"", b, err)
	}
}
