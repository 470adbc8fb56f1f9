// Package e2e tests InvokeX end to end: a real invokex server (built from
// this tree) with its real SQLite store and process sandbox, driven by the
// real AWS SDK for Go v2 and the invokex CLI, running real functions built
// with github.com/aws/aws-lambda-go and the python and node runtimes.
//
// The tests need root (the process sandbox uses namespaces and cgroups) and
// skip with a reason otherwise.
package e2e

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
)

var (
	buildOnce sync.Once
	buildErr  error
	binDir    string // holds invokex, probe/bootstrap, hello-go/bootstrap
	repoRoot  string
)

func TestMain(m *testing.M) {
	_, file, _, _ := runtime.Caller(0)
	repoRoot = filepath.Dir(filepath.Dir(file))
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// requireRoot skips tests that need the process sandbox's privileges.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("end-to-end tests need root: the process sandbox uses mount/pid namespaces and cgroups")
	}
}

// build compiles invokex and the test functions once per test run.
func build(t *testing.T) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "invokex-e2e-bin-")
		if buildErr != nil {
			return
		}
		for _, b := range []struct{ out, pkg string }{
			{"invokex", "./cmd/invokex"},
			{"invokex-agent", "./cmd/invokex-agent"},
			{"probe/bootstrap", "./internal/testfunc/probe"},
			{"hello-go/bootstrap", "./examples/hello-go"},
		} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, b.out), b.pkg)
			cmd.Dir = repoRoot
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build %s: %v\n%s", b.pkg, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

func invokexBin() string { return filepath.Join(binDir, "invokex") }

// server is one running invokex server process.
type server struct {
	t        *testing.T
	endpoint string
	addr     string
	dataDir  string
	args     []string
	cmd      *exec.Cmd
	logPath  string
	done     chan struct{}
}

// startServer starts `invokex server` on a free loopback port with a fresh
// data dir (or dataDir, to restart on existing data) and waits until healthy.
func startServer(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	requireRoot(t)
	build(t)
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	s := &server{t: t, dataDir: dataDir, args: extra}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *server) start() {
	t := s.t
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	ln.Close()
	s.endpoint = "http://" + s.addr
	s.logPath = filepath.Join(t.TempDir(), "server.log")
	logf, err := os.Create(s.logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append([]string{"server", "--listen", s.addr, "--data-dir", s.dataDir, "--log-level", "debug"}, s.args...)
	if !slices.Contains(s.args, "--driver") {
		// auto would pick microVMs on a host with QEMU and a guest kernel;
		// the core suite runs on the process sandbox, qemu_test.go on VMs.
		args = append(args, "--driver", "process")
	}
	s.cmd = exec.Command(invokexBin(), args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.done = make(chan struct{})
	go func() { s.cmd.Wait(); logf.Close(); close(s.done) }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(s.endpoint + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-s.done:
			t.Fatalf("server exited during start-up:\n%s", s.log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server not healthy after 60s:\n%s", s.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop shuts the server down gracefully (SIGTERM), killing it if it hangs.
func (s *server) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case <-s.done:
		return
	default:
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.t.Errorf("server did not stop within 30s of SIGTERM; killing it:\n%s", s.log())
		s.cmd.Process.Kill()
		<-s.done
	}
	if s.t.Failed() {
		s.t.Logf("server log:\n%s", s.log())
	}
}

// kill SIGKILLs the server, as a crash would.
func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.done
}

func (s *server) log() string {
	b, _ := os.ReadFile(s.logPath)
	if len(b) > 20000 {
		b = b[len(b)-20000:]
	}
	return string(b)
}

// sdk returns a real AWS SDK Lambda client pointed at the server.
func (s *server) sdk() *lambda.Client {
	return lambda.New(lambda.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(s.endpoint),
		Credentials:  credentials.NewStaticCredentialsProvider("AKIDEXAMPLE", "secret", ""),
		Retryer:      aws.NopRetryer{},
		HTTPClient:   &http.Client{Timeout: 5 * time.Minute},
	})
}

// zipDir zips a directory's regular files, keeping executable bits.
func zipDir(t *testing.T, dir string) []byte {
	t.Helper()
	files := map[string][]byte{}
	modes := map[string]os.FileMode{}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		b, err := os.ReadFile(p)
		files[filepath.ToSlash(rel)] = b
		modes[filepath.ToSlash(rel)] = info.Mode().Perm()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return makeZip(t, files, modes)
}

func makeZip(t *testing.T, files map[string][]byte, modes map[string]os.FileMode) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, data := range files {
		h := &zip.FileHeader{Name: name, Method: zip.Deflate}
		mode := os.FileMode(0o644)
		if m, ok := modes[name]; ok {
			mode = m
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		w.Write(data)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func probeZip(t *testing.T) []byte   { return zipDir(t, filepath.Join(binDir, "probe")) }
func helloGoZip(t *testing.T) []byte { return zipDir(t, filepath.Join(binDir, "hello-go")) }
func exampleZip(t *testing.T, name string) []byte {
	return zipDir(t, filepath.Join(repoRoot, "examples", name))
}

// eventually polls f until it returns nil or the deadline passes.
func eventually(t *testing.T, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func readAll(r io.Reader) string { b, _ := io.ReadAll(r); return string(b) }

var errNotYet = errors.New("not yet")

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func mustRuntimes(t *testing.T, s *server) []clientRuntime {
	t.Helper()
	rts, err := newClient(s).ListRuntimes(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	return rts
}
