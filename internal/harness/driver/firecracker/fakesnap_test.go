package firecracker

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
)

// The stand-in Firecracker's snapshots, checked against the API schema
// (swagger: Vm, SnapshotCreateParams, SnapshotLoadParams, MemoryBackend)
// and docs/snapshotting/snapshot-support.md:
//
//   - PATCH /vm {"state": "Paused"|"Resumed"} only once the VM started.
//   - PUT /snapshot/create only while it is paused; Full only (Diff needs
//     dirty page tracking). It writes fakeState to snapshot_path
//     (creating or truncating it) and a memory file of the guest's size
//     whose first line names the VM.
//   - PUT /snapshot/load only on a Firecracker that was sent nothing
//     else, with exactly one of mem_backend and mem_file_path. Like
//     Firecracker it resolves the drive and vsock paths the state file
//     recorded again, in its own working directory (or chroot): every
//     drive must exist there and the vsock socket must not (binding it
//     would fail with "Address in use"). A failed load answers its
//     fault_message and ends the process, as Firecracker does. A loaded
//     VM runs (resume_vm) or stays paused until PATCH /vm Resumed, and
//     serves the vsock again: CONNECT is answered OK, then, its agent
//     being mid-session, an echo without a ready line.

// fakeState is the stand-in's "microVM state file".
type fakeState struct {
	// ID is the VM the snapshot is of.
	ID       string            `json:"id"`
	BootArgs string            `json:"boot_args"`
	Drives   map[string]string `json:"drives"` // drive id -> path_on_host
	UDSPath  string            `json:"uds_path"`
	MemMiB   int               `json:"mem_mib"`
	// Tap is the network interface's host_dev_name, "" without one: a
	// load opens it again, as Firecracker does.
	Tap string `json:"tap,omitempty"`
	// Requests is what the VM was sent up to the snapshot (its own
	// request log goes with its instance directory).
	Requests []loggedRequest `json:"requests"`
}

// fakeMemoryLine starts the stand-in's memory file of VM id.
func fakeMemoryLine(id string) string { return "fake memory of " + id + "\n" }

func init() {
	schema["Vm"] = struct{ fields, required map[string]string }{
		fields: map[string]string{"state": "string"}, required: map[string]string{"state": ""},
	}
	schema["SnapshotCreateParams"] = struct{ fields, required map[string]string }{
		fields:   map[string]string{"mem_file_path": "string", "snapshot_path": "string", "snapshot_type": "string"},
		required: map[string]string{"mem_file_path": "", "snapshot_path": ""},
	}
	schema["SnapshotLoadParams"] = struct{ fields, required map[string]string }{
		fields: map[string]string{
			"snapshot_path": "string", "mem_file_path": "string", "mem_backend": "object",
			"enable_diff_snapshots": "bool", "track_dirty_pages": "bool", "resume_vm": "bool",
			"network_overrides": "array", "vsock_override": "object", "clock_realtime": "bool",
		},
		required: map[string]string{"snapshot_path": ""},
	}
	schema["MemoryBackend"] = struct{ fields, required map[string]string }{
		fields:   map[string]string{"backend_type": "string", "backend_path": "string"},
		required: map[string]string{"backend_type": "", "backend_path": ""},
	}
}

// serveSnapshot answers the snapshot requests; false for any other path.
// v.mu is held.
func (v *fakeVM) serveSnapshot(w http.ResponseWriter, path string, req map[string]any) bool {
	var err error
	switch path {
	case "/vm":
		err = v.patchVM(req)
	case "/snapshot/create":
		err = v.createSnapshot(req)
	case "/snapshot/load":
		if err = v.loadSnapshot(req); err != nil {
			fault(w, 400, "Load snapshot error: %v", err)
			w.(http.Flusher).Flush()
			v.end(1) // Firecracker ends after a failed load
			return true
		}
	default:
		return false
	}
	if err != nil {
		fault(w, 400, "%v", err)
		return true
	}
	w.WriteHeader(http.StatusNoContent)
	return true
}

func (v *fakeVM) patchVM(req map[string]any) error {
	if err := checkSchema("Vm", req); err != nil {
		return err
	}
	if !v.started {
		return fmt.Errorf("The microVM is not running")
	}
	if v.mode == "pausefail" {
		return fmt.Errorf("Failed to pause the microVM: fake failure")
	}
	switch req["state"] {
	case "Paused":
		v.paused = true
	case "Resumed":
		v.paused = false
	default:
		return fmt.Errorf("unknown vm state %v", req["state"])
	}
	return nil
}

