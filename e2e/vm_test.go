package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"
	"github.com/aws/aws-sdk-go-v2/service/lambda/types"

	"github.com/invokex/invokex/internal/guest"
)

// vmDrivers are the microVM drivers the VM end-to-end tests run on; each
// skips, saying why, where its VMs cannot run.
var vmDrivers = []struct {
	name    string
	require func(t *testing.T)
}{
	{"qemu", requireVMs},
	{"firecracker", requireFirecracker},
}

// forVMDrivers runs f as a subtest per VM driver, each skipped (saying
// why) where its VMs cannot run.
func forVMDrivers(t *testing.T, f func(t *testing.T, driver string)) {
	for _, d := range vmDrivers {
		t.Run(d.name, func(t *testing.T) {
			d.require(t)
			f(t, d.name)
		})
	}
}

// requireFirecracker skips where Firecracker cannot run: it needs a
// firecracker binary (PATH, or $INVOKEX_FIRECRACKER), a guest kernel and
// KVM that runs a standard guest.
func requireFirecracker(t *testing.T) {
	t.Helper()
	fc := os.Getenv("INVOKEX_FIRECRACKER")
	if fc == "" {
		p, err := exec.LookPath("firecracker")
		if err != nil {
			t.Skip("no firecracker binary (PATH or INVOKEX_FIRECRACKER): see docs/firecracker.md")
		}
		fc = p
	}
	if _, ok := guest.KernelPath(guest.DefaultCacheDir()); !ok {
		t.Skip("no guest kernel in " + guest.DefaultCacheDir() + ": run `invokex guest kernel`")
	}
	if err := kvmRunsGuests(); err != nil {
		t.Skip("KVM cannot run a standard guest here: " + err.Error())
	}
	t.Setenv("PATH", filepath.Dir(fc)+string(os.PathListSeparator)+os.Getenv("PATH")) // the server finds it
}

// requireVMs skips a test that needs QEMU microVMs where they cannot run.
func requireVMs(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not installed (scripts/vm-deps.sh installs it)")
	}
	if _, ok := guest.KernelPath(guest.DefaultCacheDir()); !ok {
		t.Skip("no guest kernel in " + guest.DefaultCacheDir() + ": run `invokex guest kernel`")
	}
	if testing.Short() {
		t.Skip("microVMs under software emulation are slow; skipped with -short")
	}
}

// TestVMDriversThroughSDK runs the core end-to-end path with every
// function in its own microVM: QEMU (TCG here, KVM where the host allows)
// and Firecracker (where KVM and a firecracker binary are).
func TestVMDriversThroughSDK(t *testing.T) {
	forVMDrivers(t, func(t *testing.T, driver string) {
		vmDriverThroughSDK(t, startServer(t, "", "--driver", driver))
	})
}

