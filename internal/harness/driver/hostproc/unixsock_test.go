package hostproc

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDialUnixLongPath: a socket whose path exceeds sun_path is bound and
// reached through its directory's descriptor.
func TestDialUnixLongPath(t *testing.T) {
	deep := filepath.Join(t.TempDir(), strings.Repeat("d", 60), strings.Repeat("e", 60))
	if err := os.MkdirAll(deep, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(deep, "s.sock")
	if len(path) <= MaxSunPath {
		t.Fatalf("test path of %d bytes is not too long", len(path))
	}
	var l net.Listener
	err := SocketAddr(path, func(addr string) error {
		var err error
		l, err = net.Listen("unix", addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			io.WriteString(c, "hi")
			c.Close()
		}
	}()
	c, err := DialUnix(context.Background(), path)
	if err != nil {
		t.Fatalf("DialUnix(%d-byte path): %v", len(path), err)
	}
	defer c.Close()
	if b, _ := io.ReadAll(c); string(b) != "hi" {
		t.Errorf("read %q", b)
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("the socket is not at its long path: %v", err)
	}
}

func TestDialUnixErrors(t *testing.T) {
	if _, err := DialUnix(context.Background(), filepath.Join(t.TempDir(), "absent.sock")); err == nil {
		t.Errorf("dialing a missing socket succeeded")
	}
	long := "/nonexistent/" + strings.Repeat("x", 200) + "/s.sock"
	if _, err := DialUnix(context.Background(), long); err == nil || !strings.Contains(err.Error(), "opening socket directory") {
		t.Errorf("missing long directory: %v", err)
	}
	name := filepath.Join(t.TempDir(), strings.Repeat("n", 120))
	if err := SocketAddr(name, func(string) error { return nil }); err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("a name too long for sun_path: %v", err)
	}
}
