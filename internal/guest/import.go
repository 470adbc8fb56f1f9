package guest

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"github.com/invokex/invokex/internal/errdefs"
)

// importVersion changes when ImportRoot's steps change.
const importVersion = "import-1"

var runtimeIDPattern = regexp.MustCompile(`^[a-z][a-z0-9.\-]{0,39}$`)

// ImportRoot imports a runtime's root file system and makes it the tree
// RootImage uses for runtimeID (replacing a built or earlier import). It
// returns the tree's directory. source is one of:
//
//   - a directory holding a root file system (copied with cp -a);
//   - an OCI image layout, as a directory or a tar archive (oci-layout,
//     index.json, blobs/); for a multi-platform index linux/amd64 is used;
//   - a docker-save archive (manifest.json and its layers);
//   - any other tar archive, taken as one root file system layer.
//
// Layers may be plain or gzip tar; whiteouts are applied. The result is
// cached by the source's digest. Symlinks in the image never lead outside
// the tree while importing. Ownership is kept when running as root.
//
// Errors: ErrInvalidParameter for a bad runtime ID or an unreadable or
// unsupported source (zstd layers, an index without linux/amd64).
func ImportRoot(ctx context.Context, cacheDir, runtimeID, source string) (string, error) {
	if !runtimeIDPattern.MatchString(runtimeID) {
		return "", fmt.Errorf("importing a root: bad runtime id %q: %w", runtimeID, errdefs.ErrInvalidParameter)
	}
	fi, err := os.Stat(source)
	if err != nil {
		return "", fmt.Errorf("importing a root from %s: %w: %w", source, err, errdefs.ErrInvalidParameter)
	}
	var sum string
	if fi.IsDir() {
		sum, err = treeDigest(source)
	} else {
		sum, err = fileSHA256(source)
	}
	if err != nil {
		return "", fmt.Errorf("hashing %s: %w", source, err)
	}
	dir := filepath.Join(cacheDir, "roots", runtimeID)
	tree := filepath.Join(dir, "import-"+digest([]byte(importVersion), []byte(sum))[:16])
	if treeDirExists(tree) {
		return tree, setCurrentRoot(cacheDir, runtimeID, tree)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	unlock, err := lock(ctx, cacheDir, "root-"+runtimeID)
	if err != nil {
		return "", err
	}
	defer unlock()
	if treeDirExists(tree) {
		return tree, setCurrentRoot(cacheDir, runtimeID, tree)
	}
	stage, err := os.MkdirTemp(dir, ".stage-")
	if err != nil {
		return "", err
	}
	defer removeStage(stage)
	if err := os.Chmod(stage, 0o755); err != nil {
		return "", err
	}
	if err := populate(ctx, cacheDir, source, fi.IsDir(), stage); err != nil {
		return "", fmt.Errorf("importing a root from %s: %w", source, err)
	}
	r, err := openTree(stage)
	if err != nil {
		return "", err
	}
	err = prepareTree(r)
	r.Close()
	if err != nil {
		return "", fmt.Errorf("preparing the imported root: %w", err)
	}
	if err := os.Rename(stage, tree); err != nil {
		return "", fmt.Errorf("installing the imported root: %w", err)
	}
	return tree, setCurrentRoot(cacheDir, runtimeID, tree)
}

// populate fills stage from source.
func populate(ctx context.Context, cacheDir, source string, isDir bool, stage string) error {
	if isDir {
		if exists(filepath.Join(source, "oci-layout")) || exists(filepath.Join(source, "manifest.json")) {
			return applyImage(ctx, os.DirFS(source), stage)
		}
		return run(ctx, nil, "", nil, "cp", "-a", "--", source+"/.", stage)
	}
	kind, err := archiveKind(source)
	if err != nil {
		return err
	}
	if kind == "rootfs" {
		return applyLayerFile(ctx, stage, source)
	}
	// An image archive: unpack its blobs (plain files) and read them from
	// there; tar gives no random access to its members.
	blobs, err := os.MkdirTemp(cacheDir, ".image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(blobs)
	if err := unpackPlain(ctx, source, blobs); err != nil {
		return err
	}
	return applyImage(ctx, os.DirFS(blobs), stage)
}

// archiveKind tells an image archive ("image": docker save or OCI layout)
// from a root file system tarball ("rootfs") by its top-level members.
func archiveKind(file string) (string, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", err
	}
	defer f.Close()
	rd, closeZ, err := decompress(f)
	if err != nil {
		return "", err
	}
	defer closeZ()
	tr := tar.NewReader(rd)
	for i := 0; i < 100000; i++ {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("reading %s as tar: %w: %w", file, err, errdefs.ErrInvalidParameter)
		}
		switch clean(h.Name) {
		case "oci-layout", "manifest.json":
			return "image", nil
		}
	}
	return "rootfs", nil
}