func (v *fakeVM) createSnapshot(req map[string]any) error {
	if err := checkSchema("SnapshotCreateParams", req); err != nil {
		return err
	}
	if t, ok := req["snapshot_type"]; ok && t != "Full" {
		return fmt.Errorf("snapshot_type %v: diff snapshots need dirty page tracking", t)
	}
	if !v.started || !v.paused {
		return fmt.Errorf("Cannot create snapshot: the microVM is not paused")
	}
	if v.mode == "snapfail" {
		return fmt.Errorf("Cannot create snapshot: fake failure")
	}
	st := fakeState{ID: v.id, BootArgs: v.bootArgs, Drives: v.paths, UDSPath: v.udsPath, MemMiB: v.memMiB, Tap: v.tap, Requests: v.history}
	if v.restored {
		st.ID = v.from
	}
	b, _ := json.Marshal(st)
	if err := os.WriteFile(v.resolve(req["snapshot_path"].(string)), b, 0o600); err != nil {
		return fmt.Errorf("Cannot create snapshot: %v", err)
	}
	if v.mode == "snapnomem" {
		return nil
	}
	mem := v.resolve(req["mem_file_path"].(string))
	if err := os.WriteFile(mem, []byte(fakeMemoryLine(st.ID)), 0o600); err != nil {
		return fmt.Errorf("Cannot create snapshot: %v", err)
	}
	return os.Truncate(mem, int64(v.memMiB)<<20) // a full copy of guest memory
}

func (v *fakeVM) loadSnapshot(req map[string]any) error {
	if err := checkSchema("SnapshotLoadParams", req); err != nil {
		return err
	}
	if v.started || v.configured {
		return fmt.Errorf("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
	}
	memPath, hasFile := req["mem_file_path"].(string)
	backend, hasBackend := req["mem_backend"].(map[string]any)
	if hasFile == hasBackend {
		return fmt.Errorf("exactly one of mem_file_path and mem_backend is required")
	}
	if hasBackend {
		if err := checkSchema("MemoryBackend", backend); err != nil {
			return err
		}
		if backend["backend_type"] != "File" {
			return fmt.Errorf("backend_type %v: the stand-in loads File backends only", backend["backend_type"])
		}
		memPath = backend["backend_path"].(string)
	}
	if v.mode == "loadfail" {
		return fmt.Errorf("fake failure")
	}
	b, err := os.ReadFile(v.resolve(req["snapshot_path"].(string)))
	if err != nil {
		return fmt.Errorf("Cannot open the snapshot file: %v", err)
	}
	var st fakeState
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("Cannot deserialize the microVM state: %v", err)
	}
	if err := checkFakeMemory(v.resolve(memPath), st); err != nil {
		return fmt.Errorf("Cannot load the guest memory from %s: %v", memPath, err)
	}
	for id, p := range st.Drives {
		if _, err := os.Stat(v.resolve(p)); err != nil {
			return fmt.Errorf("Failed to restore block device %s: %v", id, err)
		}
	}
	if st.Tap != "" {
		if err := v.openTap(st.Tap); err != nil {
			return err
		}
	}
	l, err := listenUnixLong(v.resolve(st.UDSPath))
	if err != nil {
		return fmt.Errorf("VsockUnixBackend: Error binding to host-side Unix socket: %v", err)
	}
	v.started, v.kernel, v.restored = true, true, true
	v.from, v.bootArgs, v.udsPath, v.paths, v.memMiB = st.ID, st.BootArgs, st.UDSPath, st.Drives, st.MemMiB
	v.paused = req["resume_vm"] != true
	go v.serveVsock(l)
	fmt.Println("fake console: restored", v.id, "from", st.ID)
	return nil
}

// checkFakeMemory checks that path is the memory file of st's VM.
func checkFakeMemory(path string, st fakeState) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	line := make([]byte, len(fakeMemoryLine(st.ID)))
	if _, err := io.ReadFull(f, line); err != nil || string(line) != fakeMemoryLine(st.ID) {
		return fmt.Errorf("not the memory of %s: %q %v", st.ID, line, err)
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != int64(st.MemMiB)<<20 {
		return fmt.Errorf("not a full copy of %d MiB: %v", st.MemMiB, err)
	}
	return nil
}

// readFakeState reads the stand-in's state file in a snapshot directory.
func readFakeState(dir string) (fakeState, error) {
	var st fakeState
	b, err := os.ReadFile(filepath.Join(dir, snapState))
	if err == nil {
		err = json.Unmarshal(b, &st)
	}
	return st, err
}
