package runtimes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// This file is a fake Lambda Runtime API for running the real runtime
// interface clients (and the example functions) in tests: it hands out
// queued events on /next, records what the runtime posts, and captures the
// runtime's output so that each post carries exactly the output written
// before it.

// hangGuard bounds every wait on the runtime so that a broken RIC fails the
// test instead of hanging it. It is not a timing assertion.
const hangGuard = 30 * time.Second

type fakeEvent struct {
	id      string
	body    string
	headers map[string]string
}

type fakeResult struct {
	kind      string // "response", "error" or "init-error"
	id        string
	body      []byte
	errorType string // the Lambda-Runtime-Function-Error-Type header
	// output is everything the runtime wrote (stdout and stderr) since the
	// previous post, read at the moment this post arrived.
	output string
}

type fakeAPI struct {
	srv     *httptest.Server
	events  chan fakeEvent
	results chan fakeResult
	out     *outputCapture
	outW    *os.File // the write end of out, for the runtime
	exited  chan int // the runtime's exit code, once
	seq     int
}

func newFakeAPI(t *testing.T) *fakeAPI {
	t.Helper()
	f := &fakeAPI{
		events:  make(chan fakeEvent, 16),
		results: make(chan fakeResult, 16),
		exited:  make(chan int, 1),
	}
	// Created before the server starts: its handlers use it.
	f.out, f.outW = newOutputCapture(t)
	t.Cleanup(func() { f.outW.Close() }) // if no runtime took it
	mux := http.NewServeMux()
	mux.HandleFunc("GET /2018-06-01/runtime/invocation/next", f.next)
	mux.HandleFunc("POST /2018-06-01/runtime/invocation/{id}/response", f.post("response"))
	mux.HandleFunc("POST /2018-06-01/runtime/invocation/{id}/error", f.post("error"))
	mux.HandleFunc("POST /2018-06-01/runtime/init/error", f.post("init-error"))
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeAPI) next(w http.ResponseWriter, r *http.Request) {
	select {
	case ev := <-f.events:
		h := w.Header()
		h.Set("Lambda-Runtime-Aws-Request-Id", ev.id)
		h.Set("Lambda-Runtime-Deadline-Ms", strconv.FormatInt(time.Now().Add(time.Minute).UnixMilli(), 10))
		h.Set("Lambda-Runtime-Invoked-Function-Arn", "arn:aws:lambda:us-east-1:000000000000:function:fn-test")
		for k, v := range ev.headers {
			h.Set(k, v)
		}
		h.Set("Content-Type", "application/json")
		io.WriteString(w, ev.body)
	case <-r.Context().Done():
	}
}

func (f *fakeAPI) post(kind string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		res := fakeResult{
			kind:      kind,
			id:        r.PathValue("id"),
			body:      body,
			errorType: r.Header.Get("Lambda-Runtime-Function-Error-Type"),
		}
		res.output = f.out.take()
		w.WriteHeader(http.StatusAccepted)
		f.results <- res
	}
}

// addr is the value of AWS_LAMBDA_RUNTIME_API.
func (f *fakeAPI) addr() string { return strings.TrimPrefix(f.srv.URL, "http://") }

// invoke queues one event and waits for the runtime's answer.
func (f *fakeAPI) invoke(t *testing.T, body string, headers map[string]string) fakeResult {
	t.Helper()
	f.seq++
	id := fmt.Sprintf("req-%d-%d", f.seq, time.Now().UnixNano())
	f.events <- fakeEvent{id: id, body: body, headers: headers}
	res := f.result(t)
	if res.kind != "init-error" && res.id != id {
		t.Fatalf("runtime answered request %q, want %q", res.id, id)
	}
	return res
}

func (f *fakeAPI) result(t *testing.T) fakeResult {
	t.Helper()
	select {
	case res := <-f.results:
		return res
	case code := <-f.exited:
		f.exited <- code
		// A post is queued before the runtime sees its reply, so one that
		// came just before the exit is already here.
		select {
		case res := <-f.results:
			return res
		default:
		}
		t.Fatalf("runtime exited with %d before answering; output:\n%s", code, f.out.take())
	case <-time.After(hangGuard):
		t.Fatalf("no answer from the runtime; output:\n%s", f.out.take())
	}
	panic("unreachable")
}

// exitCode waits for the runtime to exit.
func (f *fakeAPI) exitCode(t *testing.T) int {
	t.Helper()
	select {
	case code := <-f.exited:
		f.exited <- code
		return code
	case <-time.After(hangGuard):
		t.Fatal("runtime did not exit")
	}
	return 0
}

