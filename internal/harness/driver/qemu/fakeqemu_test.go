package qemu

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/driver/vmm/vmmtest"
)

// fakeQEMUName is the name of the symlink to the test binary that makes it
// behave as QEMU (see TestMain): Recover recognises QEMU by its argv[0].
const fakeQEMUName = "qemu-system-x86_64"

func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == fakeQEMUName {
		os.Exit(fakeQEMU(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// fakeQEMUPath returns a symlink named like QEMU to the test binary.
func fakeQEMUPath(t *testing.T) string { return vmmtest.FakeBinary(t, fakeQEMUName) }

// fakeQEMU imitates what the driver needs of QEMU: it opens the kernel and
// the disks, serves QMP on its inherited socket, and on the agent socket
// (inherited too) writes the
// guest's ready line followed by "HELLO" and then echoes. What it does is
// chosen by the instance ID's prefix (from -name invokex-<id>):
//
//	exit-     prints an error and exits 1 at once
//	hang-     never sends the ready line
//	garbage-  sends another line instead
//	stubborn- ignores QMP quit and SIGTERM
//	die-      exits 0 right after the ready line (as a guest that shuts down)
//
// In KVM probe mode (-S -qmp stdio) it fails as an unusable KVM does.
func fakeQEMU(args []string) int {
	opt := func(name string) string {
		for i := 0; i+1 < len(args); i++ {
			if args[i] == name {
				return args[i+1]
			}
		}
		return ""
	}
	if opt("-qmp") == "stdio" {
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69")
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: kvm.c:3183: Assertion failed.")
		return 134
	}
	id := strings.TrimPrefix(opt("-name"), "invokex-")
	mode, _, _ := strings.Cut(id, "-")
	if mode == "exit" {
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: fake failure for", id)
		return 1
	}
	// The kernel and disks must open, as QEMU opens them.
	for i, a := range args {
		var files []string
		switch a {
		case "-kernel":
			files = []string{args[i+1]}
		case "-drive":
			for _, kv := range strings.Split(args[i+1], ",") {
				if f, ok := strings.CutPrefix(kv, "file="); ok {
					files = append(files, f)
				}
			}
		}
		for _, f := range files {
			fh, err := os.Open(f)
			if err != nil {
				fmt.Fprintln(os.Stderr, "qemu-system-x86_64:", a, err)
				return 1
			}
			fh.Close()
		}
	}
	// The sockets are inherited listeners: -chardev socket,id=X,fd=N.
	listeners := map[string]net.Listener{}
	for i, a := range args {
		if a != "-chardev" || !strings.HasPrefix(args[i+1], "socket,") {
			continue
		}
		var id string
		fd := -1
		for _, kv := range strings.Split(args[i+1], ",") {
			if v, ok := strings.CutPrefix(kv, "id="); ok {
				id = v
			}
			if v, ok := strings.CutPrefix(kv, "fd="); ok {
				fd, _ = strconv.Atoi(v)
			}
		}
		l, err := net.FileListener(os.NewFile(uintptr(fd), id))
		if err != nil {
			fmt.Fprintln(os.Stderr, "qemu-system-x86_64: -chardev", id, err)
			return 1
		}
		listeners[id] = l
	}
	agentL, qmpL := listeners["agent"], listeners["qmp"]
	if agentL == nil || qmpL == nil {
		fmt.Fprintln(os.Stderr, "qemu-system-x86_64: agent or qmp chardev missing")
		return 1
	}
	quit := make(chan struct{}, 1)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	go func() {
		for range sigs {
			if mode != "stubborn" {
				quit <- struct{}{}
			}
		}
	}()
	go func() {
		for {
			c, err := qmpL.Accept()
			if err != nil {
				return
			}
			go serveFakeQMP(c, func() bool {
				if mode == "stubborn" {
					return false
				}
				quit <- struct{}{}
				return true
			})
		}
	}()
	fmt.Println("fake console: booted", id) // the serial console
	go func() {
		c, err := agentL.Accept()
		if err != nil {
			return
		}
		switch mode {
		case "hang":
			return
		case "garbage":
			io.WriteString(c, "NOT-READY\n")
			return
		}
		io.WriteString(c, vmm.ReadyLine+"HELLO")
		if mode == "die" {
			// Give the driver time to read the ready line: a VMM that
			// exits while its ready line is unread fails the start.
			time.Sleep(300 * time.Millisecond)
			quit <- struct{}{}
			return
		}
		io.Copy(c, c)
	}()
	select {
	case <-quit:
	case <-time.After(5 * time.Minute):
	}
	return 0
}

// serveFakeQMP speaks QMP on c: greeting, qmp_capabilities, query-status,
// stop/cont, quit (answered only if onQuit returns true); anything else
// is a CommandNotFound error. An event precedes every answer, as QEMU
// may interleave them.
func serveFakeQMP(c net.Conn, onQuit func() bool) {
	defer c.Close()
	enc := json.NewEncoder(c)
	enc.Encode(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{"oob"}}})
	sc := bufio.NewScanner(c)
	negotiated := false
	running := true
	for sc.Scan() {
		var req struct {
			Execute string `json:"execute"`
		}
		if json.Unmarshal(sc.Bytes(), &req) != nil {
			enc.Encode(map[string]any{"error": map[string]string{"class": "GenericError", "desc": "bad json"}})
			continue
		}
		enc.Encode(map[string]any{"event": "FAKE_TICK", "data": map[string]any{}})
		if !negotiated && req.Execute != "qmp_capabilities" {
			enc.Encode(map[string]any{"error": map[string]string{"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
			continue
		}
		switch req.Execute {
		case "qmp_capabilities":
			negotiated = true
			enc.Encode(map[string]any{"return": map[string]any{}})
		case "query-status":
			status := "running"
			if !running {
				status = "paused"
			}
			enc.Encode(map[string]any{"return": map[string]any{"status": status, "running": running, "singlestep": false}})
		case "stop", "cont":
			running = req.Execute == "cont"
			enc.Encode(map[string]any{"return": map[string]any{}})
		case "quit":
			if onQuit() {
				// QEMU may or may not answer before the socket closes.
				return
			}
			enc.Encode(map[string]any{"return": map[string]any{}})
		default:
			enc.Encode(map[string]any{"error": map[string]string{"class": "CommandNotFound", "desc": "The command " + req.Execute + " has not been found"}})
		}
	}
}
