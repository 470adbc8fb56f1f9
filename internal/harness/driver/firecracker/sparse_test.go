package firecracker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestMoveFile: a rename on one file system, a copy and removal across
// file systems (/dev/shm is another one than the temporary directory on
// most hosts; where it is not, the rename path runs again).
func TestMoveFile(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "a")
	os.WriteFile(src, []byte("state"), 0o600)
	dst := filepath.Join(dir, "b")
	if err := moveFile(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	other, err := os.MkdirTemp("/dev/shm", "fc-test-")
	if err != nil {
		t.Skipf("skipping the copy case: %v", err)
	}
	defer os.RemoveAll(other)
	far := filepath.Join(other, "c")
	if err := moveFile(context.Background(), dst, far); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(far); err != nil || string(b) != "state" {
		t.Errorf("moved file holds %q, %v", b, err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the source is still there: %v", err)
	}
}
