package guest

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestCopySparse: data extents are copied to the same offsets, holes
// stay holes, and a cancelled copy leaves no file.
func TestCopySparse(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	const size = 64 << 20
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.WriteAt([]byte("head"), 0)
	f.WriteAt(bytes.Repeat([]byte("x"), 8192), 20<<20)
	f.WriteAt([]byte("tail"), size-4)
	f.Close()

	dst := filepath.Join(dir, "dst")
	if err := CopySparse(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(a, b) {
		t.Fatalf("copy differs from the source (%v)", err)
	}
	fi, _ := os.Stat(dst)
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used > 4<<20 {
		t.Errorf("copy of a mostly empty %d byte file uses %d bytes: holes were filled", size, used)
	}
	if err := CopySparse(context.Background(), src, dst); !errors.Is(err, os.ErrExist) {
		t.Errorf("copy onto an existing file: %v, want ErrExist", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	gone := filepath.Join(dir, "cancelled")
	if err := CopySparse(ctx, src, gone); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled copy: %v", err)
	}
	if _, err := os.Stat(gone); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a cancelled copy left its file: %v", err)
	}
}
