// Package codezip validates and unpacks deployment packages (zip files)
// safely: no path may leave the tree, and entry count and unzipped size are
// capped so a zip bomb is refused before it is written.
package codezip

import (
	"context"
	"errors"
	"io/fs"
)

// Limits caps what a package may contain.
type Limits struct {
	MaxZipBytes      int64 // size of the zip itself
	MaxUnzippedBytes int64 // sum of uncompressed sizes
	MaxEntries       int
}

// File is one regular file or symlink in a package.
type File struct {
	Mode fs.FileMode
	Size int64
}

// Manifest lists a validated package's entries by slash-separated path.
type Manifest struct {
	Files        map[string]File
	UnzippedSize int64
}

// DefaultLimits returns Lambda's limits (50 MB zip, 250 MB unzipped).
func DefaultLimits() Limits { panic("codezip: not implemented yet") }

// Inspect validates data as a deployment package without writing anything.
func Inspect(data []byte, lim Limits) (*Manifest, error) {
	return nil, errors.New("codezip: not implemented yet")
}

// Extract unpacks a package into dir, which must not exist; it appears
// complete or not at all.
func Extract(ctx context.Context, data []byte, dir string, lim Limits) error {
	return errors.New("codezip: not implemented yet")
}
