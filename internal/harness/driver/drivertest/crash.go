package drivertest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
)

// crashHelperEnv, set to a state directory, turns the test binary into a
// "harness" that starts one instance there, reports it and waits to be
// killed.
const crashHelperEnv = "INVOKEX_DRIVERTEST_CRASH_HELPER"

// crashReportPrefix marks the helper's report line on its stdout.
const crashReportPrefix = "DRIVERTEST-CRASH-HELPER "

type crashReport struct {
	ID  string `json:"id"`
	PID int    `json:"pid"`
}

// runCrashHelper is the child side of RecoverAfterCrash.
func runCrashHelper(t *testing.T, opts Options, newDriver func(*testing.T, string) driver.Driver) {
	t.Run("RecoverAfterCrash", func(t *testing.T) {
		stateDir := os.Getenv(crashHelperEnv)
		d := newDriver(t, stateDir)
		if _, err := d.Recover(context.Background()); err != nil {
			t.Fatalf("Recover: %v", err)
		}
		e := &env{t: t, d: d, stateDir: stateDir, probe: BuildProbe(t), opts: opts}
		spec := e.spec()
		ctx, cancel := context.WithTimeout(context.Background(), opts.StartTimeout)
		defer cancel()
		inst, err := d.Start(ctx, spec)
		if err != nil {
			t.Fatalf("Start: %v", err)
		}
		// A running function makes the crash realistic: the runtime is a
		// process of the sandbox too.
		sb := e.sandbox(t, spec, inst)
		sb.init()
		sb.call(map[string]any{"action": "echo"}, nil)
		rep := crashReport{ID: spec.ID}
		if hp, ok := inst.(HostProcess); ok {
			rep.PID = hp.PID()
		}
		b, _ := json.Marshal(rep)
		fmt.Printf("%s%s\n", crashReportPrefix, b)
		os.Stdout.Sync()
		time.Sleep(10 * time.Minute) // until the parent kills this process
		t.Fatalf("crash helper was not killed")
	})
}

// testRecoverAfterCrash starts a harness child, kills it with SIGKILL (no
// cleanup runs), and checks that Recover on the same state directory
// leaves nothing of its instance.
func (s *suite) testRecoverAfterCrash(t *testing.T) {
	stateDir := t.TempDir()
	var pattern []string
	for _, elem := range strings.Split(s.topName, "/") {
		pattern = append(pattern, "^"+regexp.QuoteMeta(elem)+"$")
	}
	pattern = append(pattern, "^RecoverAfterCrash$")
	cmd := exec.Command(os.Args[0], "-test.run", strings.Join(pattern, "/"), "-test.v", "-test.timeout=5m")
	cmd.Env = append(os.Environ(), crashHelperEnv+"="+stateDir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the harness child: %v", err)
	}
	var killOnce sync.Once
	kill := func() {
		killOnce.Do(func() {
			cmd.Process.Kill()
			cmd.Wait()
		})
	}
	defer kill()

	reports := make(chan crashReport, 1)
	var lines []string
	var linesMu sync.Mutex
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			if rest, ok := strings.CutPrefix(line, crashReportPrefix); ok {
				var r crashReport
				if json.Unmarshal([]byte(rest), &r) == nil {
					reports <- r
				}
				continue
			}
			linesMu.Lock()
			lines = append(lines, line)
			linesMu.Unlock()
		}
		close(reports)
	}()
	var rep crashReport
	select {
	case r, ok := <-reports:
		if !ok {
			kill()
			linesMu.Lock()
			defer linesMu.Unlock()
			t.Fatalf("harness child ended without starting an instance:\n%s\n%s", strings.Join(lines, "\n"), stderr.String())
		}
		rep = r
	case <-time.After(2 * s.opts.StartTimeout):
		t.Fatalf("harness child did not start an instance in time")
	}
	if rep.PID > 0 && !processAlive(rep.PID) {
		t.Fatalf("instance process %d not alive while its harness runs", rep.PID)
	}
	before := leftovers(rep.ID, rep.PID, stateDir)
	kill() // SIGKILL: the harness gets no chance to clean up

	d := s.newDriver(t, stateDir)
	t.Cleanup(func() {
		if c, ok := d.(driver.Closer); ok {
			c.Close(context.Background())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.StopTimeout)
	defer cancel()
	insts, err := d.Recover(ctx)
	if err != nil {
		t.Fatalf("Recover: %v", err)
	}
	// A driver that re-adopts returns the instance; stopping it must then
	// remove it like any other.
	for _, inst := range insts {
		if err := d.Stop(ctx, inst.ID()); err != nil {
			t.Errorf("Stop of re-adopted %s: %v", inst.ID(), err)
		}
	}
	t.Logf("before recovery: %v", before)
	waitNoLeftovers(t, rep.ID, rep.PID, stateDir)
}
