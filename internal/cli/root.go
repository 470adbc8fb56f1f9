// Package cli is the invokex command line: the server roles and the verbs a
// developer uses against a running server (deploy, invoke, logs, ls, rm).
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/agent/vminit"
	"github.com/invokex/invokex/internal/agentbin"
	"github.com/invokex/invokex/internal/client"
	"github.com/invokex/invokex/internal/harness/driver/process"
	"github.com/invokex/invokex/internal/protocol"
)

// Main runs the command line and returns the process exit code. Errors are
// printed as one line: "invokex: <what went wrong>".
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	// The process sandbox re-executes this binary inside new namespaces; that
	// entry point must not go through flag parsing or logging set-up.
	// A microVM's kernel runs this binary as /sbin/init.
	if vminit.IsVMInit() {
		return vminit.Main()
	}
	if vminit.IsWarmUpRuntime() {
		return vminit.WarmUpRuntimeMain()
	}
	if len(args) > 0 && args[0] == process.InitArg {
		return process.InitMain()
	}
	if len(args) > 0 && args[0] == agentbin.VersionArg {
		fmt.Fprintln(stdout, protocol.Version)
		return 0
	}
	root := newRoot(stdin, stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintf(stderr, "invokex: %s\n", oneLine(err))
		var ee *exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		return 1
	}
	return 0
}

// exitError carries a specific exit code (e.g. 2 for a function error).
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func oneLine(err error) string {
	s := strings.TrimSpace(err.Error())
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

type globals struct {
	endpoint string
	logLevel string
	stdin    io.Reader
	stdout   io.Writer
	stderr   io.Writer
}

func (g *globals) client() *client.Client { return client.New(g.endpoint) }

func (g *globals) logger() *slog.Logger {
	lvl := slog.LevelInfo
	_ = lvl.UnmarshalText([]byte(g.logLevel))
	return slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: lvl}))
}

func newRoot(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdin: stdin, stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:           "invokex",
		Short:         "InvokeX: a self-hosted serverless platform that speaks Lambda's APIs",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	def := os.Getenv("INVOKEX_ENDPOINT")
	if def == "" {
		def = "http://127.0.0.1:9000"
	}
	root.PersistentFlags().StringVar(&g.endpoint, "endpoint", def, "InvokeX server URL (env INVOKEX_ENDPOINT)")
	root.PersistentFlags().StringVar(&g.logLevel, "log-level", "info", "log level of server roles: debug, info, warn, error")
	root.AddCommand(
		newServerCmd(g),
		newUpCmd(g),
		newDeployCmd(g),
		newInvokeCmd(g),
		newLogsCmd(g),
		newLsCmd(g),
		newRmCmd(g),
		newInvocationCmd(g),
		newRuntimesCmd(g),
		newGuestCmd(g),
		newBenchCmd(g),
	)
	return root
}
