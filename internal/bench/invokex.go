package bench

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/client"
	"github.com/invokex/invokex/internal/harness/driver/process"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/server"
)

// ixServer is an `invokex server` the benchmark started on its own data
// directory and port.
type ixServer struct {
	*child
	endpoint string
	dataDir  string
	http     *http.Client
	sdk      *lambda.Client
	cli      *client.Client
}

// serverArgs are the flags of one server.
type serverArgs struct {
	bin, driver, dataDir, logPath, logLevel string
	keepAlive                               time.Duration
}

// startInvokeX starts a server and waits until /healthz answers.
func startInvokeX(ctx context.Context, a serverArgs, httpc *http.Client) (*ixServer, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	argv := []string{a.bin, "server",
		"--listen", addr,
		"--data-dir", a.dataDir,
		"--driver", a.driver,
		"--keep-alive", a.keepAlive.String(),
		"--log-level", a.logLevel,
	}
	c, err := startChild("invokex server", argv, environWithout("INVOKEX_ENDPOINT"), filepath.Dir(a.dataDir), a.logPath)
	if err != nil {
		return nil, err
	}
	s := &ixServer{
		child:    c,
		endpoint: "http://" + addr,
		dataDir:  a.dataDir,
		http:     httpc,
		sdk: lambda.New(lambda.Options{
			Region:       "us-east-1",
			BaseEndpoint: aws.String("http://" + addr),
			Credentials:  credentials.NewStaticCredentialsProvider("bench", "bench", ""),
			// No retries: a control-plane time must be one request's.
			Retryer:    aws.NopRetryer{},
			HTTPClient: httpc,
		}),
		cli: &client.Client{Endpoint: "http://" + addr, HTTP: httpc},
	}
	deadline := time.Now().Add(60 * time.Second)
	for !s.cli.Healthy(ctx) {
		if !c.alive() {
			return nil, fmt.Errorf("invokex server exited at start: %s", lastLine(c.logTail(4000)))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			_ = c.stop(5 * time.Second)
			return nil, fmt.Errorf("invokex server not healthy after 60s: %s", lastLine(c.logTail(4000)))
		}
		time.Sleep(5 * time.Millisecond)
	}
	return s, nil
}

// invoker returns an invoker for function name.
func (s *ixServer) invoker(name string) *invoker {
	return &invoker{http: s.http, url: s.endpoint + "/2015-03-31/functions/" + url.PathEscape(name) + "/invocations"}
}

// deploy creates function name from zip and waits until it is Active. It
// returns the time from sending CreateFunction to seeing Active. mut, if
// given, adjusts the request (e.g. SnapStart).
func (s *ixServer) deploy(ctx context.Context, name string, zip []byte, mut ...func(*lambda.CreateFunctionInput)) (time.Duration, error) {
	start := time.Now()
	in := &lambda.CreateFunctionInput{
		FunctionName: aws.String(name),
		Runtime:      types.RuntimeProvidedal2023,
		Handler:      aws.String("bootstrap"),
		Role:         aws.String("arn:aws:iam::000000000000:role/bench"),
		Code:         &types.FunctionCode{ZipFile: zip},
		MemorySize:   aws.Int32(128),
		Timeout:      aws.Int32(30),
	}
	for _, m := range mut {
		m(in)
	}
	out, err := s.sdk.CreateFunction(ctx, in)
	if err != nil {
		return 0, fmt.Errorf("creating function %s: %w", name, err)
	}
	if out.State != types.StateActive {
		if err := s.waitActive(ctx, name); err != nil {
			return 0, err
		}
	}
	return time.Since(start), nil
}

