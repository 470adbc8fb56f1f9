package guest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

// tarEntry is one member of a test layer.
type tarEntry struct {
	name, body, link string
	typ              byte
	mode             int64
}

func makeTar(t *testing.T, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, ModTime: time.Unix(1700000000, 0)}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if h.Typeflag == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte(e.body))
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func gz(b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

// The two layers every image test imports: the second deletes a file of
// the first, hides a directory's old content and adds to it.
func testLayers(t *testing.T, escape string) [][]byte {
	l1 := makeTar(t, []tarEntry{
		{name: "etc/", typ: tar.TypeDir},
		{name: "etc/old.conf", body: "old"},
		{name: "etc/keep.conf", body: "keep"},
		{name: "usr/bin/", typ: tar.TypeDir},
		{name: "usr/bin/python3.11", body: "#!/bin/false\n", mode: 0o755},
		{name: "usr/sbin/", typ: tar.TypeDir},
		{name: "sbin", typ: tar.TypeSymlink, link: "/usr/sbin"},
		{name: "opt/x/", typ: tar.TypeDir},
		{name: "opt/x/gone", body: "lower"},
		{name: "evil", typ: tar.TypeSymlink, link: escape},
	})
	l2 := makeTar(t, []tarEntry{
		{name: "etc/.wh.old.conf"},
		{name: "opt/x/", typ: tar.TypeDir},
		{name: "opt/x/.wh..wh..opq"},
		{name: "opt/x/new", body: "upper"},
		{name: "usr/bin/python3", typ: tar.TypeLink, link: "usr/bin/python3.11"},
		// Through an absolute symlink pointing at a host directory: must
		// land inside the tree.
		{name: "evil/planted", body: "inside"},
	})
	return [][]byte{l1, l2}
}

func checkImportedTree(t *testing.T, tree, escape string) {
	t.Helper()
	read := func(rel string) string {
		b, err := os.ReadFile(filepath.Join(tree, rel))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	if _, err := os.Lstat(filepath.Join(tree, "etc/old.conf")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("whiteout ignored: etc/old.conf still there (%v)", err)
	}
	if got := read("etc/keep.conf"); got != "keep" {
		t.Errorf("etc/keep.conf = %q", got)
	}
	if _, err := os.Lstat(filepath.Join(tree, "opt/x/gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("opaque whiteout ignored: opt/x/gone still there (%v)", err)
	}
	if got := read("opt/x/new"); got != "upper" {
		t.Errorf("opt/x/new = %q, want the upper layer's file", got)
	}
	a, err1 := os.Stat(filepath.Join(tree, "usr/bin/python3"))
	b, err2 := os.Stat(filepath.Join(tree, "usr/bin/python3.11"))
	if err1 != nil || err2 != nil || !os.SameFile(a, b) {
		t.Errorf("hard link python3 -> python3.11 not made: %v %v", err1, err2)
	}
	if _, err := os.Stat(filepath.Join(escape, "planted")); err == nil {
		t.Fatalf("a layer wrote through an absolute symlink onto the host: %s/planted", escape)
	}
	if got := read(filepath.Join(strings.TrimPrefix(escape, "/"), "planted")); got != "inside" {
		t.Errorf("the file written through the symlink should be inside the tree at %s/planted: %q", escape, got)
	}
	// prepareTree ran: mount points and the sandbox user.
	if got := read("etc/passwd"); !strings.Contains(got, "sbx_user1051:x:993:") {
		t.Errorf("imported /etc/passwd has no sandbox user: %q", got)
	}
	for _, d := range mountPoints {
		if _, err := os.Stat(filepath.Join(tree, d)); err != nil {
			t.Errorf("mount point /%s missing: %v", d, err)
		}
	}
}

func TestImportDockerSave(t *testing.T) {
	escape := t.TempDir() // a host directory an absolute symlink names
	layers := testLayers(t, escape)
	manifest, _ := json.Marshal([]map[string]any{{"Config": "cfg.json", "Layers": []string{"l1/layer.tar", "l2/layer.tar"}}})
	archive := makeTar(t, []tarEntry{
		{name: "manifest.json", body: string(manifest)},
		{name: "cfg.json", body: "{}"},
		{name: "l1/", typ: tar.TypeDir},
		{name: "l1/layer.tar", body: string(layers[0])},
		{name: "l2/", typ: tar.TypeDir},
		{name: "l2/layer.tar", body: string(gz(layers[1]))}, // mixed compression
	})
	src := filepath.Join(t.TempDir(), "image.tar")
	os.WriteFile(src, archive, 0o644)
	cache := t.TempDir()
	tree, err := ImportRoot(context.Background(), cache, "python3.11", src)
	if err != nil {
		t.Fatal(err)
	}
	checkImportedTree(t, tree, escape)
	if cur, ok := CurrentRoot(cache, "python3.11"); !ok || cur != tree {
		t.Errorf("CurrentRoot = %s, %v; want the import %s", cur, ok, tree)
	}
	// Cached by digest: importing again returns the same tree.
	if again, err := ImportRoot(context.Background(), cache, "python3.11", src); err != nil || again != tree {
		t.Errorf("second import = %s, %v; want %s", again, err, tree)
	}
	if left, _ := filepath.Glob(filepath.Join(cache, ".image-*")); len(left) != 0 {
		t.Errorf("unpacked image left behind: %v", left)
	}
}

func TestImportOCILayout(t *testing.T) {
	escape := t.TempDir()
	layers := testLayers(t, escape)
	blob := func(b []byte) (string, string) {
		s := sha256.Sum256(b)
		h := hex.EncodeToString(s[:])
		return "sha256:" + h, "blobs/sha256/" + h
	}
	var entries []tarEntry
	add := func(b []byte) string {
		d, p := blob(b)
		entries = append(entries, tarEntry{name: p, body: string(b)})
		return d
	}
	l1 := add(gz(layers[0]))
	l2 := add(gz(layers[1]))
	cfg := add([]byte("{}"))
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": map[string]any{"digest": cfg},
		"layers": []map[string]any{{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1}, {"digest": l2}},
	})
	md := add(manifest)
	arm, _ := json.Marshal(map[string]any{"layers": []map[string]any{}})
	armd := add(arm)
	index, _ := json.Marshal(map[string]any{"schemaVersion": 2, "manifests": []map[string]any{
		{"digest": armd, "platform": map[string]string{"os": "linux", "architecture": "arm64"}},
		{"digest": md, "platform": map[string]string{"os": "linux", "architecture": "amd64"}},
	}})
	entries = append(entries, tarEntry{name: "oci-layout", body: `{"imageLayoutVersion":"1.0.0"}`}, tarEntry{name: "index.json", body: string(index)})

	// As an archive...
	src := filepath.Join(t.TempDir(), "oci.tar")
	os.WriteFile(src, makeTar(t, entries), 0o644)
	tree, err := ImportRoot(context.Background(), t.TempDir(), "nodejs22.x", src)
	if err != nil {
		t.Fatal(err)
	}
	checkImportedTree(t, tree, escape)

	// ...and as a directory.
	dir := t.TempDir()
	for _, e := range entries {
		os.MkdirAll(filepath.Join(dir, filepath.Dir(e.name)), 0o755)
		os.WriteFile(filepath.Join(dir, e.name), []byte(e.body), 0o644)
	}
	tree, err = ImportRoot(context.Background(), t.TempDir(), "nodejs22.x", dir)
	if err != nil {
		t.Fatal(err)
	}
	checkImportedTree(t, tree, escape)
}

func TestImportRejects(t *testing.T) {
	cache := t.TempDir()
	if _, err := ImportRoot(context.Background(), cache, "../x", t.TempDir()); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("bad runtime id: %v", err)
	}
	if _, err := ImportRoot(context.Background(), cache, "python3.11", "/nonexistent"); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("missing source: %v", err)
	}
	zstd := filepath.Join(t.TempDir(), "layer.tar.zst")
	os.WriteFile(zstd, []byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0}, 0o644)
	if _, err := ImportRoot(context.Background(), cache, "python3.11", zstd); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("zstd layer: %v, want ErrInvalidParameter", err)
	}
	if _, ok := CurrentRoot(cache, "python3.11"); ok {
		t.Error("a failed import became the current root")
	}
}

