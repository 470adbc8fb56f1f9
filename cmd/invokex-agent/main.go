// Command invokex-agent is the agent alone: the binary each sandbox runs,
// as PID 1 of a microVM (the guest kernel runs it as /sbin/init) or as the
// process sandbox's init ("invokex-agent sandbox-init").
//
// The invokex binary has the same two entry points, but it links the
// whole platform (SQLite, the AWS-shaped HTTP API, Prometheus, the CLI),
// and every instance would pay for that: its package initialisers run and
// its pages are read in every sandbox. This binary links only the agent,
// so an idle instance holds a few MiB and a VM boots reading a third of
// the bytes. The server finds it next to its own executable (see package
// agentbin) and falls back to itself when it is missing.
package main

import (
	"fmt"
	"os"

	"github.com/invokex/invokex/internal/agent/vminit"
	"github.com/invokex/invokex/internal/agentbin"
	"github.com/invokex/invokex/internal/harness/driver/process"
	"github.com/invokex/invokex/internal/protocol"
)

func main() {
	if vminit.IsVMInit() {
		os.Exit(vminit.Main())
	}
	if vminit.IsWarmUpRuntime() {
		// A spare VM's init warms up with this binary as the runtime.
		os.Exit(vminit.WarmUpRuntimeMain())
	}
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case process.InitArg:
			os.Exit(process.InitMain())
		case agentbin.VersionArg:
			fmt.Println(protocol.Version)
			os.Exit(0)
		}
	}
	fmt.Fprintf(os.Stderr, "invokex-agent: run by InvokeX's drivers only (as a VM's init or %q)\n", process.InitArg)
	os.Exit(2)
}
