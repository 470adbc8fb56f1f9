package e2e

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/lambda"

	"github.com/invokex/invokex/internal/guest"
)

// TestQEMUDriverThroughSDK runs the core end-to-end path with every
// function in its own QEMU microVM (TCG here, KVM where the host allows).
func TestQEMUDriverThroughSDK(t *testing.T) {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Skip("qemu-system-x86_64 not installed")
	}
	if _, ok := guest.KernelPath(guest.DefaultCacheDir()); !ok {
		t.Skip("no guest kernel in " + guest.DefaultCacheDir() + ": run `invokex guest kernel`")
	}
	if testing.Short() {
		t.Skip("microVMs under software emulation are slow; skipped with -short")
	}
	s := startServer(t, "", "--driver", "qemu")
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
