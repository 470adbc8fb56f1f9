// Command probe is a real Lambda function (built with aws-lambda-go, deployed
// as a provided runtime's "bootstrap") that reports on and attacks the
// sandbox it runs in. The driver conformance suite and the end-to-end tests
// invoke it with an event {"action": ..., args} and check what it saw.
//
// Actions:
//
//	echo          the event plus facts: pid, uid, gid, hostname, cwd, env, /var/task listing, CPUs
//	sleep         {ms}: sleep (ignoring the deadline), then answer with the event
//	exit          {code}: os.Exit(code) in the middle of the invocation
//	panic         panic in the handler
//	error         {message}: return an error
//	alloc         {mb}: allocate and touch mb MiB
//	fill-tmp      {mb, name}: write /tmp/<name> until mb MiB or an error
//	forkbomb      {max}: start sleeping children until failure or max, then kill them
//	spam          {bytes}: write that many bytes to stdout
//	print         {lines}: print each line to stdout
//	read-file     {path}: return the file's content
//	write-file    {path, data}: write data to path
//	dial          {addr}: TCP dial with a 1 s timeout
//	random        {n}: n bytes from crypto/rand, hex
//	big-response  {bytes}: a response string of that many bytes
//	daemon        start a sleeping process in its own session, which outlives the runtime
//	ps            the processes the sandbox can see
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aws/aws-lambda-go/lambda"
)

// childArg makes the binary a sleeping child (daemon, and forkbomb as a last
// resort) when /bin/sleep is missing from the sandbox.
const childArg = "probe-sleep-child"

// Event is the probe's input.
type Event struct {
	Action  string   `json:"action"`
	Ms      int      `json:"ms,omitempty"`
	Code    int      `json:"code,omitempty"`
	Message string   `json:"message,omitempty"`
	MB      int      `json:"mb,omitempty"`
	Name    string   `json:"name,omitempty"`
	Max     int      `json:"max,omitempty"`
	Bytes   int      `json:"bytes,omitempty"`
	Lines   []string `json:"lines,omitempty"`
	Path    string   `json:"path,omitempty"`
	Data    string   `json:"data,omitempty"`
	Addr    string   `json:"addr,omitempty"`
	N       int      `json:"n,omitempty"`
}

// Facts is what "echo" reports about the sandbox.
type Facts struct {
	PID      int               `json:"pid"`
	PPID     int               `json:"ppid"`
	UID      int               `json:"uid"`
	GID      int               `json:"gid"`
	Hostname string            `json:"hostname"`
	Cwd      string            `json:"cwd"`
	Env      map[string]string `json:"env"`
	Task     []string          `json:"task"`
	TaskErr  string            `json:"taskErr,omitempty"`
	// CPUs is how many CPUs the runtime may run on (its affinity mask;
	// in a VM, its vCPUs).
	CPUs int `json:"cpus"`
}

// Outcome is the answer of the actions that can fail inside the sandbox: the
// failure is data for the caller, not a function error.
type Outcome struct {
	Bytes int64  `json:"bytes,omitempty"`
	Count int    `json:"count,omitempty"`
	Data  string `json:"data,omitempty"`
	Error string `json:"error,omitempty"`
	PID   int    `json:"pid,omitempty"`
	Procs []Proc `json:"procs,omitempty"`
}

// Proc is one process as "ps" sees it.
type Proc struct {
	PID   int    `json:"pid"`
	Comm  string `json:"comm"`
	State string `json:"state"`
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == childArg {
		time.Sleep(time.Hour)
		return
	}
	lambda.Start(handle)
}

func handle(ctx context.Context, raw json.RawMessage) (any, error) {
	var ev Event
	if err := json.Unmarshal(raw, &ev); err != nil {
		return nil, fmt.Errorf("decoding event: %w", err)
	}
	switch ev.Action {
	case "echo":
		return map[string]any{"event": raw, "facts": facts()}, nil
	case "sleep":
		// Deliberately deaf to ctx: a runaway function, so that it is the
		// platform's timeout that ends it, never a race with the deadline
		// aws-lambda-go puts on ctx.
		time.Sleep(time.Duration(ev.Ms) * time.Millisecond)
		return map[string]any{"event": raw, "slept_ms": ev.Ms}, nil
	case "exit":
		os.Exit(ev.Code)
	case "panic":
		panic("probe: panic requested")
	case "error":
		return nil, errors.New(ev.Message)
	case "alloc":
		return alloc(ev.MB), nil
	case "fill-tmp":
		return fillTmp(ev.Name, ev.MB), nil
	case "forkbomb":
		return forkbomb(ev.Max), nil
	case "spam":
		return spam(ev.Bytes), nil
	case "print":
		for _, l := range ev.Lines {
			fmt.Println(l)
		}
		return Outcome{Count: len(ev.Lines)}, nil
	case "read-file":
		b, err := os.ReadFile(ev.Path)
		return Outcome{Data: string(b), Error: errText(err)}, nil
	case "write-file":
		err := os.WriteFile(ev.Path, []byte(ev.Data), 0o644)
		return Outcome{Error: errText(err)}, nil
	case "dial":
		c, err := net.DialTimeout("tcp", ev.Addr, time.Second)
		if err == nil {
			c.Close()
		}
		return Outcome{Error: errText(err)}, nil
	case "random":
		// ms, if set, holds the environment first (so that concurrent
		// callers get environments of their own).
		time.Sleep(time.Duration(ev.Ms) * time.Millisecond)
		b := make([]byte, ev.N)
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("reading random bytes: %w", err)
		}
		return Outcome{Data: hex.EncodeToString(b)}, nil
	case "big-response":
		return strings.Repeat("x", ev.Bytes), nil
	case "daemon":
		argv := sleeper()
		pid, err := syscall.ForkExec(argv[0], argv,
			&syscall.ProcAttr{Files: []uintptr{}, Sys: &syscall.SysProcAttr{Setsid: true}})
		return Outcome{PID: pid, Error: errText(err)}, nil
	case "ps":
		return ps(), nil
	}
	return nil, fmt.Errorf("unknown action %q", ev.Action)
}

