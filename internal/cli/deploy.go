package cli

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/invokex/invokex/internal/client"
)

type deployOpts struct {
	name        string
	runtime     string
	handler     string
	description string
	timeout     int
	memory      int
	env         []string
}

func newDeployCmd(g *globals) *cobra.Command {
	var d deployOpts
	cmd := &cobra.Command{
		Use:   "deploy DIR|ZIP --runtime RUNTIME",
		Short: "Create or update a function from a directory or a zip file",
		Long: `Deploy packages DIR as a zip (or uploads ZIP as it is) and creates the function,
or updates its code and configuration if it exists. The name defaults to the
directory's name. For provided.* runtimes, a directory with Go sources and no
bootstrap is built first (GOOS=linux CGO_ENABLED=0 go build -o bootstrap).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDeploy(cmd.Context(), g, args[0], &d)
		},
	}
	cmd.Flags().StringVar(&d.name, "name", "", "function name (default: the directory's name)")
	cmd.Flags().StringVar(&d.runtime, "runtime", "", "runtime identifier, e.g. provided.al2023, python3.11, nodejs20.x (see `invokex runtimes`)")
	cmd.Flags().StringVar(&d.handler, "handler", "", "handler (python: file.function, default app.handler; node: file.export, default index.handler)")
	cmd.Flags().StringVar(&d.description, "description", "", "description")
	cmd.Flags().IntVar(&d.timeout, "timeout", 0, "timeout in seconds (1-900, default 3)")
	cmd.Flags().IntVar(&d.memory, "memory", 0, "memory in MB (128-10240, default 128)")
	cmd.Flags().StringArrayVar(&d.env, "env", nil, "environment variable KEY=VALUE (repeatable)")
	return cmd
}

func runDeploy(ctx context.Context, g *globals, path string, d *deployOpts) error {
	if d.runtime == "" {
		return errors.New("--runtime is required (see `invokex runtimes`)")
	}
	if d.name == "" {
		d.name = strings.TrimSuffix(filepath.Base(filepath.Clean(path)), ".zip")
	}
	if d.handler == "" {
		d.handler = defaultHandler(d.runtime, path)
	}
	env, err := parseEnv(d.env)
	if err != nil {
		return err
	}
	zipData, err := packageCode(ctx, path, d.runtime)
	if err != nil {
		return err
	}
	c := g.client()
	progress := newProgress(g, d.name, int64(len(zipData)))
	cfg, err := c.CreateFunction(ctx, &client.CreateInput{
		FunctionName: d.name, Runtime: d.runtime, Handler: d.handler, Description: d.description,
		Timeout: d.timeout, MemorySize: d.memory, Environment: env,
		Code: struct{ ZipFile []byte }{zipData},
	}, progress.update)
	var apiErr *client.APIError
	if errors.As(err, &apiErr) && apiErr.Type == "ResourceConflictException" {
		cfg, err = updateFunction(ctx, c, d, env, zipData, progress)
	}
	progress.done(err)
	if err != nil {
		return err
	}
	fmt.Fprintf(g.stdout, "deployed %s (%s, %d bytes, sha256 %s, revision %s)\n", cfg.FunctionName, cfg.Runtime, cfg.CodeSize, cfg.CodeSha256, cfg.RevisionId)
	return nil
}

func updateFunction(ctx context.Context, c *client.Client, d *deployOpts, env *client.Env, zipData []byte, p *progress) (*client.FunctionConfiguration, error) {
	in := &client.ConfigInput{Runtime: &d.runtime, Handler: &d.handler}
	if d.description != "" {
		in.Description = &d.description
	}
	if d.timeout != 0 {
		in.Timeout = &d.timeout
	}
	if d.memory != 0 {
		in.MemorySize = &d.memory
	}
	if env != nil {
		in.Environment = env
	}
	// Code first: a new runtime or handler may only fit the new code; if the
	// configuration is then refused, the old configuration still matches
	// the new code's requirements only if the runtime is unchanged, so
	// report the error plainly and let the user retry.
	p.reset()
	if _, err := c.UpdateFunctionCode(ctx, d.name, zipData, p.update); err != nil {
		return nil, err
	}
	return c.UpdateFunctionConfiguration(ctx, d.name, in)
}

func defaultHandler(runtime, path string) string {
	switch familyOf(runtime) {
	case "python":
		return "app.handler"
	case "nodejs":
		return "index.handler"
	}
	return "bootstrap"
}

func parseEnv(kvs []string) (*client.Env, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	env := &client.Env{Variables: map[string]string{}}
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--env %q: want KEY=VALUE", kv)
		}
		env.Variables[k] = v
	}
	return env, nil
}

// packageCode returns the deployment zip for path: the file itself if it is
// a zip, else a deterministic zip of the directory (same content, same
// CodeSha256), after building Go sources for provided runtimes.
func packageCode(ctx context.Context, path, runtime string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return os.ReadFile(path)
	}
	files := map[string]string{} // zip name -> source path
	if familyOf(runtime) == "provided" {
		if _, err := os.Stat(filepath.Join(path, "bootstrap")); errors.Is(err, fs.ErrNotExist) {
			if gos, _ := filepath.Glob(filepath.Join(path, "*.go")); len(gos) > 0 {
				bin, cleanup, err := buildGo(ctx, path)
				if err != nil {
					return nil, err
				}
				defer cleanup()
				files["bootstrap"] = bin
			}
		}
	}
	err = filepath.WalkDir(path, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(path, p)
		if e.IsDir() {
			if e.Name() == ".git" || e.Name() == "node_modules/.cache" || e.Name() == "__pycache__" {
				return filepath.SkipDir
			}
			return nil
		}
		if !e.Type().IsRegular() {
			return nil // links and devices are not packaged
		}
		if _, built := files["bootstrap"]; built && isGoSource(rel) {
			return nil // the built binary replaces its sources
		}
		files[filepath.ToSlash(rel)] = p
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("packaging %s: %w", path, err)
	}
	return zipFiles(files)
}

func zipFiles(files map[string]string) ([]byte, error) {
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, n := range names {
		st, err := os.Stat(files[n])
		if err != nil {
			return nil, err
		}
		h := &zip.FileHeader{Name: n, Method: zip.Deflate, Modified: time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)}
		mode := fs.FileMode(0o644)
		if st.Mode()&0o111 != 0 {
			mode = 0o755
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			return nil, err
		}
		f, err := os.Open(files[n])
		if err != nil {
			return nil, err
		}
		_, err = io.Copy(w, f)
		f.Close()
		if err != nil {
			return nil, err
		}
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// buildGo builds the Go package in dir as a static linux/amd64 bootstrap.
func buildGo(ctx context.Context, dir string) (string, func(), error) {
	tmp, err := os.MkdirTemp("", "invokex-build-")
	if err != nil {
		return "", nil, err
	}
	cleanup := func() { os.RemoveAll(tmp) }
	out := filepath.Join(tmp, "bootstrap")
	abs, err := filepath.Abs(dir)
	if err != nil {
		cleanup()
		return "", nil, err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, ".")
	cmd.Dir = abs
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if msg, err := cmd.CombinedOutput(); err != nil {
		cleanup()
		return "", nil, fmt.Errorf("building %s with go: %v: %s", dir, err, firstLine(string(msg)))
	}
	return out, cleanup, nil
}

func isGoSource(rel string) bool {
	return strings.HasSuffix(rel, ".go") || rel == "go.mod" || rel == "go.sum"
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
