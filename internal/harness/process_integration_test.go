package harness_test

import (
	"archive/zip"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/function"
	"github.com/invokex/invokex/internal/harness"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/process"
	"github.com/invokex/invokex/internal/runtimes"
)

// TestMain makes the test binary the process sandbox's init, as the
// invokex binary's hidden command does.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == process.InitArg {
		os.Exit(process.InitMain())
	}
	os.Exit(m.Run())
}

// oneBlob is a CodeSource holding one package.
type oneBlob struct {
	digest string
	data   []byte
}

func (b *oneBlob) Open(ctx context.Context, digest string) (io.ReadCloser, error) {
	if digest != b.digest {
		return nil, fmt.Errorf("blob %s: %w", digest, errdefs.ErrNotFound)
	}
	return io.NopCloser(bytes.NewReader(b.data)), nil
}

// zipDir packs dir's regular files as a deployment package.
func zipDir(t *testing.T, dir string) *oneBlob {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := zip.FileInfoHeader(info)
		if err != nil {
			return err
		}
		hdr.Name, hdr.Method = filepath.ToSlash(rel), zip.Deflate
		w, err := zw.CreateHeader(hdr)
		if err != nil {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		_, err = w.Write(data)
		return err
	})
	if err == nil {
		err = zw.Close()
	}
	if err != nil {
		t.Fatalf("packing %s: %v", dir, err)
	}
	sum := sha256.Sum256(buf.Bytes())
	return &oneBlob{digest: base64.StdEncoding.EncodeToString(sum[:]), data: buf.Bytes()}
}

// TestHarnessWithProcessDriver runs the probe function through the real
// process sandbox: cold start, warm reuse, the environment the function
// sees, a crash, and a clean shutdown.
func TestHarnessWithProcessDriver(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the process driver's full isolation (cgroups, uid 993) needs root")
	}
	if testing.Short() {
		t.Skip("builds the probe function and starts real sandboxes")
	}
	blob := zipDir(t, drivertest.BuildProbe(t))
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	drv, err := process.New(process.Options{StateDir: t.TempDir(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := drv.Close(ctx); err != nil {
			t.Errorf("closing driver: %v", err)
		}
	})
	h, err := harness.New(harness.Config{
		Driver: drv, CacheDir: t.TempDir(), Code: blob, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = h.Close(context.Background())
		}
	})

	fn := &function.Config{
		Name: "probe", Runtime: "provided.al2023", Handler: "bootstrap", Timeout: 10, MemorySize: 256,
		CodeSha256: blob.digest, RevisionID: "rev-1", Version: function.LatestVersion,
		Environment: map[string]string{"GREETING": "hello", "AWS_REGION": "nope"},
	}
	rt := &runtimes.Runtime{
		ID: "provided.al2023", Family: runtimes.FamilyProvided, Available: true,
		Bootstrap: []string{"/var/task/bootstrap"}, ExecutionEnv: "AWS_Lambda_provided.al2023",
	}
	invoke := func(id, payload string) *harness.InvokeResult {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		res, err := h.Invoke(ctx, &harness.InvokeRequest{
			RequestID: id, Function: fn, Runtime: rt, Payload: []byte(payload),
			ARN: function.ARN("us-east-1", "000000000000", "probe"),
		})
		if err != nil {
			t.Fatalf("Invoke %s: %v", id, err)
		}
		return res
	}

	first := invoke("req-1", `{"action":"echo","n":1}`)
	if first.FunctionError != "" || !first.Cold {
		t.Fatalf("first invoke: error %q cold %v payload %s log %s", first.FunctionError, first.Cold, first.Payload, first.Log)
	}
	var echo struct {
		Event json.RawMessage `json:"event"`
		Facts struct {
			UID int               `json:"uid"`
			Cwd string            `json:"cwd"`
			Env map[string]string `json:"env"`
		} `json:"facts"`
	}
	if err := json.Unmarshal(first.Payload, &echo); err != nil {
		t.Fatalf("echo payload %s: %v", first.Payload, err)
	}
	if string(echo.Event) != `{"action":"echo","n":1}` {
		t.Errorf("event seen by the function = %s", echo.Event)
	}
	env := echo.Facts.Env
	if env["AWS_LAMBDA_FUNCTION_NAME"] != "probe" || env["GREETING"] != "hello" || env["AWS_REGION"] != "us-east-1" ||
		env["LAMBDA_TASK_ROOT"] != "/var/task" || env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] != "256" {
		t.Errorf("function environment = %v", env)
	}
	if echo.Facts.UID != 993 || echo.Facts.Cwd != "/var/task" {
		t.Errorf("function runs as uid %d in %s, want 993 in /var/task", echo.Facts.UID, echo.Facts.Cwd)
	}
	if !bytes.Contains(first.Log, []byte("REPORT RequestId: req-1")) {
		t.Errorf("log = %q", first.Log)
	}

	second := invoke("req-2", `{"action":"echo","n":2}`)
	if second.Cold || second.Instance != first.Instance {
		t.Fatalf("second invoke cold %v on %s, want warm on %s", second.Cold, second.Instance, first.Instance)
	}

	crash := invoke("req-3", `{"action":"exit","code":3}`)
	if crash.FunctionError != "Unhandled" {
		t.Fatalf("crash result = %q %s", crash.FunctionError, crash.Payload)
	}
	after := invoke("req-4", `{"action":"echo","n":4}`)
	if after.FunctionError != "" || after.Instance == first.Instance {
		t.Fatalf("after a crash: error %q on %s (crashed %s)", after.FunctionError, after.Instance, first.Instance)
	}

	closed = true
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := h.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if st := h.Stats(); st.Instances != 0 {
		t.Fatalf("instances left after Close: %+v", st)
	}
	if _, err := h.Invoke(context.Background(), &harness.InvokeRequest{RequestID: "late", Function: fn, Runtime: rt}); !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Invoke after Close = %v", err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}
