package codezip

import (
	"archive/zip"
	"bytes"
	"compress/flate"
	"context"
	"errors"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

// ent describes one zip entry for mkzip.
type ent struct {
	name string
	mode fs.FileMode // 0 means 0644 regular file; set fs.ModeDir/ModeSymlink for others
	body string      // content, or the target of a symlink
}

func mkzip(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range ents {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatalf("creating %q: %v", e.name, err)
		}
		if _, err := io.WriteString(w, e.body); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestDefaultLimits(t *testing.T) {
	l := DefaultLimits()
	if l.MaxZipBytes != 52428800 || l.MaxUnzippedBytes != 262144000 || l.MaxEntries != 20000 {
		t.Fatalf("DefaultLimits() = %+v", l)
	}
}

func TestInspectRejects(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		lim  Limits
		want string // substring of the message
	}{
		{"not a zip", []byte("hello, this is not a zip"), Limits{}, "Could not unzip uploaded file"},
		{"empty input", nil, Limits{}, "Could not unzip uploaded file"},
		{"no entries", mkzip(t), Limits{}, "non-empty zip"},
		{"only a directory", mkzip(t, ent{name: "d/", mode: fs.ModeDir | 0o755}), Limits{}, "non-empty zip"},
		{"only a symlink", mkzip(t, ent{name: "l", mode: fs.ModeSymlink | 0o777, body: "x"}), Limits{}, "non-empty zip"},
		{"dotdot", mkzip(t, ent{name: "../evil", body: "x"}), Limits{}, `"../evil"`},
		{"inner dotdot", mkzip(t, ent{name: "a/../../evil", body: "x"}), Limits{}, `"a/../../evil"`},
		{"absolute", mkzip(t, ent{name: "/etc/passwd", body: "x"}), Limits{}, `"/etc/passwd"`},
		{"backslash", mkzip(t, ent{name: `a\..\b`, body: "x"}), Limits{}, "backslash"},
		{"nul", mkzip(t, ent{name: "a\x00b", body: "x"}), Limits{}, "NUL"},
		{"drive letter", mkzip(t, ent{name: "C:/x", body: "x"}), Limits{}, "drive letter"},
		{"duplicate", mkzip(t, ent{name: "a", body: "1"}, ent{name: "a", body: "2"}), Limits{}, `"a" more than once`},
		{"duplicate after cleaning", mkzip(t, ent{name: "a/b", body: "1"}, ent{name: "a//b", body: "2"}), Limits{}, "more than once"},
		{"file and directory", mkzip(t, ent{name: "a", body: "1"}, ent{name: "a/b", body: "2"}), Limits{}, "both as a file and as a directory"},
		{"absolute symlink", mkzip(t, ent{name: "f", body: "x"}, ent{name: "l", mode: fs.ModeSymlink | 0o777, body: "/etc/passwd"}), Limits{}, "absolute target"},
		{"escaping symlink", mkzip(t, ent{name: "f", body: "x"}, ent{name: "d/l", mode: fs.ModeSymlink | 0o777, body: "../../x"}), Limits{}, "outside the package"},
		{"escaping symlink chain", mkzip(t,
			ent{name: "f", body: "x"},
			ent{name: "d/l1", mode: fs.ModeSymlink | 0o777, body: ".."},
			ent{name: "x", mode: fs.ModeSymlink | 0o777, body: "d/l1/.."}), Limits{}, "outside the package"},
		{"symlink loop", mkzip(t,
			ent{name: "f", body: "x"},
			ent{name: "a", mode: fs.ModeSymlink | 0o777, body: "b"},
			ent{name: "b", mode: fs.ModeSymlink | 0o777, body: "a"}), Limits{}, "loop"},
		{"entry below symlink", mkzip(t,
			ent{name: "d/f", body: "x"},
			ent{name: "l", mode: fs.ModeSymlink | 0o777, body: "d"},
			ent{name: "l/g", body: "y"}), Limits{}, "below the symlink"},
		{"empty symlink target", mkzip(t, ent{name: "f", body: "x"}, ent{name: "l", mode: fs.ModeSymlink | 0o777}), Limits{}, "empty target"},
		{"named pipe", mkzip(t, ent{name: "f", body: "x"}, ent{name: "p", mode: fs.ModeNamedPipe | 0o644}), Limits{}, "unsupported type"},
		{"too many entries", mkzip(t, ent{name: "a"}, ent{name: "b"}, ent{name: "c"}, ent{name: "d"}), Limits{MaxEntries: 3}, "at most 3 entries"},
		{"declared size over cap", mkzip(t, ent{name: "a", body: strings.Repeat("x", 600)}, ent{name: "b", body: strings.Repeat("y", 600)}), Limits{MaxUnzippedBytes: 1000}, "Unzipped size must be smaller than 1000 bytes"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Inspect(tc.data, tc.lim)
			if err == nil {
				t.Fatalf("Inspect succeeded with %d files, want an error", len(m.Files))
			}
			if !errors.Is(err, errdefs.ErrInvalidParameter) {
				t.Fatalf("error %v is not ErrInvalidParameter", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			// Extract must refuse the same input without leaving anything.
			parent := t.TempDir()
			dir := filepath.Join(parent, "pkg")
			if err := Extract(context.Background(), tc.data, dir, tc.lim); !errors.Is(err, errdefs.ErrInvalidParameter) {
				t.Fatalf("Extract error = %v, want ErrInvalidParameter", err)
			}
			assertEmptyDir(t, parent)
		})
	}
}

func TestInspectDefaultMessages(t *testing.T) {
	_, err := Inspect([]byte("nope"), Limits{})
	if got := errdefs.Message(err); got != "Could not unzip uploaded file. Please check your file, then try to upload again." {
		t.Fatalf("message = %q", got)
	}
}

func TestInspectZipTooLarge(t *testing.T) {
	data := mkzip(t, ent{name: "a", body: strings.Repeat("x", 1000)})
	_, err := Inspect(data, Limits{MaxZipBytes: int64(len(data) - 1)})
	if !errors.Is(err, errdefs.ErrTooLarge) {
		t.Fatalf("error = %v, want ErrTooLarge", err)
	}
	if _, err := Inspect(data, Limits{MaxZipBytes: int64(len(data))}); err != nil {
		t.Fatalf("zip exactly at the cap: %v", err)
	}
}

func TestInspectCorruptContent(t *testing.T) {
	data := mkzip(t, ent{name: "a", body: strings.Repeat("hello world ", 100)})
	// Flip a byte in the middle of the compressed data: the central
	// directory still parses, the CRC or the inflate must fail.
	bad := bytes.Clone(data)
	bad[50] ^= 0xff
	if _, err := Inspect(bad, Limits{}); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("Inspect(corrupt) error = %v, want ErrInvalidParameter", err)
	}
}

var (
	bombOnce sync.Once
	bombZip  []byte // 1 GiB of zeros, deflated, honest header
	bombRaw  []byte // the same deflate stream
	bombCRC  uint32
)

const bombSize = 1 << 30

// makeBomb deflates 1 GiB of zeros (about 1.3 MB compressed) once per run.
func makeBomb(t *testing.T) {
	t.Helper()
	bombOnce.Do(func() {
		var raw bytes.Buffer
		fw, _ := flate.NewWriter(&raw, flate.BestSpeed)
		zeros := make([]byte, 1<<20)
		crc := crc32.NewIEEE()
		for i := 0; i < bombSize/len(zeros); i++ {
			fw.Write(zeros)
			crc.Write(zeros)
		}
		fw.Close()
		bombRaw = raw.Bytes()
		bombCRC = crc.Sum32()
		bombZip = rawZip(t, "bootstrap", bombRaw, bombSize, bombCRC)
	})
}

// rawZip writes one deflated entry with whatever sizes and CRC it is told.
func rawZip(t *testing.T, name string, deflated []byte, declared uint64, crc uint32) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	h := &zip.FileHeader{
		Name: name, Method: zip.Deflate, CRC32: crc,
		CompressedSize64: uint64(len(deflated)), UncompressedSize64: declared,
	}
	h.SetMode(0o755)
	w, err := zw.CreateRaw(h)
	if err != nil {
		t.Fatal(err)
	}
	w.Write(deflated)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestZipBombRefused(t *testing.T) {
	makeBomb(t)
	if len(bombZip) > DefaultMaxZipBytes {
		t.Fatalf("bomb is %d bytes, should fit the zip cap", len(bombZip))
	}
	_, err := Inspect(bombZip, Limits{})
	if !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "Unzipped size must be smaller than 262144000 bytes") {
		t.Fatalf("Inspect(bomb) error = %v", err)
	}
	parent := t.TempDir()
	if err := Extract(context.Background(), bombZip, filepath.Join(parent, "pkg"), Limits{}); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("Extract(bomb) error = %v", err)
	}
	assertEmptyDir(t, parent)
}