func facts() Facts {
	f := Facts{
		PID:  os.Getpid(),
		PPID: os.Getppid(),
		UID:  os.Getuid(),
		GID:  os.Getgid(),
		Env:  map[string]string{},
		Task: []string{},
		CPUs: runtime.NumCPU(),
	}
	f.Hostname, _ = os.Hostname()
	f.Cwd, _ = os.Getwd()
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		f.Env[k] = v
	}
	ents, err := os.ReadDir("/var/task")
	f.TaskErr = errText(err)
	for _, e := range ents {
		f.Task = append(f.Task, e.Name())
	}
	sort.Strings(f.Task)
	return f
}

// sink keeps allocations reachable so that the memory really stays in use.
var sink [][]byte

func alloc(mb int) Outcome {
	for i := 0; i < mb; i++ {
		b := make([]byte, 1<<20)
		for j := 0; j < len(b); j += 4096 {
			b[j] = 1 // touch every page so it is charged, not just reserved
		}
		sink = append(sink, b)
	}
	return Outcome{Bytes: int64(mb) << 20}
}

func fillTmp(name string, mb int) Outcome {
	if name == "" {
		name = "probe-fill"
	}
	f, err := os.Create("/tmp/" + name)
	if err != nil {
		return Outcome{Error: errText(err)}
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	var n int64
	for i := 0; i < mb; i++ {
		w, err := f.Write(chunk)
		n += int64(w)
		if err != nil {
			return Outcome{Bytes: n, Error: errText(err)}
		}
	}
	if err := f.Sync(); err != nil {
		return Outcome{Bytes: n, Error: errText(err)}
	}
	return Outcome{Bytes: n}
}

// sleeper is the command line of a process that sleeps for an hour:
// /bin/sleep, or else this binary run with childArg (the VMs' tiny provided
// root has no /bin/sleep).
func sleeper() []string {
	if _, err := os.Stat("/bin/sleep"); err == nil {
		return []string{"/bin/sleep", "3600"}
	}
	return []string{"/proc/self/exe", childArg}
}

// forkbomb starts sleeping children until the sandbox refuses or max is
// reached, then kills them all. Each child must cost one task and little
// memory, so that it is the sandbox's task limit that stops the bomb, not
// its memory: /bin/sleep when the sandbox has it, else the pause child
// written to /tmp, and only as a last resort this (multi-threaded) binary.
func forkbomb(max int) Outcome {
	// Pre-create idle OS threads: the Go runtime aborts the whole process
	// when it cannot create a thread it needs, which it may want to do
	// while the pids limit is exhausted.
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			time.Sleep(10 * time.Millisecond)
			runtime.UnlockOSThread()
		}()
	}
	wg.Wait()

	argv := sleeper()
	if argv[0] != "/bin/sleep" {
		if p, err := writePause(); err == nil {
			defer os.Remove(p)
			argv = []string{p}
		}
	}
	// syscall.ForkExec rather than os/exec: an os.Process holds a pidfd,
	// so the descriptor limit would stop the bomb before the process
	// limit does. The children get no descriptors at all.
	var pids []int
	var out Outcome
	for len(pids) < max {
		pid, err := syscall.ForkExec(argv[0], argv, &syscall.ProcAttr{Files: []uintptr{}})
		if err != nil {
			out.Error = errText(err)
			break
		}
		pids = append(pids, pid)
	}
	out.Count = len(pids)
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, pid := range pids {
		var ws syscall.WaitStatus
		syscall.Wait4(pid, &ws, 0, nil)
	}
	return out
}

func ps() Outcome {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return Outcome{Error: errText(err)}
	}
	var out Outcome
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		open, close := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
		if open < 0 || close < open || close+2 >= len(s) {
			continue
		}
		out.Procs = append(out.Procs, Proc{PID: pid, Comm: s[open+1 : close], State: s[close+2 : close+3]})
	}
	return out
}

func spam(n int) Outcome {
	line := []byte(strings.Repeat("s", 1023) + "\n")
	var written int64
	for written < int64(n) {
		b := line
		if rest := int64(n) - written; rest < int64(len(b)) {
			b = b[:rest]
		}
		w, err := os.Stdout.Write(b)
		written += int64(w)
		if err != nil {
			return Outcome{Bytes: written, Error: errText(err)}
		}
	}
	return Outcome{Bytes: written}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
