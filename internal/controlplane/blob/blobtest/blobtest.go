// Package blobtest is the conformance suite of blob.Store: every
// implementation runs Run from its own tests.
//
// Beyond what blob.go states, the suite pins down that a digest must be the
// canonical standard base64 (padded) of 32 bytes, anything else being
// ErrInvalidParameter for Open and Delete, and that a failed Put returns an
// error wrapping the reader's error (or the context's).
package blobtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/invokex/invokex/internal/controlplane/blob"
	"github.com/invokex/invokex/internal/errdefs"
)

// Run runs the suite. newStore must return a new, empty store for each call
// and clean it up through t.Cleanup.
func Run(t *testing.T, newStore func(t *testing.T) blob.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s blob.Store)
	}{
		{"PutOpenRoundTrip", testRoundTrip},
		{"Empty", testEmpty},
		{"Large", testLarge},
		{"PutExisting", testPutExisting},
		{"ConcurrentPuts", testConcurrentPuts},
		{"OpenMissing", testOpenMissing},
		{"InvalidDigests", testInvalidDigests},
		{"Delete", testDelete},
		{"FailedPut", testFailedPut},
		{"CancelledPut", testCancelledPut},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newStore(t)) })
	}
}

// Digest returns the key a store must give content: its base64 SHA-256.
func Digest(content []byte) string {
	sum := sha256.Sum256(content)
	return base64.StdEncoding.EncodeToString(sum[:])
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func put(t *testing.T, s blob.Store, content []byte) string {
	t.Helper()
	digest, size, err := s.Put(t.Context(), bytes.NewReader(content))
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	if want := Digest(content); digest != want {
		t.Fatalf("Put digest %q, want %q", digest, want)
	}
	if size != int64(len(content)) {
		t.Fatalf("Put size %d, want %d", size, len(content))
	}
	return digest
}

// wantContent fails t unless the blob under digest holds content.
func wantContent(t *testing.T, s blob.Store, digest string, content []byte) {
	t.Helper()
	rc, err := s.Open(t.Context(), digest)
	if err != nil {
		t.Fatalf("Open(%s): %v", digest, err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading %s: %v", digest, err)
	}
	if !bytes.Equal(got, content) {
		t.Fatalf("blob %s: %d bytes that differ from the %d put", digest, len(got), len(content))
	}
}

func wantMissing(t *testing.T, s blob.Store, digest string) {
	t.Helper()
	rc, err := s.Open(t.Context(), digest)
	if err == nil {
		rc.Close()
		t.Fatalf("Open(%s) succeeded, want ErrNotFound", digest)
	}
	if !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("Open(%s): %v, want ErrNotFound", digest, err)
	}
}

func testRoundTrip(t *testing.T, s blob.Store) {
	a, b := []byte("hello, lambda"), []byte("another package")
	da, db := put(t, s, a), put(t, s, b)
	wantContent(t, s, da, a)
	wantContent(t, s, db, b)
}

func testEmpty(t *testing.T, s blob.Store) {
	d := put(t, s, nil)
	if d != "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=" {
		t.Fatalf("empty blob digest %q", d)
	}
	wantContent(t, s, d, nil)
}

// testLarge streams several MB through a reader that returns short reads.
func testLarge(t *testing.T, s blob.Store) {
	content := randomBytes(5<<20+17, 1)
	digest, size, err := s.Put(t.Context(), iotest.HalfReader(bytes.NewReader(content)))
	if err != nil {
		t.Fatalf("Put: %v", err)
	}
	if digest != Digest(content) || size != int64(len(content)) {
		t.Fatalf("Put = %s, %d; want %s, %d", digest, size, Digest(content), len(content))
	}
	wantContent(t, s, digest, content)
}

func testPutExisting(t *testing.T, s blob.Store) {
	content := randomBytes(4096, 2)
	d1 := put(t, s, content)
	d2 := put(t, s, content)
	if d1 != d2 {
		t.Fatalf("same content, digests %s and %s", d1, d2)
	}
	wantContent(t, s, d1, content)
}

func testConcurrentPuts(t *testing.T, s blob.Store) {
	shared := randomBytes(300<<10, 3)
	const n = 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			content := shared
			if i%2 == 1 {
				content = randomBytes(1000+i, uint64(100+i))
			}
			d, size, err := s.Put(context.Background(), bytes.NewReader(content))
			if err == nil && (d != Digest(content) || size != int64(len(content))) {
				err = errors.New("wrong digest or size")
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("concurrent Put %d: %v", i, err)
		}
	}
	wantContent(t, s, Digest(shared), shared)
	for i := 1; i < n; i += 2 {
		c := randomBytes(1000+i, uint64(100+i))
		wantContent(t, s, Digest(c), c)
	}
}