func TestLyingHeaderRefused(t *testing.T) {
	makeBomb(t)
	// The header claims 100 bytes; the stream inflates to 1 GiB.
	liar := rawZip(t, "bootstrap", bombRaw, 100, bombCRC)
	if _, err := Inspect(liar, Limits{}); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("Inspect(liar) error = %v, want ErrInvalidParameter", err)
	}
	parent := t.TempDir()
	if err := Extract(context.Background(), liar, filepath.Join(parent, "pkg"), Limits{}); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Fatalf("Extract(liar) error = %v", err)
	}
	assertEmptyDir(t, parent)
}

// TestBudgetCountsActualBytes checks the decompression counter on its own,
// independent of archive/zip's check against the declared size.
func TestBudgetCountsActualBytes(t *testing.T) {
	data := mkzip(t, ent{name: "a", body: strings.Repeat("z", 5000)})
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	var sink bytes.Buffer
	b := &budget{left: 1000, max: 1000}
	err = readEntry(context.Background(), entry{zf: zr.File[0], name: "a"}, &sink, b)
	if !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "smaller than 1000") {
		t.Fatalf("readEntry over budget error = %v", err)
	}
	if sink.Len() > 1001 {
		t.Fatalf("read %d bytes past a budget of 1000", sink.Len())
	}
	b = &budget{left: 5000, max: 5000}
	sink.Reset()
	if err := readEntry(context.Background(), entry{zf: zr.File[0], name: "a"}, &sink, b); err != nil {
		t.Fatalf("readEntry exactly at budget: %v", err)
	}
}

