package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// sandboxPids returns the pids of processes whose command line mentions
// dir (the sandbox init processes carry their state dir in their config).
func processesUnder(dir string) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(string(b), dir) {
			pids = append(pids, pid)
		}
		env, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if strings.Contains(string(env), dir) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func TestServerCrashLeavesNothingBehindAndKeepsData(t *testing.T) {
	dataDir := t.TempDir()
	s := startServer(t, dataDir)
	createProbe(t, s, "survivor")
	for i := 0; i < 3; i++ {
		invoke(t, s, "survivor", map[string]any{"action": "echo"}, false)
	}
	if len(processesUnder(dataDir)) == 0 {
		t.Fatalf("no sandbox process found for data dir %s while an instance is warm; the check below would prove nothing", dataDir)
	}

	s.kill() // SIGKILL: no graceful shutdown runs.
	eventually(t, 30*time.Second, func() error {
		if p := processesUnder(dataDir); len(p) > 0 {
			return fmt.Errorf("sandbox processes outlive the crashed server: %v", p)
		}
		return nil
	})

	// Restart on the same data: the function is still there and runs; the
	// previous server's sandbox state was cleaned at start-up.
	s.start()
	if out := invoke(t, s, "survivor", map[string]any{"action": "echo"}, false); out.FunctionError != nil {
		t.Fatal(string(out.Payload))
	}
	s.stop()
	ents, _ := os.ReadDir(filepath.Join(dataDir, "sandboxes"))
	if len(ents) != 0 {
		t.Errorf("sandbox state left after a graceful stop: %d entries", len(ents))
	}
	if p := processesUnder(dataDir); len(p) > 0 {
		t.Errorf("processes left after a graceful stop: %v", p)
	}
}
