package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/client"
	"github.com/invokex/invokex/internal/server"
)

// example is one bundled example and the runtime it deploys with.
type example struct {
	name, runtime, payload string
}

// examples maps a directory under examples/ to how `up` deploys it.
var examples = map[string]example{
	"hello-go":     {"hello-go", "provided.al2023", `{"name":"InvokeX"}`},
	"hello-python": {"hello-python", "python3.11", `{"name":"InvokeX"}`},
	"hello-node":   {"hello-node", "nodejs20.x", `{"name":"InvokeX"}`},
}

func newUpCmd(g *globals) *cobra.Command {
	var f serverFlags
	var dir string
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start the server, deploy the bundled examples, invoke each once, then keep serving",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithCancel(cmd.Context())
			defer cancel()
			cfg := f.config(g)
			ready := make(chan string, 1)
			cfg.Ready = func(addr string) { ready <- addr }
			done := make(chan error, 1)
			go func() { done <- server.Run(ctx, cfg) }()
			var addr string
			select {
			case addr = <-ready:
			case err := <-done:
				return err
			}
			g.endpoint = "http://" + addr
			if err := deployExamples(ctx, g, dir); err != nil {
				cancel()
				<-done
				return err
			}
			printNext(g, addr)
			return <-done
		},
	}
	f.register(cmd)
	cmd.Flags().StringVar(&dir, "examples", "examples", "directory holding the bundled examples")
	return cmd
}

func deployExamples(ctx context.Context, g *globals, dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("reading examples: %w", err)
	}
	var names []string
	for _, e := range entries {
		if _, ok := examples[e.Name()]; ok && e.IsDir() {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return fmt.Errorf("no examples found in %s", dir)
	}
	runtimes, err := g.client().ListRuntimes(ctx)
	if err != nil {
		return err
	}
	available := map[string]bool{}
	for _, rt := range runtimes {
		available[rt.Id] = rt.Available
	}
	for _, n := range names {
		ex := examples[n]
		rt := ex.runtime
		if !available[rt] {
			rt = sameFamily(runtimes, rt)
		}
		if rt == "" {
			fmt.Fprintf(g.stdout, "skipping %s: no %s runtime on this host (see `invokex runtimes`)\n", n, familyOf(ex.runtime))
			continue
		}
		d := deployOpts{name: ex.name, runtime: rt}
		if err := runDeploy(ctx, g, filepath.Join(dir, n), &d); err != nil {
			return fmt.Errorf("deploying %s: %w", n, err)
		}
		out, err := g.client().Invoke(ctx, ex.name, []byte(ex.payload), "RequestResponse", false)
		if err != nil {
			return fmt.Errorf("invoking %s: %w", n, err)
		}
		status := "ok"
		if out.FunctionError != "" {
			status = "function error"
		}
		fmt.Fprintf(g.stdout, "invoked %s (%s): %s -> %s\n", ex.name, status, ex.payload, strings.TrimSpace(string(out.Payload)))
	}
	return nil
}

// sameFamily returns an available runtime of want's family, or "".
func sameFamily(rts []client.Runtime, want string) string {
	fam := familyOf(want)
	for _, rt := range rts {
		if rt.Available && rt.Family == fam {
			return rt.Id
		}
	}
	return ""
}

func familyOf(id string) string {
	switch {
	case strings.HasPrefix(id, "python"):
		return "python"
	case strings.HasPrefix(id, "nodejs"):
		return "nodejs"
	default:
		return "provided"
	}
}

func printNext(g *globals, addr string) {
	ep := "http://" + addr
	bin := os.Args[0]
	fmt.Fprintf(g.stdout, `
InvokeX is up on %[1]s. Try, in another terminal:
  %[2]s invoke hello-go '{"name":"you"}' --tail
  %[2]s logs hello-go
  %[2]s ls
  %[2]s deploy ./examples/hello-python --name mine --runtime python3.11 --handler app.handler
Any AWS SDK or the aws CLI works with the endpoint %[1]s and any credentials.
Press Ctrl-C to stop (sandboxes are stopped, data stays in the data dir).
`, ep, bin)
}
