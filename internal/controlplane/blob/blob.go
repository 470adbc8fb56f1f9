// Package blob stores deployment packages content-addressed by their SHA-256.
package blob

import (
	"context"
	"io"
)

// Store holds immutable blobs keyed by the base64 SHA-256 of their content
// (Lambda's CodeSha256). All methods are safe for concurrent use.
//
// Errors wrap errdefs kinds: ErrNotFound for a missing blob.
type Store interface {
	// Put stores the content of r and returns its digest (base64 SHA-256) and
	// size. Putting content that exists already is a no-op that returns the
	// same digest. A failed or cancelled Put leaves nothing behind.
	Put(ctx context.Context, r io.Reader) (digest string, size int64, err error)
	// Open returns the blob's content. ErrNotFound if absent.
	Open(ctx context.Context, digest string) (io.ReadCloser, error)
	// Delete removes a blob. Idempotent.
	Delete(ctx context.Context, digest string) error
}