func TestDeclaredZip64SizeOverCap(t *testing.T) {
	data := rawZip(t, "bootstrap", []byte{3, 0}, 1<<40, 0) // empty deflate stream, 1 TiB claimed
	if _, err := Inspect(data, Limits{}); !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "Unzipped size") {
		t.Fatalf("error = %v", err)
	}
}

func goodZip(t testing.TB) []byte {
	return mkzip(t,
		ent{name: "bin/", mode: fs.ModeDir | 0o755},
		ent{name: "bin/app", mode: 0o755 | fs.ModeSetuid, body: "#!/bin/sh\necho hi\n"},
		ent{name: "bootstrap", mode: fs.ModeSymlink | 0o777, body: "bin/app"},
		ent{name: "lib/data.txt", mode: 0o600, body: "data"},
		ent{name: "lib/current", mode: fs.ModeSymlink | 0o777, body: "../lib/data.txt"},
		ent{name: "empty/", mode: fs.ModeDir | 0o700},
		ent{name: "./dot/file", mode: 0o744, body: "x"},
	)
}

func TestInspectGood(t *testing.T) {
	m, err := Inspect(goodZip(t), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]File{
		"bin/app":      {Mode: 0o755, Size: 18},
		"bootstrap":    {Mode: fs.ModeSymlink | 0o777, Size: 7, Target: "bin/app"},
		"lib/data.txt": {Mode: 0o644, Size: 4},
		"lib/current":  {Mode: fs.ModeSymlink | 0o777, Size: 15, Target: "../lib/data.txt"},
		"dot/file":     {Mode: 0o755, Size: 1},
	}
	if len(m.Files) != len(want) {
		t.Fatalf("Files = %v, want %v", m.Files, want)
	}
	for p, w := range want {
		if got := m.Files[p]; got != w {
			t.Errorf("Files[%q] = %+v, want %+v", p, got, w)
		}
	}
	if m.UnzippedSize != 18+7+4+15+1 {
		t.Errorf("UnzippedSize = %d", m.UnzippedSize)
	}
	lookups := []struct {
		path         string
		exists, exec bool
	}{
		{"bootstrap", true, true},
		{"bin/app", true, true},
		{"/bin/app", true, true},
		{"lib/data.txt", true, false},
		{"lib/current", true, false},
		{"lib", false, false},
		{"missing", false, false},
		{"empty", false, false},
	}
	for _, l := range lookups {
		e, x := m.Lookup(l.path)
		if e != l.exists || x != l.exec {
			t.Errorf("Lookup(%q) = %v, %v; want %v, %v", l.path, e, x, l.exists, l.exec)
		}
	}
}

