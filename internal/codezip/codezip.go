// Package codezip validates and unpacks deployment packages (zip files)
// safely: no path may leave the tree, and entry count and unzipped size are
// capped so a zip bomb is refused before it is written.
//
// Sizes declared in a zip's headers are checked first, but they are not
// trusted: every byte decompressed is counted against the same budget (and
// archive/zip refuses an entry that yields more than its header declared),
// so a package that lies about its sizes is stopped at the cap.
package codezip

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path"
	"sort"
	"strings"

	"github.com/invokex/invokex/internal/errdefs"
)

// Limits caps what a package may contain. A zero field means "use the
// default" (DefaultLimits), so a zero Limits is Lambda's limits.
type Limits struct {
	MaxZipBytes      int64 // size of the zip itself
	MaxUnzippedBytes int64 // sum of uncompressed sizes
	MaxEntries       int
}

// File is one regular file or symlink in a package. Mode is normalised:
// 0755 or 0644 for regular files (never setuid, setgid or sticky) and
// fs.ModeSymlink|0777 for symlinks.
type File struct {
	Mode fs.FileMode
	Size int64
	// Target is a symlink's target as stored in the package ("" for a
	// regular file). It never leaves the package's tree.
	Target string
}

// Manifest lists a validated package's entries by slash-separated path.
type Manifest struct {
	Files        map[string]File
	UnzippedSize int64
}

// Lambda's limits for a package uploaded directly (ZipFile in the request).
const (
	DefaultMaxZipBytes      = 50 << 20  // 52428800
	DefaultMaxUnzippedBytes = 250 << 20 // 262144000
	// DefaultMaxEntries is InvokeX's own cap: Lambda has none, but every
	// entry costs an inode and a syscall on each host that extracts it.
	DefaultMaxEntries = 20000
)

// maxSymlinkTarget bounds how much of a symlink entry is read as its target.
const maxSymlinkTarget = 4096

// maxSymlinkHops bounds symlink chains, as the kernel's ELOOP does.
const maxSymlinkHops = 40

// DefaultLimits returns Lambda's limits (50 MB zip, 250 MB unzipped).
func DefaultLimits() Limits {
	return Limits{
		MaxZipBytes:      DefaultMaxZipBytes,
		MaxUnzippedBytes: DefaultMaxUnzippedBytes,
		MaxEntries:       DefaultMaxEntries,
	}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxZipBytes <= 0 {
		l.MaxZipBytes = d.MaxZipBytes
	}
	if l.MaxUnzippedBytes <= 0 {
		l.MaxUnzippedBytes = d.MaxUnzippedBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = d.MaxEntries
	}
	return l
}

// Lookup reports whether path (slash-separated, relative to the package
// root) names a regular file in the package, following symlinks inside the
// package, and whether that file is executable. It has the shape that
// runtimes.CheckCode expects.
func (m *Manifest) Lookup(p string) (exists, executable bool) {
	if m == nil {
		return false, false
	}
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	for hops := 0; hops <= maxSymlinkHops; hops++ {
		f, ok := m.Files[p]
		if !ok {
			return false, false
		}
		if f.Mode&fs.ModeSymlink == 0 {
			return true, f.Mode&0o111 != 0
		}
		next, err := resolveLink(m.Files, p, f.Target)
		if err != nil {
			return false, false
		}
		p = next
	}
	return false, false
}

// Inspect validates data as a deployment package without writing anything.
// It decompresses every entry (so CRCs are checked) within the unzipped
// budget. Errors: ErrTooLarge when the zip itself is over MaxZipBytes,
// ErrInvalidParameter (with a message naming the problem) for anything else.
func Inspect(data []byte, lim Limits) (*Manifest, error) {
	lim = lim.withDefaults()
	pkg, err := scan(data, lim)
	if err != nil {
		return nil, err
	}
	b := &budget{left: lim.MaxUnzippedBytes, max: lim.MaxUnzippedBytes}
	for _, e := range pkg.regular {
		if err := readEntry(context.Background(), e, io.Discard, b); err != nil {
			return nil, err
		}
	}
	return pkg.manifest, nil
}

// entry is one validated zip entry with its cleaned name.
type entry struct {
	zf   *zip.File
	name string
}

// pkg is the result of the structural pass over a zip: names, types and
// declared sizes are valid, symlink targets are read and stay inside.
// Regular files' contents are not read yet.
type pkg struct {
	manifest *Manifest
	dirs     []string // every directory, explicit or implied, sorted
	regular  []entry
	symlinks []entry
}

func errUnzip() error {
	return errdefs.Invalid("Could not unzip uploaded file. Please check your file, then try to upload again.")
}

