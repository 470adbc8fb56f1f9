package bench

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// rieInvokePath is the only route RIE serves: it runs one function.
const rieInvokePath = "/2015-03-31/functions/function/invocations"

// rieTarget starts the AWS Lambda Runtime Interface Emulator on the echo
// function. RIE runs one function in one process: it starts the function
// (lazily, on the first invoke), serves it the Runtime API and forwards
// invocations to it, with no isolation and no concurrency.
type rieTarget struct {
	bin       string // aws-lambda-rie
	bootstrap string // the echo function
	workDir   string // logs
	http      *http.Client
	starts    int
}

// rieProc is one running emulator.
type rieProc struct {
	*child
	iv *invoker
}

// start starts an emulator on free loopback ports and waits until it
// listens. The function itself starts on the first invoke.
func (t *rieTarget) start(ctx context.Context) (*rieProc, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	// RIE's Runtime API defaults to 127.0.0.1:9001; a free port keeps it
	// off anything else listening there.
	apiAddr, err := freePort()
	if err != nil {
		return nil, err
	}
	t.starts++
	argv := []string{t.bin,
		"--runtime-interface-emulator-address", addr,
		"--runtime-api-address", apiAddr,
		t.bootstrap,
	}
	// With AWS_LAMBDA_RUNTIME_API set RIE would not start the runtime
	// itself; AWS_LAMBDA_MAX_CONCURRENCY would switch it to its Managed
	// Instances mode, which is not what the issue compares against.
	env := environWithout("AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_MAX_CONCURRENCY", "_HANDLER", "LAMBDA_TASK_ROOT")
	c, err := startChild("aws-lambda-rie", argv, env, filepath.Dir(t.bootstrap),
		filepath.Join(t.workDir, "rie-"+strconv.Itoa(t.starts)+".log"))
	if err != nil {
		return nil, err
	}
	if err := waitListening(ctx, c, addr, 10*time.Second); err != nil {
		_ = c.stop(2 * time.Second)
		return nil, err
	}
	p := &rieProc{child: c, iv: &invoker{http: t.http, url: "http://" + addr + rieInvokePath}}
	// Open the keep-alive connection now (RIE answers 404 to GET /), so the
	// first invoke's time does not include a TCP handshake: InvokeX's
	// first invoke reuses a connection to its long-running server too.
	if req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/", nil); err == nil {
		if resp, err := t.http.Do(req); err == nil {
			resp.Body.Close()
		}
	}
	return p, nil
}

// functionPID returns the pid of the function process RIE started.
func (p *rieProc) functionPID(fs procFS, comm string) (int, error) {
	procs, err := fs.Procs()
	if err != nil {
		return 0, err
	}
	for _, pr := range Descendants(procs, p.pid()) {
		if pr.Comm == comm {
			return pr.PID, nil
		}
	}
	return 0, fmt.Errorf("no %s process under aws-lambda-rie (pid %d)", comm, p.pid())
}

// initDuration returns the function's init time from the emulator's log.
func (p *rieProc) initDuration() (time.Duration, bool) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return 0, false
	}
	return parseRIEInit(b)
}

var (
	// rapid's own line, logged when the runtime called /next the first
	// time: the real init time.
	rieInitReport = regexp.MustCompile(`INIT REPORT\(durationMs: ([0-9.]+)\)`)
	// The REPORT line's "Init Duration": RIE measures it around an
	// asynchronous call, so it is near zero; used only when rapid's line is
	// missing.
	rieInitDuration = regexp.MustCompile(`Init Duration: ([0-9.]+) ms`)
	// A Go panic in the emulator's log.
	riePanic = regexp.MustCompile(`(?m)^panic: .*$`)
)

// parseRIEInit returns the last init duration in an RIE log.
func parseRIEInit(log []byte) (time.Duration, bool) {
	for _, re := range []*regexp.Regexp{rieInitReport, rieInitDuration} {
		m := re.FindAllSubmatch(log, -1)
		if len(m) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(string(m[len(m)-1][1]), 64)
		if err != nil {
			continue
		}
		return msToDuration(v), true
	}
	return 0, false
}

// panicLine describes the emulator's crash from its log, if it crashed
// with a Go panic: the panic line and the function that panicked.
func (p *rieProc) panicLine() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return ""
	}
	return parsePanic(b)
}

// parsePanic returns "panic: ... (in pkg.Func)" for the first Go panic in
// log, or "".
func parsePanic(log []byte) string {
	loc := riePanic.FindIndex(log)
	if loc == nil {
		return ""
	}
	msg := strings.TrimSpace(string(log[loc[0]:loc[1]]))
	rest := strings.Split(string(log[loc[1]:]), "\n")
	for i, line := range rest {
		if strings.HasPrefix(line, "goroutine ") && i+1 < len(rest) {
			fn := strings.TrimSpace(rest[i+1])
			if j := strings.LastIndexByte(fn, '('); j > 0 && strings.HasSuffix(fn, ")") {
				fn = fn[:j]
			}
			if j := strings.LastIndexByte(fn, '/'); j >= 0 {
				fn = fn[j+1:]
			}
			if fn != "" {
				return msg + " (in " + fn + ")"
			}
			break
		}
	}
	return msg
}
