package cli

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/invokex/invokex/internal/bench"
)

// newBenchCmd is `invokex bench`: InvokeX side by side with the AWS Lambda
// Runtime Interface Emulator, printed as a table and written to
// docs/benchmarks.md. It runs from InvokeX's source tree (it builds the
// echo function there) and as root (the process sandbox).
func newBenchCmd(g *globals) *cobra.Command {
	var (
		opts       bench.Options
		out        string
		rieBin     string
		noInstall  bool
		moduleDir  string
		keepAlive  time.Duration
		serverLogs string
		jsonOut    string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Benchmark InvokeX against the AWS Lambda Runtime Interface Emulator and write docs/benchmarks.md",
		Long: `Builds the echo function, starts InvokeX servers on temporary data directories and
the AWS Lambda Runtime Interface Emulator (installed with go install when missing),
and measures both on the same function binary: warm invoke latency and throughput,
cold starts, memory, and InvokeX's control plane. Prints a table and writes the
results to --out. Run it as root from InvokeX's source tree (make bench).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			self, err := os.Executable()
			if err != nil {
				return fmt.Errorf("finding the invokex binary: %w", err)
			}
			opts.InvokexBin = self
			if moduleDir == "" {
				wd, err := os.Getwd()
				if err != nil {
					return err
				}
				if moduleDir, err = bench.FindModuleDir(wd); err != nil {
					return fmt.Errorf("%w (run from InvokeX's source tree or pass --source)", err)
				}
			}
			opts.ModuleDir = moduleDir
			if rieBin == "" {
				if rieBin, err = bench.FindRIE(ctx, "", !noInstall, g.stderr); err != nil {
					return err
				}
			}
			opts.RIEBin = rieBin
			opts.KeepAliveShort = keepAlive
			opts.ServerLogLevel = serverLogs
			opts.Out = g.stderr
			opts.Logger = g.logger()

			rep, err := bench.Run(ctx, opts)
			if err != nil {
				return err
			}
			if err := rep.WriteText(g.stdout); err != nil {
				return err
			}
			if jsonOut != "" {
				b, err := json.MarshalIndent(rep, "", "  ")
				if err != nil {
					return fmt.Errorf("encoding the report: %w", err)
				}
				if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
					return fmt.Errorf("writing %s: %w", jsonOut, err)
				}
			}
			if !cmd.Flags().Changed("out") && opts.Driver != "process" {
				// Each driver's figures have their own page.
				out = "docs/benchmarks-" + opts.Driver + ".md"
			}
			if out == "" {
				return nil
			}
			if !filepath.IsAbs(out) {
				out = filepath.Join(moduleDir, out)
			}
			prev, err := os.ReadFile(out)
			if err != nil && !os.IsNotExist(err) {
				return fmt.Errorf("reading %s: %w", out, err)
			}
			// The command as it bears on the figures: where the output went
			// and which binaries were found are not part of it.
			command := "invokex bench"
			cmd.Flags().Visit(func(f *pflag.Flag) {
				switch f.Name {
				case "out", "json", "rie", "source", "no-install", "keep-work":
					return
				}
				command += " --" + f.Name + " " + f.Value.String()
			})
			if err := os.WriteFile(out, rep.Markdown(command, prev), 0o644); err != nil {
				return fmt.Errorf("writing %s: %w", out, err)
			}
			fmt.Fprintf(g.stderr, "bench: wrote %s\n", out)
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&opts.Runs, "runs", 2000, "measured invokes per concurrency level")
	f.StringVar(&opts.Driver, "driver", "process", "sandbox driver of the InvokeX servers: process, qemu or firecracker")
	f.IntSliceVar(&opts.Concurrency, "concurrency", []int{1, 8, 64}, "concurrency levels of the warm phase")
	f.IntVar(&opts.ColdStarts, "cold-starts", 50, "cold starts per series")
	f.IntVar(&opts.EventCount, "events", 5000, "Event invokes in the burst")
	f.IntVar(&opts.EventClients, "event-clients", 32, "concurrent clients sending the Event invokes")
	f.IntVar(&opts.UpdateRuns, "updates", 20, "UpdateFunctionCode runs")
	f.IntVar(&opts.MemInstances, "instances", 8, "idle warm instances to measure memory on")
	f.IntVar(&opts.ProfileSeconds, "profile-seconds", 5, "seconds of CPU profile during a warm load (negative: none)")
	f.DurationVar(&keepAlive, "scale-to-zero-keep-alive", time.Second, "keep-alive of the server that measures cold starts after scale to zero")
	f.StringVar(&serverLogs, "server-log-level", "info", "log level of the InvokeX servers under test")
	f.StringVar(&out, "out", "docs/benchmarks.md", "Markdown report to write, relative to the source tree (empty: none); default for a driver other than process: docs/benchmarks-DRIVER.md")
	f.StringVar(&jsonOut, "json", "", "also write the whole report as JSON to this file")
	f.StringVar(&rieBin, "rie", "", "aws-lambda-rie binary (default: on PATH or in GOPATH/bin, else installed with go install)")
	f.BoolVar(&noInstall, "no-install", false, "fail instead of installing aws-lambda-rie when it is missing")
	f.StringVar(&moduleDir, "source", "", "InvokeX source tree (default: found from the working directory)")
	f.BoolVar(&opts.KeepWork, "keep-work", false, "keep the temporary directory (server logs, data dirs)")
	return cmd
}