// unpackPlain extracts only directories and regular files of an image
// archive into dir (names cleaned, so nothing lands outside it).
func unpackPlain(ctx context.Context, file, dir string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading %s: %w", file, err)
		}
		rel := clean(h.Name)
		if rel == "" {
			continue
		}
		dst := filepath.Join(dir, filepath.FromSlash(rel))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case tar.TypeReg, tar.TypeRegA:
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		}
	}
}

// applyLayerFile applies one layer file to the tree at stage.
func applyLayerFile(ctx context.Context, stage, file string) error {
	r, err := openTree(stage)
	if err != nil {
		return err
	}
	defer r.Close()
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	return applyLayer(ctx, r, f)
}

// applyImage applies the layers of the image in fsys (docker save or OCI
// layout), lowest first.
func applyImage(ctx context.Context, fsys fs.FS, stage string) error {
	layers, err := imageLayers(fsys)
	if err != nil {
		return err
	}
	r, err := openTree(stage)
	if err != nil {
		return err
	}
	defer r.Close()
	for _, l := range layers {
		f, err := fsys.Open(l)
		if err != nil {
			return fmt.Errorf("opening layer %s: %w", l, err)
		}
		err = applyLayer(ctx, r, f)
		f.Close()
		if err != nil {
			return fmt.Errorf("applying layer %s: %w", l, err)
		}
	}
	return nil
}

// imageLayers lists the layer files of an image, lowest first.
func imageLayers(fsys fs.FS) ([]string, error) {
	if b, err := fs.ReadFile(fsys, "manifest.json"); err == nil {
		var m []struct{ Layers []string }
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, fmt.Errorf("decoding manifest.json: %w: %w", err, errdefs.ErrInvalidParameter)
		}
		if len(m) == 0 {
			return nil, fmt.Errorf("manifest.json lists no image: %w", errdefs.ErrInvalidParameter)
		}
		out := make([]string, 0, len(m[0].Layers))
		for _, l := range m[0].Layers {
			out = append(out, clean(l))
		}
		return out, nil
	}
	b, err := fs.ReadFile(fsys, "index.json")
	if err != nil {
		return nil, fmt.Errorf("neither manifest.json nor index.json: %w", errdefs.ErrInvalidParameter)
	}
	return ociLayers(fsys, b, 0)
}

// descriptor is an OCI content descriptor.
type descriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Platform  *struct {
		OS           string `json:"os"`
		Architecture string `json:"architecture"`
	} `json:"platform,omitempty"`
}

// ociLayers resolves an index (or manifest) document to layer blob paths.
func ociLayers(fsys fs.FS, doc []byte, depth int) ([]string, error) {
	if depth > 4 {
		return nil, fmt.Errorf("OCI indexes nested too deep: %w", errdefs.ErrInvalidParameter)
	}
	var d struct {
		MediaType string       `json:"mediaType"`
		Manifests []descriptor `json:"manifests"`
		Layers    []descriptor `json:"layers"`
	}
	if err := json.Unmarshal(doc, &d); err != nil {
		return nil, fmt.Errorf("decoding OCI document: %w: %w", err, errdefs.ErrInvalidParameter)
	}
	if d.Manifests == nil {
		out := make([]string, 0, len(d.Layers))
		for _, l := range d.Layers {
			p, err := blobPath(l.Digest)
			if err != nil {
				return nil, err
			}
			out = append(out, p)
		}
		return out, nil
	}
	var pick *descriptor
	for i := range d.Manifests {
		m := &d.Manifests[i]
		if m.Platform == nil || (m.Platform.OS == "linux" && m.Platform.Architecture == "amd64") {
			pick = m
			break
		}
	}
	if pick == nil {
		return nil, fmt.Errorf("the image index has no linux/amd64 image: %w", errdefs.ErrInvalidParameter)
	}
	p, err := blobPath(pick.Digest)
	if err != nil {
		return nil, err
	}
	b, err := fs.ReadFile(fsys, p)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", p, err)
	}
	return ociLayers(fsys, b, depth+1)
}

var digestPattern = regexp.MustCompile(`^[a-z0-9]+:[a-f0-9]{32,128}$`)

func blobPath(d string) (string, error) {
	if !digestPattern.MatchString(d) {
		return "", fmt.Errorf("bad digest %q: %w", d, errdefs.ErrInvalidParameter)
	}
	alg, hexv, _ := strings.Cut(d, ":")
	return path.Join("blobs", alg, hexv), nil
}

// treeDigest hashes a directory tree's names, types, modes, owners, sizes,
// mtimes and link targets: a changed tree gets a new digest without reading
// every byte.
func treeDigest(dir string) (string, error) {
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(h, "%q %v %d %d\n", rel, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if st, ok := statOwner(fi); ok {
			fmt.Fprintf(h, "%d:%d\n", st[0], st[1])
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			l, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "-> %q\n", l)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// statOwner returns a file's uid and gid.
func statOwner(fi fs.FileInfo) ([2]uint32, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return [2]uint32{}, false
	}
	return [2]uint32{st.Uid, st.Gid}, true
}
