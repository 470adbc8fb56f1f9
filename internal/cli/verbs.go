package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/client"
)

func newInvokeCmd(g *globals) *cobra.Command {
	var file string
	var tail, async, dry bool
	cmd := &cobra.Command{
		Use:   "invoke NAME [PAYLOAD]",
		Short: "Invoke a function; the payload comes from the argument, --file, or stdin",
		Long: `Invoke prints the function's response on stdout. With --tail it also prints
the invocation's log (the last 4 KB, as Lambda's X-Amz-Log-Result) on stderr.
A function error exits with status 2 after printing the error document.`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			payload, err := readPayload(g, args, file)
			if err != nil {
				return err
			}
			typ := "RequestResponse"
			switch {
			case async:
				typ = "Event"
			case dry:
				typ = "DryRun"
			}
			out, err := g.client().Invoke(cmd.Context(), args[0], payload, typ, tail)
			if err != nil {
				return err
			}
			switch out.StatusCode {
			case 202:
				fmt.Fprintf(g.stdout, "queued %s (see: invokex invocation %s)\n", out.RequestID, out.RequestID)
				return nil
			case 204:
				fmt.Fprintln(g.stdout, "dry run: the function can be invoked")
				return nil
			}
			if tail && out.LogResult != "" {
				fmt.Fprint(g.stderr, out.LogResult)
				if !strings.HasSuffix(out.LogResult, "\n") {
					fmt.Fprintln(g.stderr)
				}
			}
			g.stdout.Write(out.Payload)
			if len(out.Payload) > 0 && out.Payload[len(out.Payload)-1] != '\n' {
				fmt.Fprintln(g.stdout)
			}
			if out.FunctionError != "" {
				return &exitError{code: 2, msg: fmt.Sprintf("function error (%s), request %s", out.FunctionError, out.RequestID)}
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "read the payload from this file ('-' for stdin)")
	cmd.Flags().BoolVar(&tail, "tail", false, "print the invocation's log")
	cmd.Flags().BoolVar(&async, "async", false, "invoke asynchronously (InvocationType Event)")
	cmd.Flags().BoolVar(&dry, "dry-run", false, "only check that the function can be invoked (InvocationType DryRun)")
	return cmd
}

// readPayload takes the payload from the argument, --file, or stdin when it
// is not a terminal. No payload is sent as an empty body, as Lambda does.
func readPayload(g *globals, args []string, file string) ([]byte, error) {
	switch {
	case len(args) == 2 && file != "":
		return nil, errors.New("give the payload either as an argument or with --file, not both")
	case len(args) == 2:
		return []byte(args[1]), nil
	case file == "-":
		return io.ReadAll(g.stdin)
	case file != "":
		return os.ReadFile(file)
	}
	if f, ok := g.stdin.(*os.File); ok {
		if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice == 0 {
			return io.ReadAll(f)
		}
	}
	return nil, nil
}

func newLogsCmd(g *globals) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "logs NAME",
		Short: "Print the logs of a function's most recent invocations, oldest first",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			recs, err := g.client().ListInvocations(cmd.Context(), args[0], limit)
			if err != nil {
				return err
			}
			for i := len(recs) - 1; i >= 0; i-- {
				r := recs[i]
				fmt.Fprintf(g.stdout, "--- %s %s %s %s\n", r.Start.Local().Format(time.DateTime), r.RequestId, r.Type, r.Status)
				fmt.Fprint(g.stdout, r.Log)
				if r.Log != "" && !strings.HasSuffix(r.Log, "\n") {
					fmt.Fprintln(g.stdout)
				}
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&limit, "limit", "n", 10, "number of invocations")
	return cmd
}

func newLsCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List functions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fns, err := g.client().ListFunctions(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tRUNTIME\tMEMORY\tTIMEOUT\tSTATE\tCODE\tLAST MODIFIED")
			for _, f := range fns {
				fmt.Fprintf(w, "%s\t%s\t%d MB\t%d s\t%s\t%s\t%s\n", f.FunctionName, f.Runtime, f.MemorySize, f.Timeout, f.State, human(f.CodeSize), f.LastModified)
			}
			return w.Flush()
		},
	}
}

func newRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Delete functions",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, n := range args {
				if err := g.client().DeleteFunction(cmd.Context(), n); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "deleted %s\n", n)
			}
			return nil
		},
	}
}

func newInvocationCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "invocation REQUEST_ID",
		Short: "Show the record of one invocation (sync or async) by request id",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := g.client().GetInvocation(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			printInvocation(g, r)
			return nil
		},
	}
}

func printInvocation(g *globals, r *client.Invocation) {
	w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "RequestId\t%s\nFunction\t%s\nRevision\t%s\nType\t%s\nStatus\t%s\n", r.RequestId, r.Function, r.RevisionId, r.Type, r.Status)
	if r.ErrorType != "" || r.ErrorMessage != "" {
		fmt.Fprintf(w, "Error\t%s %s\n", r.ErrorType, r.ErrorMessage)
	}
	fmt.Fprintf(w, "Attempts\t%d\nCold\t%v\nStart\t%s\nDuration\t%.2f ms\n", r.Attempts, r.Cold, r.Start.Local().Format(time.RFC3339Nano), r.DurationMs)
	if r.Cold {
		fmt.Fprintf(w, "Init Duration\t%.2f ms\n", r.InitDurationMs)
	}
	fmt.Fprintf(w, "Max Memory Used\t%d MB\nLog Bytes\t%d\n", r.MaxMemoryUsedMB, r.LogBytes)
	w.Flush()
	if r.Log != "" {
		fmt.Fprintf(g.stdout, "\n%s", r.Log)
	}
}

func newRuntimesCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "runtimes",
		Short: "List the runtimes DB: which runtimes this server can run",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rts, err := g.client().ListRuntimes(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "RUNTIME\tAVAILABLE\tHANDLER\tNOTE")
			for _, rt := range rts {
				fmt.Fprintf(w, "%s\t%v\t%s\t%s\n", rt.Id, rt.Available, rt.HandlerFormat, rt.Reason)
			}
			return w.Flush()
		},
	}
}
