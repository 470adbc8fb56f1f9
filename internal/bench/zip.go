package bench

import (
	"archive/zip"
	"bytes"
	"fmt"
	"io"
	"os"
)

// zipper makes deployment packages of the echo function, each with its own
// "version" file: distinct packages (so no deployment reuses another's
// cached code) around the same binary. The binary is compressed once and
// copied raw into every package.
type zipper struct {
	hdr zip.FileHeader
	raw []byte
}

func newZipper(bootstrap string) (*zipper, error) {
	bin, err := os.ReadFile(bootstrap)
	if err != nil {
		return nil, fmt.Errorf("reading function: %w", err)
	}
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	h := &zip.FileHeader{Name: "bootstrap", Method: zip.Deflate}
	h.SetMode(0o755)
	f, err := w.CreateHeader(h)
	if err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	if _, err := f.Write(bin); err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	zr, err := zip.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil {
		return nil, fmt.Errorf("reading back the function's zip: %w", err)
	}
	rc, err := zr.File[0].OpenRaw()
	if err != nil {
		return nil, fmt.Errorf("reading back the function's zip: %w", err)
	}
	raw, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("reading back the function's zip: %w", err)
	}
	return &zipper{hdr: zr.File[0].FileHeader, raw: raw}, nil
}

// zip returns a package with the function and a version file.
func (z *zipper) zip(version string) ([]byte, error) {
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	h := z.hdr
	f, err := w.CreateRaw(&h)
	if err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	if _, err := f.Write(z.raw); err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	vh := &zip.FileHeader{Name: "version", Method: zip.Store}
	vh.SetMode(0o644)
	vf, err := w.CreateHeader(vh)
	if err != nil {
		return nil, fmt.Errorf("zipping version: %w", err)
	}
	if _, err := io.WriteString(vf, version+"\n"); err != nil {
		return nil, fmt.Errorf("zipping version: %w", err)
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("zipping function: %w", err)
	}
	return buf.Bytes(), nil
}

// zipFiles zips files (name → content, mode 0644), for functions the
// benchmark writes itself (the python echo).
func zipFiles(files map[string]string) ([]byte, error) {
	var buf bytes.Buffer
	w := zip.NewWriter(&buf)
	for name, content := range files {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		h.SetMode(0o644)
		f, err := w.CreateHeader(h)
		if err != nil {
			return nil, fmt.Errorf("zipping %s: %w", name, err)
		}
		if _, err := io.WriteString(f, content); err != nil {
			return nil, fmt.Errorf("zipping %s: %w", name, err)
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("zipping: %w", err)
	}
	return buf.Bytes(), nil
}
