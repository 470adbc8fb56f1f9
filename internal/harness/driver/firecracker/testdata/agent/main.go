// Command agent is the guest init the driver's tests boot: vminit.Main,
// which is what the invokex binary runs as a VM's /sbin/init.
package main

import (
	"os"

	"github.com/invokex/invokex/internal/agent/vminit"
)

func main() {
	if !vminit.IsVMInit() {
		os.Stderr.WriteString("agent: not PID 1 of a VM\n")
		os.Exit(2)
	}
	os.Exit(vminit.Main())
}
