package process_test

import (
	"os"
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
	drivertest.Run(t, func(t *testing.T, stateDir string) driver.Driver {
		d, err := process.New(process.Options{StateDir: stateDir, Logger: hostproctest.Logger(t)})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		return d
	})
}