// TestImportDirAndRootImage imports a plain directory tree, then builds a
// root image from it: the agent lands at /sbin/init through the tree's
// absolute /sbin symlink, inside the image.
func TestImportDirAndRootImage(t *testing.T) {
	requireTools(t)
	if os.Geteuid() != 0 {
		t.Skip("cp -a of a root tree needs root to keep owners")
	}
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "usr/bin"), 0o755)
	os.MkdirAll(filepath.Join(src, "usr/sbin"), 0o755)
	os.WriteFile(filepath.Join(src, "usr/bin/python3.11"), []byte("#!/bin/false\n"), 0o755)
	os.Symlink("/usr/sbin", filepath.Join(src, "sbin"))
	os.MkdirAll(filepath.Join(src, "etc"), 0o755)
	os.WriteFile(filepath.Join(src, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/bash\n"), 0o644)

	cache := t.TempDir()
	tree, err := ImportRoot(context.Background(), cache, "python3.11", src)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(tree, "etc/passwd")); !strings.HasPrefix(string(b), "root:x:0:0:root:/root:/bin/bash\n") ||
		!strings.Contains(string(b), "sbx_user1051") {
		t.Errorf("imported passwd = %q, want the image's root line plus the sandbox user", b)
	}
	rt := &runtimes.Runtime{ID: "python3.11", Family: runtimes.FamilyPython, Interpreter: "/usr/bin/python3.11",
		Bootstrap: []string{"/usr/bin/python3.11", "/var/runtime/python/bootstrap.py"}}
	img, err := RootImage(context.Background(), cache, rt, buildStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	if e, ok := imageStat(t, img, "/usr/sbin", "init"); !ok || e.mode != "100755" {
		t.Errorf("/usr/sbin/init in the image = %+v, %v; want the agent", e, ok)
	}
	if l := debugfs(t, img, "stat /sbin"); !strings.Contains(l, "/usr/sbin") {
		t.Errorf("/sbin is no longer the image's symlink:\n%s", l)
	}
	// The runtime DB's interpreter must exist in the root.
	rt2 := *rt
	rt2.Interpreter = "/usr/local/bin/python3.11"
	rt2.Bootstrap = []string{"/usr/local/bin/python3.11"}
	if _, err := RootImage(context.Background(), cache, &rt2, buildStatic(t)); !errors.Is(err, errdefs.ErrInvalidParameter) ||
		!strings.Contains(fmtErr(err), "/usr/local/bin/python3.11") {
		t.Errorf("root without the interpreter: %v, want ErrInvalidParameter naming it", err)
	}
}

func fmtErr(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
