// Package vmmtest has test helpers for the VM drivers built on package
// vmm: fake images, stand-in binaries, process checks, the build of the
// guest agent, and the suite (RunFakeSuite) every driver runs against its
// stand-in VMM. What cannot be shared stays in each driver's tests: the
// stand-in VMM itself, which must live in the driver's test binary (its
// TestMain runs it when the binary is started under the VMM's name), and
// the environment built with the driver's unexported constructor.
package vmmtest

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/runtimes"
)

// FakeImages is a vmm.Images that makes small image files in Dir and
// records its calls. Safe for concurrent use.
type FakeImages struct {
	Dir string
	// Roots counts Root calls.
	Roots atomic.Int32
	// CodeKeys maps every key Code was called with to its code directory.
	CodeKeys sync.Map
	// Block, if set, makes Root wait for ctx (a slow image build).
	Block bool
}

var _ vmm.Images = (*FakeImages)(nil)

// NewFakeImages returns FakeImages in a temporary directory of t.
func NewFakeImages(t testing.TB) *FakeImages { return &FakeImages{Dir: t.TempDir()} }

// Root writes <Dir>/<runtime>.ext4.
func (f *FakeImages) Root(ctx context.Context, rt *runtimes.Runtime) (string, error) {
	f.Roots.Add(1)
	if f.Block {
		<-ctx.Done()
		return "", ctx.Err()
	}
	p := filepath.Join(f.Dir, rt.ID+".ext4")
	return p, os.WriteFile(p, []byte("root"), 0o644)
}

// Code writes <Dir>/code-<key>.ext4.
func (f *FakeImages) Code(ctx context.Context, codeDir, runtimeDir, key string) (string, error) {
	f.CodeKeys.Store(key, codeDir)
	p := filepath.Join(f.Dir, "code-"+key+".ext4")
	return p, os.WriteFile(p, []byte("code"), 0o644)
}

// Scratch creates a sparse file of sizeMB at path.
func (f *FakeImages) Scratch(ctx context.Context, path string, sizeMB int) error {
	fh, err := os.Create(path)
	if err != nil {
		return err
	}
	defer fh.Close()
	return fh.Truncate(int64(sizeMB) << 20)
}

// Opened returns d, a driver just made (t fails at once on err), and
// closes it when t ends, failing t if Close fails.
func Opened[D driver.Closer](t testing.TB, d D, err error) D {
	t.Helper()
	if err != nil {
		t.Fatalf("making the driver: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d
}

// FakeBinary returns a symlink named name to the test binary, in a
// temporary directory of t: started through it, the binary's TestMain
// sees name as argv[0] and plays that program.
func FakeBinary(t testing.TB, name string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.Symlink(exe, p); err != nil {
		t.Fatal(err)
	}
	return p
}

// PIDAlive reports whether pid runs and is not a zombie.
func PIDAlive(pid int) bool {
	p, err := hostproc.Lookup(pid)
	return err == nil && p.Running()
}

// ProcessesWithArg lists the live pids, other than this process's, with
// one of args as a whole command-line argument.
func ProcessesWithArg(args ...string) []int {
	return vmm.FindProcs(func(pid int) bool {
		for _, a := range vmm.Cmdline(pid) {
			for _, want := range args {
				if a == want {
					return PIDAlive(pid)
				}
			}
		}
		return false
	})
}

// StartSleeper starts a process that is no VMM, killed when t ends.
func StartSleeper(t testing.TB) *exec.Cmd {
	t.Helper()
	c := exec.Command("sleep", "60")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	return c
}

// AssertGone fails t unless the process pid (0: none known) has exited,
// waiting for it a few seconds, and the instance directory stateDir/id
// is gone. what names the VMM in the message.
func AssertGone(t testing.TB, stateDir, id string, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for pid > 0 && PIDAlive(pid) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if pid > 0 && PIDAlive(pid) {
		t.Errorf("%s %d still running", what, pid)
	}
	if _, err := os.Stat(filepath.Join(stateDir, id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("instance directory of %s left: %v", id, err)
	}
}

var agentBuilds struct {
	mu    sync.Mutex
	paths map[string]string // by package
}

// AgentBinary builds pkg (relative to the module root) with
// CGO_ENABLED=0 and the extra go build flags into a temporary directory
// of t, or returns the build of an earlier test or the one the parent
// process named in the environment variable env. It sets env for the
// children this process starts (the conformance suite's crash helper),
// so pkg is built once per run.
func AgentBinary(t testing.TB, pkg, env string, flags ...string) string {
	t.Helper()
	agentBuilds.mu.Lock()
	defer agentBuilds.mu.Unlock()
	for _, p := range []string{agentBuilds.paths[pkg], os.Getenv(env)} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}").Output()
	if err != nil {
		t.Fatalf("locating the module: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "invokex-agent")
	args := append(append([]string{"build"}, flags...), "-o", bin, pkg)
	cmd := exec.Command("go", args...)
	cmd.Dir = strings.TrimSpace(string(out))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the agent: %v\n%s", err, out)
	}
	if agentBuilds.paths == nil {
		agentBuilds.paths = map[string]string{}
	}
	agentBuilds.paths[pkg] = bin
	os.Setenv(env, bin) // inherited by the crash-helper child
	return bin
}

// QEMUGuest returns what a test booting real QEMU VMs needs: QEMU's path,
// package guest's cache and the guest kernel in it. It skips tb, saying
// why, when QEMU is not installed or no kernel is cached; with
// INVOKEX_BUILD_KERNEL=1 it builds the kernel instead (minutes).
func QEMUGuest(tb testing.TB) (qemuPath, cache, kernel string) {
	tb.Helper()
	qemuPath, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		tb.Skip("skipping: qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
	}
	cache = guest.DefaultCacheDir()
	kernel, ok := guest.KernelPath(cache)
	if ok {
		return qemuPath, cache, kernel
	}
	if os.Getenv("INVOKEX_BUILD_KERNEL") != "1" {
		tb.Skipf("skipping: no guest kernel in %s: run `invokex guest kernel` or set INVOKEX_BUILD_KERNEL=1", cache)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	kernel, err = guest.EnsureKernel(ctx, cache, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		tb.Fatalf("building the guest kernel: %v", err)
	}
	return qemuPath, cache, kernel
}