func vmDriverThroughSDK(t *testing.T, s *server) {
	createProbe(t, s, "vm", func(in *lambda.CreateFunctionInput) { in.Timeout = aws.Int32(5) })

	out := invoke(t, s, "vm", map[string]any{"action": "echo", "marker": "in-a-vm"}, true)
	var echo probeEcho
	if err := json.Unmarshal(out.Payload, &echo); err != nil || echo.Event["marker"] != "in-a-vm" || echo.UID == 0 {
		t.Fatalf("echo in a VM: %s (%v)", out.Payload, err)
	}
	if log := tailLog(t, out); !strings.Contains(log, "Init Duration") {
		t.Errorf("cold VM invoke log lacks Init Duration:\n%s", log)
	}

	// Timeout: the VM is destroyed, the next invoke gets a fresh one.
	out = invoke(t, s, "vm", map[string]any{"action": "sleep", "ms": 20000}, false)
	if aws.ToString(out.FunctionError) != "Unhandled" || !strings.Contains(string(out.Payload), "Task timed out after 5.00 seconds") {
		t.Fatalf("timeout in a VM: %q %s", aws.ToString(out.FunctionError), out.Payload)
	}
	out = invoke(t, s, "vm", map[string]any{"action": "exit", "code": 3}, false)
	if !strings.Contains(string(out.Payload), "Runtime.ExitError") {
		t.Fatalf("crash in a VM: %s", out.Payload)
	}

	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			payload, _ := json.Marshal(map[string]any{"action": "sleep", "ms": 200, "id": i})
			out, err := s.sdk().Invoke(ctxT(t), &lambda.InvokeInput{FunctionName: aws.String("vm"), Payload: payload})
			if err != nil {
				errs <- err
				return
			}
			if !strings.Contains(string(out.Payload), fmt.Sprintf(`"id":%d`, i)) {
				errs <- fmt.Errorf("invoke %d got %s", i, out.Payload)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if _, err := s.sdk().UpdateFunctionCode(ctxT(t), &lambda.UpdateFunctionCodeInput{FunctionName: aws.String("vm"), ZipFile: helloGoZip(t)}); err != nil {
		t.Fatal(err)
	}
	if out := invoke(t, s, "vm", map[string]any{"name": "vm"}, false); !strings.Contains(string(out.Payload), "Hello, vm") {
		t.Fatalf("after code update in a VM: %s", out.Payload)
	}
}

// The interpreted runtimes in VMs: their roots are Debian's packages
// (bookworm's python3.11 and nodejs 18), built once into the guest cache
// (scripts/vm-deps.sh builds them in CI; elsewhere the first deploy does,
// in minutes).
var vmInterpreted = []struct {
	runtime, handler, file, source string
}{
	{"python3.11", "app.handler", "app.py", `import os

def handler(event, context):
    if event.get("fail"):
        raise ValueError("bad " + event["fail"])
    print("python in", os.uname().nodename)
    return {"message": "Hello, %s!" % event.get("name"),
            "remaining": context.get_remaining_time_in_millis(),
            "initType": os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE")}
`},
	{"nodejs18.x", "index.handler", "index.mjs", `import os from "node:os";

export const handler = async (event, context) => {
  if (event.fail) throw new Error("bad " + event.fail);
  console.log("node in", os.hostname());
  return { message: "Hello, " + event.name + "!",
           remaining: context.getRemainingTimeInMillis(),
           initType: process.env.AWS_LAMBDA_INITIALIZATION_TYPE };
};
`},
}

// TestVMInterpretedRuntimesThroughSDK runs python and node functions,
// each in its own microVM, through the AWS SDK: cold and warm invokes,
// the context object, logs, and a handler's exception.
func TestVMInterpretedRuntimesThroughSDK(t *testing.T) {
	forVMDrivers(t, func(t *testing.T, driver string) {
		vmInterpretedThroughSDK(t, startServer(t, "", "--driver", driver))
	})
}

func vmInterpretedThroughSDK(t *testing.T, s *server) {
	for _, rt := range vmInterpreted {
		t.Run(rt.runtime, func(t *testing.T) {
			name := strings.ReplaceAll(rt.runtime, ".", "-")
			_, err := s.sdk().CreateFunction(ctxT(t), &lambda.CreateFunctionInput{
				FunctionName: aws.String(name), Runtime: types.Runtime(rt.runtime), Handler: aws.String(rt.handler),
				Role:    aws.String("arn:aws:iam::000000000000:role/x"),
				Code:    &types.FunctionCode{ZipFile: makeZip(t, map[string][]byte{rt.file: []byte(rt.source)}, nil)},
				Timeout: aws.Int32(30), MemorySize: aws.Int32(256),
			})
			if err != nil {
				t.Fatal(err)
			}
			var reply struct {
				Message   string
				Remaining int
				InitType  string
			}
			for i, want := range []bool{true, false} { // cold, then warm
				out := invoke(t, s, name, map[string]any{"name": "vm"}, true)
				log := tailLog(t, out)
				if out.FunctionError != nil {
					t.Fatalf("invoke %d: %q %s\n%s", i, aws.ToString(out.FunctionError), out.Payload, log)
				}
				if err := json.Unmarshal(out.Payload, &reply); err != nil || reply.Message != "Hello, vm!" ||
					reply.Remaining <= 0 || reply.Remaining > 30000 || reply.InitType != "on-demand" {
					t.Fatalf("invoke %d: %s (%v)", i, out.Payload, err)
				}
				if !strings.Contains(log, " in sandbox-") {
					t.Errorf("invoke %d: the function's output is not in the log:\n%s", i, log)
				}
				if got := strings.Contains(log, "Init Duration"); got != want {
					t.Errorf("invoke %d: Init Duration in the log = %v, want %v:\n%s", i, got, want, log)
				}
			}
			out := invoke(t, s, name, map[string]any{"fail": "input"}, false)
			if aws.ToString(out.FunctionError) != "Unhandled" || !strings.Contains(string(out.Payload), "bad input") {
				t.Fatalf("handler exception: %q %s", aws.ToString(out.FunctionError), out.Payload)
			}
			if out := invoke(t, s, name, map[string]any{"name": "again"}, false); out.FunctionError != nil {
				t.Fatalf("invoke after an exception: %s", out.Payload)
			}
		})
	}
}

// childrenOf returns the pids whose parent is ppid.
func childrenOf(ppid int) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so cut at ")".
		_, rest, ok := strings.Cut(string(b), ") ")
		f := strings.Fields(rest)
		if ok && len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestVMServerCrashLeavesNoVM kills the server with warm VMs: no VMM
// process outlives it, and the restarted server removes what the dead one
// left and runs the function again.
func TestVMServerCrashLeavesNoVM(t *testing.T) {
	forVMDrivers(t, func(t *testing.T, driver string) {
		dataDir := t.TempDir()
		s := startServer(t, dataDir, "--driver", driver)
		createProbe(t, s, "survivor")
		invoke(t, s, "survivor", map[string]any{"action": "echo"}, false)
		vmms := childrenOf(s.cmd.Process.Pid)
		if len(vmms) == 0 {
			t.Fatal("no VMM process under the server while a VM is warm; the check below would prove nothing")
		}

		s.kill() // SIGKILL: no graceful shutdown runs.
		eventually(t, 30*time.Second, func() error {
			for _, pid := range vmms {
				if _, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid))); err == nil {
					return fmt.Errorf("VMM %d outlives the crashed server", pid)
				}
			}
			return nil
		})

		s.start()
		if out := invoke(t, s, "survivor", map[string]any{"action": "echo"}, false); out.FunctionError != nil {
			t.Fatal(string(out.Payload))
		}
		s.stop()
		ents, _ := os.ReadDir(filepath.Join(dataDir, map[string]string{"qemu": "vms", "firecracker": "firecracker"}[driver]))
		if len(ents) != 0 {
			t.Errorf("VM state left after a graceful stop: %d entries", len(ents))
		}
	})
}