func errUnzippedSize(lim Limits) error {
	return errdefs.Invalid("Unzipped size must be smaller than %d bytes", lim.MaxUnzippedBytes)
}

// scan does the structural validation shared by Inspect and Extract.
func scan(data []byte, lim Limits) (*pkg, error) {
	if int64(len(data)) > lim.MaxZipBytes {
		return nil, fmt.Errorf("Zipped size must be smaller than %d bytes: %w", lim.MaxZipBytes, errdefs.ErrTooLarge)
	}
	zr, err := zip.NewReader(bytes.NewReader(data), int64(len(data)))
	// ErrInsecurePath (only under GODEBUG=zipinsecurepath=0) still returns a
	// usable reader; the names are checked below with better messages.
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) {
		return nil, errUnzip()
	}
	if len(zr.File) > lim.MaxEntries {
		return nil, errdefs.Invalid("Uploaded file must contain at most %d entries, found %d", lim.MaxEntries, len(zr.File))
	}
	p := &pkg{manifest: &Manifest{Files: make(map[string]File, len(zr.File))}}
	dirs := map[string]bool{}
	seen := map[string]bool{}
	var declared uint64
	for _, zf := range zr.File {
		name, err := cleanName(zf.Name)
		if err != nil {
			return nil, err
		}
		mode := zf.Mode()
		isDir := mode.IsDir() || strings.HasSuffix(zf.Name, "/")
		if seen[name] {
			return nil, errdefs.Invalid("Uploaded file contains the entry %q more than once", zf.Name)
		}
		seen[name] = true
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
		switch {
		case isDir:
			if name != "." {
				dirs[name] = true
			}
			continue
		case name == ".":
			return nil, errdefs.Invalid("Uploaded file contains an entry with an empty name")
		case mode&fs.ModeSymlink != 0:
			target, err := readSymlink(zf)
			if err != nil {
				return nil, err
			}
			p.manifest.Files[name] = File{Mode: fs.ModeSymlink | 0o777, Size: int64(len(target)), Target: target}
			p.symlinks = append(p.symlinks, entry{zf: zf, name: name})
		case mode.IsRegular():
			perm := fs.FileMode(0o644)
			if mode&0o111 != 0 {
				perm = 0o755
			}
			p.manifest.Files[name] = File{Mode: perm, Size: int64(zf.UncompressedSize64)}
			p.regular = append(p.regular, entry{zf: zf, name: name})
		default:
			return nil, errdefs.Invalid("Uploaded file contains %q of unsupported type %s; only files, directories and symlinks are allowed", zf.Name, mode.Type())
		}
		declared += zf.UncompressedSize64
		if declared > uint64(lim.MaxUnzippedBytes) {
			return nil, errUnzippedSize(lim)
		}
	}
	if len(p.regular) == 0 {
		return nil, errdefs.Invalid("Uploaded file must be a non-empty zip")
	}
	p.manifest.UnzippedSize = int64(declared)
	// A path cannot be both a file and a directory, and nothing may be
	// written below a symlink (extraction would follow it).
	for d := range dirs {
		if f, ok := p.manifest.Files[d]; ok {
			if f.Mode&fs.ModeSymlink != 0 {
				return nil, errdefs.Invalid("Uploaded file contains entries below the symlink %q", d)
			}
			return nil, errdefs.Invalid("Uploaded file contains %q both as a file and as a directory", d)
		}
		p.dirs = append(p.dirs, d)
	}
	sort.Strings(p.dirs)
	for _, e := range p.symlinks {
		if err := checkLink(p.manifest.Files, e.name); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// cleanName validates an entry name and returns it without a trailing
// slash; the package root itself is ".".
func cleanName(name string) (string, error) {
	switch {
	case name == "":
		return "", errdefs.Invalid("Uploaded file contains an entry with an empty name")
	case strings.ContainsRune(name, 0):
		return "", errdefs.Invalid("Uploaded file contains an entry name with a NUL byte: %q", name)
	case strings.Contains(name, `\`):
		return "", errdefs.Invalid("Uploaded file contains an entry name with a backslash: %q", name)
	case strings.HasPrefix(name, "/"):
		return "", errdefs.Invalid("Uploaded file contains an entry with an absolute path: %q", name)
	case len(name) >= 2 && name[1] == ':':
		return "", errdefs.Invalid("Uploaded file contains an entry with a drive letter: %q", name)
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", errdefs.Invalid("Uploaded file contains an entry outside the package root: %q", name)
		}
	}
	return path.Clean(name), nil
}

func readSymlink(zf *zip.File) (string, error) {
	if zf.UncompressedSize64 > maxSymlinkTarget {
		return "", errdefs.Invalid("Uploaded file contains the symlink %q with a target longer than %d bytes", zf.Name, maxSymlinkTarget)
	}
	var buf bytes.Buffer
	b := &budget{left: maxSymlinkTarget, max: maxSymlinkTarget}
	if err := readEntry(context.Background(), entry{zf: zf, name: zf.Name}, &buf, b); err != nil {
		return "", err
	}
	t := buf.String()
	switch {
	case t == "":
		return "", errdefs.Invalid("Uploaded file contains the symlink %q with an empty target", zf.Name)
	case strings.ContainsRune(t, 0):
		return "", errdefs.Invalid("Uploaded file contains the symlink %q with a NUL byte in its target", zf.Name)
	case strings.HasPrefix(t, "/"):
		return "", errdefs.Invalid("Uploaded file contains the symlink %q with an absolute target %q", zf.Name, t)
	}
	return t, nil
}

// checkLink verifies that the symlink at name, followed through every other
// symlink of the package it passes, never leaves the package's tree.
// Targets that do not exist are allowed (as in any tree) if they stay inside.
func checkLink(files map[string]File, name string) error {
	p := name
	for hops := 0; ; hops++ {
		if hops > maxSymlinkHops {
			return errdefs.Invalid("Uploaded file contains the symlink %q in a loop", name)
		}
		next, err := resolveLink(files, p, files[p].Target)
		if err != nil {
			return errdefs.Invalid("Uploaded file contains the symlink %q pointing outside the package", name)
		}
		f, ok := files[next]
		if !ok || f.Mode&fs.ModeSymlink == 0 {
			return nil
		}
		p = next
	}
}

var errEscapes = errors.New("symlink leaves the package")

// resolveLink returns the package path that the symlink at link with target
// refers to, following intermediate symlinks in the package. It fails if
// any step goes above the package root.
func resolveLink(files map[string]File, link, target string) (string, error) {
	var stack []string
	if d := path.Dir(link); d != "." {
		stack = strings.Split(d, "/")
	}
	pending := strings.Split(target, "/")
	for hops := 0; len(pending) > 0; {
		c := pending[0]
		pending = pending[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) == 0 {
				return "", errEscapes
			}
			stack = stack[:len(stack)-1]
			continue
		}
		stack = append(stack, c)
		if len(pending) == 0 {
			break // the final component is returned, not followed
		}
		cur := strings.Join(stack, "/")
		if f, ok := files[cur]; ok && f.Mode&fs.ModeSymlink != 0 {
			if hops++; hops > maxSymlinkHops {
				return "", errEscapes
			}
			stack = stack[:len(stack)-1]
			pending = append(strings.Split(f.Target, "/"), pending...)
		}
	}
	if len(stack) == 0 {
		return ".", nil
	}
	return strings.Join(stack, "/"), nil
}

// budget counts decompressed bytes across a whole package.
type budget struct {
	left, max int64
}

// readEntry decompresses one entry into w, counting every byte against b,
// and lets archive/zip verify the size and CRC at the end. Between chunks it
// honours ctx. Errors from w are returned wrapped, not as invalid input.
func readEntry(ctx context.Context, e entry, w io.Writer, b *budget) error {
	rc, err := e.zf.Open()
	if err != nil {
		return errEntry(e.zf.Name, err)
	}
	defer rc.Close()
	// Read one byte more than the budget allows, to tell "exactly at the
	// cap" from "over it" without trusting the header.
	src := &ctxReader{ctx: ctx, r: io.LimitReader(rc, b.left+1)}
	dst := &taggedWriter{w: w}
	n, err := io.Copy(dst, src)
	b.left -= n
	if b.left < 0 {
		return errdefs.Invalid("Unzipped size must be smaller than %d bytes", b.max)
	}
	var we *writeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &we):
		return fmt.Errorf("writing %s: %w", e.name, we.err)
	case ctx.Err() != nil:
		return ctx.Err()
	default:
		return errEntry(e.zf.Name, err)
	}
}

func errEntry(name string, err error) error {
	return errdefs.Invalid("Could not unzip uploaded file. Please check your file, then try to upload again. (entry %q: %v)", name, err)
}

// ctxReader stops a long decompression when ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// writeError marks an error that came from the destination, so it is not
// mistaken for a broken package.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }

type taggedWriter struct{ w io.Writer }

func (t *taggedWriter) Write(p []byte) (int, error) {
	n, err := t.w.Write(p)
	if err != nil {
		err = &writeError{err: err}
	}
	return n, err
}
