package agent

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the processes the tests need: a fake Lambda
// runtime speaking the Runtime API with net/http, a few helper processes
// the fake runtime starts, and (pid1_test.go) the agent as PID 1.
const (
	// envRole selects the role: "runtime", "sleeper", "orphan-parent",
	// "short", "agent-pid1".
	envRole = "INVOKEX_AGENT_TEST_RUNTIME"
	// envInitMode is the fake runtime's INIT behaviour: "" (ok), "fail"
	// (post /init/error), "exit" (exit 2), "hang" (never call /next).
	envInitMode = "INVOKEX_FAKE_INIT"
)

func TestMain(m *testing.M) {
	switch os.Getenv(envRole) {
	case "":
		os.Exit(m.Run())
	case "runtime":
		fakeRuntime()
	case "sleeper":
		time.Sleep(time.Hour)
	case "short":
		time.Sleep(100 * time.Millisecond)
	case "orphan-parent":
		// Start a child and exit without waiting: the child is orphaned and
		// its exit must be reaped by PID 1.
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), envRole+"=short")
		if err := cmd.Start(); err != nil {
			os.Exit(1)
		}
	case "agent-pid1":
		os.Exit(agentAsPID1())
	default:
		fmt.Fprintln(os.Stderr, "unknown role", os.Getenv(envRole))
		os.Exit(99)
	}
	os.Exit(0)
}

// action is the event the tests send: what the fake runtime does with it.
type action struct {
	Do   string `json:"do"`
	N    int    `json:"n,omitempty"`
	Path string `json:"path,omitempty"`
}

// rapi is the fake runtime's Runtime API client.
type rapi struct {
	base   string
	client *http.Client
}

