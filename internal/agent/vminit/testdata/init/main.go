// Command init is a stand-in for the invokex binary as a microVM's
// /sbin/init, for tests: it only runs vminit.Main.
package main

import (
	"os"

	"github.com/invokex/invokex/internal/agent/vminit"
)

func main() {
	if !vminit.IsVMInit() {
		os.Stderr.WriteString("init: not PID 1 of a VM\n")
		os.Exit(2)
	}
	os.Exit(vminit.Main())
}