// waitActive polls GetFunction until the function is Active and its last
// update succeeded.
func (s *ixServer) waitActive(ctx context.Context, name string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := s.sdk.GetFunction(ctx, &lambda.GetFunctionInput{FunctionName: aws.String(name)})
		if err != nil {
			return fmt.Errorf("getting function %s: %w", name, err)
		}
		cfg := out.Configuration
		switch {
		case cfg.State == types.StateFailed:
			return fmt.Errorf("function %s failed: %s", name, aws.ToString(cfg.StateReason))
		case cfg.LastUpdateStatus == types.LastUpdateStatusFailed:
			return fmt.Errorf("update of function %s failed: %s", name, aws.ToString(cfg.LastUpdateStatusReason))
		case cfg.State == types.StateActive && cfg.LastUpdateStatus != types.LastUpdateStatusInProgress:
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("function %s not active after 60s (state %s)", name, cfg.State)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// updateCode sends UpdateFunctionCode.
func (s *ixServer) updateCode(ctx context.Context, name string, zip []byte) error {
	_, err := s.sdk.UpdateFunctionCode(ctx, &lambda.UpdateFunctionCodeInput{FunctionName: aws.String(name), ZipFile: zip})
	if err != nil {
		return fmt.Errorf("updating code of %s: %w", name, err)
	}
	return nil
}

// remove deletes function name.
func (s *ixServer) remove(ctx context.Context, name string) error {
	if _, err := s.sdk.DeleteFunction(ctx, &lambda.DeleteFunctionInput{FunctionName: aws.String(name)}); err != nil {
		return fmt.Errorf("deleting function %s: %w", name, err)
	}
	return nil
}

// record returns the invocation record of requestID once it is final
// (records are written in batches, so it may take a moment to appear).
func (s *ixServer) record(ctx context.Context, requestID string, timeout time.Duration) (*client.Invocation, error) {
	deadline := time.Now().Add(timeout)
	for {
		rec, err := s.cli.GetInvocation(ctx, requestID)
		if err == nil && rec.Status != "Queued" && rec.Status != "" {
			return rec, nil
		}
		var ae *client.APIError
		if err != nil && !(errors.As(err, &ae) && ae.Status == http.StatusNotFound) {
			return nil, fmt.Errorf("getting record %s: %w", requestID, err)
		}
		if time.Now().After(deadline) {
			if err != nil {
				return nil, fmt.Errorf("record %s not found after %s: %w", requestID, timeout, err)
			}
			return nil, fmt.Errorf("record %s still %s after %s", requestID, rec.Status, timeout)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// instances returns the server's sandbox instances: each direct child of
// the server is an instance's init, with the agent and the function below,
// except sandboxes started ahead of need (see sandboxes).
func (s *ixServer) instances(fs procFS) (map[int][]Proc, error) {
	all, warm, err := s.sandboxes(fs)
	if err != nil {
		return nil, err
	}
	for pid := range warm {
		delete(all, pid)
	}
	return all, nil
}

// sandboxes returns every sandbox subtree of the server, and those of
// them that are started ahead of need, no instance yet: warm sandboxes of
// the process driver, spare VMs of the qemu driver.
func (s *ixServer) sandboxes(fs procFS) (all, warm map[int][]Proc, err error) {
	procs, err := fs.Procs()
	if err != nil {
		return nil, nil, err
	}
	all = Subtrees(procs, s.pid())
	warm = map[int][]Proc{}
	pids, err := process.WarmSandboxPIDs(server.ProcessStateDir(s.dataDir))
	if err != nil {
		return nil, nil, err
	}
	spares, _ := vmm.SparePIDs(server.QEMUStateDir(s.dataDir))
	pids = append(pids, spares...)
	for _, pid := range pids {
		if g, ok := all[pid]; ok {
			warm[pid] = g
		}
	}
	return all, warm, nil
}

// waitInstances waits until the server has exactly n instances.
func (s *ixServer) waitInstances(ctx context.Context, fs procFS, n int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		g, err := s.instances(fs)
		if err != nil {
			return err
		}
		if len(g) == n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("server has %d instances after %s, want %d", len(g), timeout, n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// instanceStarted matches the harness's debug line for a new instance and
// its driver_start duration (Go's time.Duration format).
var instanceStarted = regexp.MustCompile(`msg="instance started".*?driver_start=([0-9.]+[a-zµ]+)`)

// parseDriverStarts returns every driver_start of a server log written at
// debug level: the sandbox driver's share of each cold start.
func parseDriverStarts(log []byte) []time.Duration {
	var out []time.Duration
	for _, m := range instanceStarted.FindAllSubmatch(log, -1) {
		if d, err := time.ParseDuration(string(m[1])); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// driverStarts reads the server's log for driver_start durations.
func (s *ixServer) driverStarts() []time.Duration {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return nil
	}
	return parseDriverStarts(b)
}