func (c *rapi) post(path, errorType string, body []byte) int {
	req, _ := http.NewRequest(http.MethodPost, c.base+path, bytes.NewReader(body))
	if errorType != "" {
		req.Header.Set(hdrErrorType, errorType)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake runtime: post", path, err)
		return 0
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

func (c *rapi) get(path string) (*http.Response, []byte) {
	resp, err := c.client.Get(c.base + path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake runtime: get", path, err)
		os.Exit(11)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}

func (c *rapi) respond(id string, v any) int {
	b, _ := json.Marshal(v)
	return c.post("/2018-06-01/runtime/invocation/"+id+"/response", "", b)
}

func fakeRuntime() {
	c := &rapi{base: "http://" + os.Getenv("AWS_LAMBDA_RUNTIME_API"), client: &http.Client{}}
	fmt.Println("fake-init-stdout pid", os.Getpid())
	fmt.Fprintln(os.Stderr, "fake-init-stderr")
	switch os.Getenv(envInitMode) {
	case "fail":
		c.post("/2018-06-01/runtime/init/error", "Custom.InitBroke", []byte(`{"errorMessage":"init broke","errorType":"Custom.InitBroke"}`))
		os.Exit(1)
	case "exit":
		os.Exit(2)
	case "hang":
		time.Sleep(time.Hour)
	case "restore-hooks", "restore-hook-fails":
		// SnapStart: park in /restore/next; after the restore, say so on
		// stdout (the first invocation's log) and carry on, or fail.
		resp, _ := c.get("/2018-06-01/runtime/restore/next")
		if resp.StatusCode != http.StatusOK {
			os.Exit(11)
		}
		if os.Getenv(envInitMode) == "restore-hook-fails" {
			c.post("/2018-06-01/runtime/restore/error", "Custom.HookBroke", []byte(`{"errorMessage":"hook broke","errorType":"Custom.HookBroke"}`))
			time.Sleep(time.Hour)
		}
		fmt.Println("after-restore hook ran")
	}
	for {
		resp, event := c.get("/2018-06-01/runtime/invocation/next")
		if resp.StatusCode != http.StatusOK {
			fmt.Fprintln(os.Stderr, "fake runtime: next status", resp.StatusCode)
			os.Exit(10)
		}
		id := resp.Header.Get(hdrRequestID)
		var a action
		_ = json.Unmarshal(event, &a)
		handle(c, id, resp.Header, event, a)
	}
}

func handle(c *rapi, id string, h http.Header, event []byte, a action) {
	switch a.Do {
	case "echo":
		c.post("/2018-06-01/runtime/invocation/"+id+"/response", "", event)
	case "error":
		c.post("/2018-06-01/runtime/invocation/"+id+"/error", "BoomError",
			[]byte(`{"errorMessage":"boom","errorType":"BoomError","stackTrace":["at x"]}`))
	case "exit":
		fmt.Println("about to exit")
		os.Exit(3)
	case "respond-exit":
		c.respond(id, "bye")
		os.Exit(4)
	case "sleep":
		fmt.Println("sleeping")
		time.Sleep(time.Hour)
	case "spam":
		w := bufio.NewWriterSize(os.Stdout, 64<<10)
		line := []byte("spam-line-0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijkl\n")
		for written := 0; written < a.N; written += len(line) {
			w.Write(line)
		}
		w.Flush()
		fmt.Println("spam-end")
		c.respond(id, "spammed")
	case "print":
		fmt.Println("out-" + id)
		fmt.Fprintln(os.Stderr, "err-"+id)
		c.respond(id, "printed")
	case "big":
		code := c.post("/2018-06-01/runtime/invocation/"+id+"/response", "", bytes.Repeat([]byte("x"), maxPayload+1))
		fmt.Println("big response status", code)
	case "pid":
		c.respond(id, map[string]int{"pid": os.Getpid()})
	case "headers":
		wd, _ := os.Getwd()
		c.respond(id, map[string]string{
			"deadline":  h.Get(hdrDeadline),
			"arn":       h.Get(hdrFunctionARN),
			"trace":     h.Get(hdrTraceID),
			"context":   h.Get(hdrClientContext),
			"cognito":   h.Get(hdrCognitoIdentity),
			"api":       os.Getenv("AWS_LAMBDA_RUNTIME_API"),
			"user":      os.Getenv("USER_VAR"),
			"wd":        wd,
			"stdinNull": strconv.FormatBool(stdinIsDevNull()),
		})
	case "probe":
		codes := map[string]int{}
		resp, _ := c.get("/2018-06-01/runtime/invocation/next")
		codes["next"] = resp.StatusCode
		codes["wrongID"] = c.post("/2018-06-01/runtime/invocation/not-"+id+"/response", "", []byte(`"x"`))
		codes["initError"] = c.post("/2018-06-01/runtime/init/error", "", []byte(`{}`))
		resp, _ = c.get("/2018-06-01/runtime/nope")
		codes["unknown"] = resp.StatusCode
		c.respond(id, codes)
		codes2 := c.respond(id, "again") // the invocation is over: not current
		fmt.Println("second response status", codes2)
	case "limits":
		var nofile, core unix.Rlimit
		unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile)
		unix.Getrlimit(unix.RLIMIT_CORE, &core)
		adj, _ := readOOMScoreAdj("self")
		parentAdj, _ := readOOMScoreAdj(strconv.Itoa(os.Getppid()))
		c.respond(id, map[string]int64{
			"nofileCur": int64(nofile.Cur), "nofileMax": int64(nofile.Max),
			"coreCur": int64(core.Cur), "coreMax": int64(core.Max),
			"oom": int64(adj), "agentOom": int64(parentAdj), "uid": int64(os.Getuid()), "gid": int64(os.Getgid()),
			"pgid": int64(syscall.Getpgrp()), "pid": int64(os.Getpid()),
		})
	case "waitfile":
		for {
			if _, err := os.Stat(a.Path); err == nil {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		c.respond(id, "file seen")
	case "spawn":
		// A process in its own session: only PID 1's kill(-1) reaches it.
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), envRole+"=sleeper")
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			c.respond(id, err.Error())
			return
		}
		c.respond(id, map[string]int{"pid": cmd.Process.Pid})
	case "orphan":
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), envRole+"=orphan-parent")
		err := cmd.Run()
		c.respond(id, fmt.Sprint(err))
	case "procs":
		c.respond(id, procStates())
	case "alloc":
		// N MiB resident for a moment, returned to the kernel before the
		// response: only a peak that covers the invocation sees it.
		m, err := unix.Mmap(-1, 0, a.N<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			c.respond(id, err.Error())
			return
		}
		for i := 0; i < len(m); i += os.Getpagesize() {
			m[i] = 1
		}
		unix.Munmap(m)
		c.respond(id, "allocated")
	default:
		c.respond(id, "unknown action "+a.Do)
	}
}

// procStates counts the processes visible in /proc by state letter.
func procStates() map[string]int {
	out := map[string]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
			out[s[i+2:i+3]]++
		}
		out["total"]++
	}
	return out
}

func stdinIsDevNull() bool {
	var st, null unix.Stat_t
	if unix.Fstat(0, &st) != nil || unix.Stat(os.DevNull, &null) != nil {
		return false
	}
	return st.Rdev == null.Rdev && st.Ino == null.Ino
}

// readOOMScoreAdj reads /proc/<pid>/oom_score_adj ("self" for the agent).
func readOOMScoreAdj(pid string) (int, error) {
	b, err := os.ReadFile("/proc/" + pid + "/oom_score_adj")
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}
