package fsblob_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/invokex/invokex/internal/controlplane/blob"
	"github.com/invokex/invokex/internal/controlplane/blob/blobtest"
	"github.com/invokex/invokex/internal/controlplane/blob/fsblob"
)

func newStore(t *testing.T, dir string) *fsblob.Store {
	t.Helper()
	s, err := fsblob.New(dir)
	if err != nil {
		t.Fatalf("New(%s): %v", dir, err)
	}
	return s
}

func TestConformance(t *testing.T) {
	blobtest.Run(t, func(t *testing.T) blob.Store {
		dir := t.TempDir()
		// Every test must leave no temporary file behind, whatever it did.
		t.Cleanup(func() { assertNoTemps(t, dir) })
		return newStore(t, dir)
	})
}

// files returns the regular files under dir, relative to it.
func files(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func assertNoTemps(t *testing.T, dir string) {
	t.Helper()
	for _, f := range files(t, dir) {
		if !strings.HasPrefix(f, "sha256"+string(filepath.Separator)) {
			t.Errorf("left behind %s", f)
		}
	}
}

func TestLayoutIsShardedHex(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	content := []byte("layout")
	if _, _, err := s.Put(t.Context(), bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(content)
	name := hex.EncodeToString(sum[:])
	want := filepath.Join("sha256", name[:2], name)
	got := files(t, dir)
	if len(got) != 1 || got[0] != want {
		t.Fatalf("files %v, want [%s]", got, want)
	}
	st, err := os.Stat(filepath.Join(dir, want))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o644 {
		t.Fatalf("blob mode %v, want 0644", st.Mode().Perm())
	}
}

func TestFailedPutsLeaveNoTemps(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	readErr := errors.New("boom")
	if _, _, err := s.Put(t.Context(), io.MultiReader(strings.NewReader("partial"), iotest.ErrReader(readErr))); !errors.Is(err, readErr) {
		t.Fatalf("Put: %v, want %v", err, readErr)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, _, err := s.Put(ctx, strings.NewReader("x")); !errors.Is(err, context.Canceled) {
		t.Fatalf("Put: %v, want context.Canceled", err)
	}
	if got := files(t, dir); len(got) != 0 {
		t.Fatalf("files after failed Puts: %v", got)
	}
}

func TestNewRemovesStaleTemps(t *testing.T) {
	dir := t.TempDir()
	s := newStore(t, dir)
	d, _, err := s.Put(t.Context(), strings.NewReader("survivor"))
	if err != nil {
		t.Fatal(err)
	}
	// What a crash in the middle of Puts leaves behind.
	for _, name := range []string{"put-123", "put-456"} {
		if err := os.WriteFile(filepath.Join(dir, "tmp", name), []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s = newStore(t, dir)
	assertNoTemps(t, dir)
	rc, err := s.Open(t.Context(), d)
	if err != nil {
		t.Fatalf("blob lost on reopen: %v", err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if string(got) != "survivor" {
		t.Fatalf("blob content %q after reopen", got)
	}
}

// TestOpenReaderSurvivesDelete: a harness streaming code out of the store
// keeps a consistent copy even if the blob is deleted meanwhile.
func TestOpenReaderSurvivesDelete(t *testing.T) {
	s := newStore(t, t.TempDir())
	content := bytes.Repeat([]byte("code"), 1<<16)
	d, _, err := s.Put(t.Context(), bytes.NewReader(content))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := s.Open(t.Context(), d)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if err := s.Delete(t.Context(), d); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("read after Delete: %d bytes, %v", len(got), err)
	}
}

func TestNewRejectsEmptyDir(t *testing.T) {
	if _, err := fsblob.New(""); err == nil {
		t.Fatal("New(\"\") succeeded")
	}
}