func testOpenMissing(t *testing.T, s blob.Store) {
	wantMissing(t, s, Digest([]byte("never stored")))
}

func testInvalidDigests(t *testing.T, s blob.Store) {
	valid := Digest([]byte("x"))
	raw := sha256.Sum256([]byte("x"))
	bad := []string{
		"",
		"abc",
		"../../../../etc/passwd",
		"/etc/passwd",
		"..",
		"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",    // unpadded
		"47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=",   // URL alphabet
		"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n", // trailing newline
		" " + valid,
		base64.StdEncoding.EncodeToString(raw[:31]),                        // 31 bytes
		base64.StdEncoding.EncodeToString(append(raw[:], 0)),               // 33 bytes
		"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", // hex
		valid[:len(valid)-2] + "V=",                                        // non-canonical trailing bits
	}
	put(t, s, []byte("x"))
	for _, d := range bad {
		rc, err := s.Open(t.Context(), d)
		if err == nil {
			rc.Close()
			t.Errorf("Open(%q) succeeded", d)
		} else if !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("Open(%q): %v, want ErrInvalidParameter", d, err)
		}
		if err := s.Delete(t.Context(), d); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("Delete(%q): %v, want ErrInvalidParameter", d, err)
		}
	}
	wantContent(t, s, valid, []byte("x"))
}

func testDelete(t *testing.T, s blob.Store) {
	a, b := []byte("delete me"), []byte("keep me")
	da, db := put(t, s, a), put(t, s, b)
	if err := s.Delete(t.Context(), da); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	wantMissing(t, s, da)
	wantContent(t, s, db, b)
	if err := s.Delete(t.Context(), da); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if err := s.Delete(t.Context(), Digest([]byte("never stored"))); err != nil {
		t.Fatalf("Delete of a blob never stored: %v", err)
	}
	// The content can be stored again.
	put(t, s, a)
	wantContent(t, s, da, a)
}

// failingReader returns its data, then err.
type failingReader struct {
	data []byte
	err  error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, r.err
	}
	n := copy(p, r.data)
	r.data = r.data[n:]
	return n, nil
}

func testFailedPut(t *testing.T, s blob.Store) {
	content := randomBytes(1<<20, 4)
	readErr := errors.New("connection reset")
	_, _, err := s.Put(t.Context(), &failingReader{data: content[:len(content)/2], err: readErr})
	if !errors.Is(err, readErr) {
		t.Fatalf("Put from a failing reader: %v, want the reader's error", err)
	}
	wantMissing(t, s, Digest(content[:len(content)/2]))
	wantMissing(t, s, Digest(content))
}

// cancellingReader cancels its context after the first read and then keeps
// producing data, up to a bound, so a Put that ignores cancellation
// completes and fails the test instead of hanging.
type cancellingReader struct {
	cancel context.CancelFunc
	left   int
}

func (r *cancellingReader) Read(p []byte) (int, error) {
	r.cancel()
	if r.left == 0 {
		return 0, io.EOF
	}
	n := min(len(p), r.left)
	for i := range p[:n] {
		p[i] = 'z'
	}
	r.left -= n
	return n, nil
}

func testCancelledPut(t *testing.T, s blob.Store) {
	const total = 64 << 20
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	digest, _, err := s.Put(ctx, &cancellingReader{cancel: cancel, left: total})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Put with a context cancelled mid-stream: digest %q, err %v; want context.Canceled", digest, err)
	}
	wantMissing(t, s, Digest(bytes.Repeat([]byte{'z'}, total)))

	_, _, err = s.Put(ctx, bytes.NewReader([]byte("too late")))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Put with a cancelled context: %v, want context.Canceled", err)
	}
	wantMissing(t, s, Digest([]byte("too late")))
}
