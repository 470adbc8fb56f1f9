package vmm

import (
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/invokex/invokex/internal/harness/driver"
)

// CodeKey names spec's code image in package guest's cache: the
// deployment package's digest with the runtime directory it is paired
// with. A spec without a digest (tests, tools) gets a digest of the
// directory tree, so a cached image is never the wrong code. Every VM
// driver uses this one key, so they share the cached images: changing
// what it hashes orphans every image in every cache.
func CodeKey(spec driver.Spec) (string, error) {
	h := sha256.New()
	if spec.CodeSha256 != "" {
		fmt.Fprintf(h, "sha256:%s\n", spec.CodeSha256)
	} else if err := hashTree(h, spec.CodeDir); err != nil {
		return "", fmt.Errorf("hashing code directory: %w", err)
	}
	fmt.Fprintf(h, "runtime:")
	if spec.RuntimeDir != "" {
		if err := hashTree(h, spec.RuntimeDir); err != nil {
			return "", fmt.Errorf("hashing runtime directory: %w", err)
		}
	}
	return base64.RawURLEncoding.EncodeToString(h.Sum(nil)), nil
}

// hashTree writes every entry of the tree at dir (path, mode, link target
// or content) to w.
func hashTree(w io.Writer, dir string) error {
	return filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fi, err := e.Info()
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%q %o\n", rel, fi.Mode())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "-> %q\n", t)
		case fi.Mode().IsRegular():
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "%d\n", fi.Size())
			_, err = io.Copy(w, f)
			f.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
}