// outputCapture reads the runtime's output pipe. All reads happen under mu
// and are non-blocking, so take sees everything written to the pipe before
// it was called: what a background poll has read, plus what is still in the
// kernel. (A plain blocking reader could hold data it has read but not yet
// recorded.) The background reader keeps the pipe drained so a runtime
// writing a lot never blocks.
type outputCapture struct {
	mu   sync.Mutex
	fd   int
	buf  []byte
	done chan struct{}
	wg   sync.WaitGroup
}

// newOutputCapture returns the capture and the write end for the runtime.
func newOutputCapture(t *testing.T) (*outputCapture, *os.File) {
	t.Helper()
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	if err := syscall.SetNonblock(p[0], true); err != nil {
		t.Fatal(err)
	}
	c := &outputCapture{fd: p[0], done: make(chan struct{})}
	c.wg.Add(1)
	go c.poll()
	t.Cleanup(func() {
		close(c.done)
		c.wg.Wait()
		syscall.Close(c.fd)
	})
	return c, os.NewFile(uintptr(p[1]), "runtime-output")
}

func (c *outputCapture) poll() {
	defer c.wg.Done()
	for {
		select {
		case <-c.done:
			return
		default:
		}
		fds := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(fds, 50); err != nil && !errors.Is(err, syscall.EINTR) {
			return
		}
		if fds[0].Revents != 0 {
			c.mu.Lock()
			eof := c.drainLocked()
			c.mu.Unlock()
			if eof {
				// Writer closed: nothing more will come, but wait for done
				// so take keeps working.
				<-c.done
				return
			}
		}
	}
}

// drainLocked reads until the pipe is empty; it reports end of file.
func (c *outputCapture) drainLocked() bool {
	var b [64 << 10]byte
	for {
		n, err := syscall.Read(c.fd, b[:])
		if n > 0 {
			c.buf = append(c.buf, b[:n]...)
			continue
		}
		if err == syscall.EINTR {
			continue
		}
		return err == nil // n == 0 and no error: EOF
	}
}

// take returns the output since the previous take.
func (c *outputCapture) take() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.drainLocked()
	s := string(c.buf)
	c.buf = nil
	return s
}

// writeFiles creates files (slash paths relative to dir) with their content.
func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// detected returns the first available runtime of a family on this host,
// or skips the test.
func detected(t *testing.T, family Family) *Runtime {
	t.Helper()
	for _, rt := range Detect(context.Background()) {
		if rt.Family == family && rt.Available {
			return rt
		}
	}
	t.Skipf("no %s runtime available on this host", family)
	return nil
}

// startProcess runs argv (the runtime) in a clean environment against f,
// with taskRoot as LAMBDA_TASK_ROOT and its working directory.
func startProcess(t *testing.T, f *fakeAPI, argv []string, handler, taskRoot string) {
	t.Helper()
	w := f.outW
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = taskRoot
	cmd.Env = []string{
		"PATH=/usr/local/bin:/usr/bin:/bin",
		"LANG=C.UTF-8",
		"TZ=:UTC",
		"AWS_LAMBDA_RUNTIME_API=" + f.addr(),
		"_HANDLER=" + handler,
		"LAMBDA_TASK_ROOT=" + taskRoot,
		"AWS_LAMBDA_FUNCTION_NAME=fn-test",
		"AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
		"AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128",
		"AWS_LAMBDA_LOG_GROUP_NAME=/aws/lambda/fn-test",
		"AWS_LAMBDA_LOG_STREAM_NAME=2026/01/01/[$LATEST]abc",
		"AWS_REGION=us-east-1",
		// The examples' task root is in the repository: keep it clean.
		"PYTHONDONTWRITEBYTECODE=1",
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		w.Close()
		t.Fatalf("starting %v: %v", argv, err)
	}
	w.Close()
	waited := make(chan struct{})
	go func() {
		defer close(waited)
		err := cmd.Wait()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			code = -1
		}
		f.exited <- code
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-waited
	})
}

// startRIC writes the family's support files and the task files to temp
// dirs and starts the real interpreter on InvokeX's RIC.
func startRIC(t *testing.T, family Family, handler string, files map[string]string) *fakeAPI {
	t.Helper()
	rt := detected(t, family)
	taskRoot := t.TempDir()
	writeFiles(t, taskRoot, files)
	return startRICIn(t, rt, handler, taskRoot)
}

func startRICIn(t *testing.T, rt *Runtime, handler, taskRoot string) *fakeAPI {
	t.Helper()
	runtimeDir := t.TempDir()
	if err := os.CopyFS(runtimeDir, SupportFiles(rt.Family)); err != nil {
		t.Fatal(err)
	}
	argv := append([]string(nil), rt.Bootstrap...)
	for i, a := range argv {
		if rest, ok := strings.CutPrefix(a, "/var/runtime/"); ok {
			argv[i] = filepath.Join(runtimeDir, rest)
		}
	}
	f := newFakeAPI(t)
	startProcess(t, f, argv, handler, taskRoot)
	return f
}
