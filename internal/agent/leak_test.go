package agent

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/protocol"
)

// agentGoroutines returns the stacks of goroutines running agent code or
// serving its HTTP connections, other than the tests' own.
func agentGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "internal/agent.Test") || strings.Contains(g, "internal/agent.startAgent") ||
			strings.Contains(g, "testing.tRunner") && !strings.Contains(g, "internal/agent.(") {
			continue
		}
		if strings.Contains(g, "internal/agent.") || strings.Contains(g, "net/http.(*conn).serve") {
			found = append(found, g)
		}
	}
	return found
}

// TestRunLeavesNothingBehind is not parallel, so no other agent runs.
func TestRunLeavesNothingBehind(t *testing.T) {
	for _, how := range []string{"shutdown", "close", "timeout-then-close"} {
		t.Run(how, func(t *testing.T) {
			ta := startAgent(t)
			if d, body := ta.init(fakeInit(t, "")); d.Error != nil {
				t.Fatalf("init: %+v %s", d.Error, body)
			}
			pid := decodeJSON[map[string]int](t, ta.invoke(action{Do: "pid"}).payload)["pid"]
			switch how {
			case "shutdown":
				ta.send(protocol.TypeShutdown, protocol.Shutdown{})
				ta.read()
			case "close":
				ta.raw.Close()
			case "timeout-then-close":
				ta.sendInvoke(ta.nextID(), action{Do: "sleep"}, 200*time.Millisecond)
				ta.readResult()
				mustSucceed(t, ta.invoke(action{Do: "echo"}))
				ta.raw.Close()
			}
			if err := ta.wait(); err != nil {
				t.Fatalf("Run = %v", err)
			}
			if !processGone(pid) {
				t.Errorf("runtime pid %d left behind", pid)
			}
			// Connection goroutines finish just after Shutdown closed
			// their connections; wait for that, but never forever.
			var left []string
			for end := time.Now().Add(failsafe); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
				if left = agentGoroutines(); len(left) == 0 {
					return
				}
			}
			t.Errorf("goroutines left after Run returned:\n%s", strings.Join(left, "\n\n"))
		})
	}
}
