package process_test

import (
	"context"
	"os"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/drivertest"
	"github.com/invokex/invokex/internal/harness/driver/hostproc/hostproctest"
	"github.com/invokex/invokex/internal/harness/driver/process"
)

// TestMain makes the test binary the sandbox init, as the invokex CLI's
// hidden command does for the real binary.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == process.InitArg {
		os.Exit(process.InitMain())
	}
	os.Exit(m.Run())
}

func TestDriver(t *testing.T) {
	var opts drivertest.Options
	unsupported := func(name, why string) {
		if opts.Unsupported == nil {
			opts.Unsupported = map[string]string{}
		}
		opts.Unsupported[name] = why
	}
	nm := drivertest.NetworkManager(t, &opts)
	newDriver := func(t *testing.T, stateDir string) driver.Driver {
		d, err := process.New(process.Options{StateDir: stateDir, Logger: hostproctest.Logger(t), Network: nm})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return d
	}
	// A driver that cannot give /tmp a disk (rootless, no loop devices,
	// state in memory) says so, and its /tmp is memory.
	probe := newDriver(t, t.TempDir()).(*process.Driver)
	for _, s := range probe.Describe() {
		if strings.Contains(s, "/tmp is a tmpfs") {
			unsupported("TmpBeyondMemory", s)
		}
	}
	if err := probe.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	drivertest.RunWith(t, opts, newDriver)
}