func TestExtractRoundTrip(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "cache", "abc")
	if err := Extract(context.Background(), goodZip(t), dir, Limits{}); err != nil {
		t.Fatal(err)
	}
	checkMode := func(p string, want fs.FileMode) {
		t.Helper()
		fi, err := os.Lstat(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("mode of %s = %v, want %v", p, fi.Mode(), want)
		}
	}
	checkMode(".", fs.ModeDir|0o755)
	checkMode("bin", fs.ModeDir|0o755)
	checkMode("empty", fs.ModeDir|0o755)
	checkMode("bin/app", 0o755) // setuid dropped
	checkMode("lib/data.txt", 0o644)
	checkMode("dot/file", 0o755)
	if fi, err := os.Lstat(filepath.Join(dir, "bootstrap")); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		t.Fatalf("bootstrap is not a symlink: %v %v", fi, err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "bootstrap"))
	if err != nil || string(got) != "#!/bin/sh\necho hi\n" {
		t.Fatalf("reading through bootstrap: %q %v", got, err)
	}
	got, err = os.ReadFile(filepath.Join(dir, "lib/current"))
	if err != nil || string(got) != "data" {
		t.Fatalf("reading through lib/current: %q %v", got, err)
	}
	// Nothing but dir is left in its parent (no temp dirs).
	entries, err := os.ReadDir(filepath.Join(parent, "cache"))
	if err != nil || len(entries) != 1 || entries[0].Name() != "abc" {
		t.Fatalf("cache holds %v (%v), want only abc", entries, err)
	}
}

func TestExtractExistingDirIsNoop(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pkg")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "marker"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Extract(context.Background(), goodZip(t), dir, Limits{}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bin")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Extract wrote into an existing dir: %v", err)
	}
}

func TestExtractConcurrentSameDir(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "pkg")
	data := goodZip(t)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = Extract(context.Background(), data, dir, Limits{})
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Extract %d: %v", i, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "lib/data.txt")); err != nil || string(b) != "data" {
		t.Fatalf("content after concurrent extracts: %q %v", b, err)
	}
	entries, _ := os.ReadDir(parent)
	if len(entries) != 1 {
		t.Fatalf("parent holds %d entries, want only pkg", len(entries))
	}
}

func TestExtractCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	parent := t.TempDir()
	err := Extract(ctx, goodZip(t), filepath.Join(parent, "pkg"), Limits{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error = %v, want context.Canceled", err)
	}
	assertEmptyDir(t, parent)
}

func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("%s is not empty: %v", dir, names)
	}
}

func FuzzInspect(f *testing.F) {
	f.Add(goodZip(f))
	f.Add(mkzip(f, ent{name: "bootstrap", mode: 0o755, body: "x"}))
	f.Add(mkzip(f, ent{name: "a/b/c", body: "x"}, ent{name: "a/l", mode: fs.ModeSymlink | 0o777, body: "b/c"}))
	f.Add(mkzip(f, ent{name: "../x", body: "x"}))
	f.Add([]byte("PK\x03\x04"))
	lim := Limits{MaxZipBytes: 1 << 20, MaxUnzippedBytes: 1 << 20, MaxEntries: 64}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := Inspect(data, lim)
		if err != nil {
			if !errors.Is(err, errdefs.ErrInvalidParameter) && !errors.Is(err, errdefs.ErrTooLarge) {
				t.Fatalf("error of unexpected kind: %v", err)
			}
			return
		}
		if m.UnzippedSize > lim.MaxUnzippedBytes || len(m.Files) == 0 {
			t.Fatalf("manifest over limits: %d bytes, %d files", m.UnzippedSize, len(m.Files))
		}
		for p, f := range m.Files {
			if !filepath.IsLocal(p) || strings.Contains(p, `\`) {
				t.Fatalf("manifest path %q is not local", p)
			}
			if f.Mode&fs.ModeSymlink == 0 && f.Mode != 0o755 && f.Mode != 0o644 {
				t.Fatalf("mode of %q = %v", p, f.Mode)
			}
		}
		dir := filepath.Join(t.TempDir(), "pkg")
		if err := Extract(context.Background(), data, dir, lim); err != nil {
			t.Fatalf("Inspect accepted what Extract refused: %v", err)
		}
		for p, f := range m.Files {
			fi, err := os.Lstat(filepath.Join(dir, filepath.FromSlash(p)))
			if err != nil {
				t.Fatalf("extracted tree lacks %q: %v", p, err)
			}
			if f.Mode&fs.ModeSymlink == 0 && (fi.Size() != f.Size || fi.Mode() != f.Mode) {
				t.Fatalf("%q: size %d mode %v, manifest %d %v", p, fi.Size(), fi.Mode(), f.Size, f.Mode)
			}
		}
	})
}
