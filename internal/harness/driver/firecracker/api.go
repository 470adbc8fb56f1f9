package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
)

// apiClient speaks the few requests of Firecracker's API the driver needs
// (src/firecracker/swagger/firecracker.yaml): HTTP/1.1 with JSON bodies
// over the unix socket given to --api-sock. Every request is a PUT (or
// the PATCH of /vm) that Firecracker answers 204 No Content; any other
// status carries an Error body, {"fault_message": "..."}, which becomes
// an *APIError.
//
// It is a small hand-written client rather than firecracker-go-sdk: the
// driver needs a dozen requests, and the SDK brings a generated swagger
// client and its dependencies along (docs/firecracker.md).
type apiClient struct {
	hc *http.Client
}

func newAPIClient(sockPath string) *apiClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return hostproc.DialUnix(ctx, sockPath)
		},
		// One Firecracker serves one client at a time; a kept connection
		// saves a dial per request.
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}
	return &apiClient{hc: &http.Client{Transport: tr}}
}

// Close drops the kept connection.
func (c *apiClient) Close() { c.hc.CloseIdleConnections() }

// Request bodies, as named in the swagger definitions.
type (
	machineConfig struct {
		VCPUCount  int `json:"vcpu_count"`
		MemSizeMiB int `json:"mem_size_mib"`
	}
	bootSource struct {
		KernelImagePath string `json:"kernel_image_path"`
		BootArgs        string `json:"boot_args,omitempty"`
	}
	drive struct {
		DriveID      string `json:"drive_id"`
		PathOnHost   string `json:"path_on_host"`
		IsRootDevice bool   `json:"is_root_device"`
		IsReadOnly   bool   `json:"is_read_only"`
	}
	// partialDrive is PATCH /drives' body (PartialDrive).
	partialDrive struct {
		DriveID    string `json:"drive_id"`
		PathOnHost string `json:"path_on_host"`
	}
	vsockDevice struct {
		GuestCID uint32 `json:"guest_cid"`
		UDSPath  string `json:"uds_path"`
	}
	networkInterface struct {
		IfaceID     string `json:"iface_id"`
		HostDevName string `json:"host_dev_name"`
		GuestMAC    string `json:"guest_mac,omitempty"`
	}
	// loggerConfig is PUT /logger's body (Logger).
	loggerConfig struct {
		LogPath   string `json:"log_path"`
		Level     string `json:"level,omitempty"`
		ShowLevel bool   `json:"show_level"`
	}
	// metricsConfig is PUT /metrics' body (Metrics).
	metricsConfig struct {
		MetricsPath string `json:"metrics_path"`
	}
	entropyDevice  struct{}
	instanceAction struct {
		ActionType string `json:"action_type"`
	}
	// vmState is the body of PATCH /vm (Vm).
	vmState struct {
		State string `json:"state"`
	}
	// snapshotCreate is SnapshotCreateParams. Firecracker creates (or
	// truncates) both files.
	snapshotCreate struct {
		SnapshotType string `json:"snapshot_type"`
		SnapshotPath string `json:"snapshot_path"`
		MemFilePath  string `json:"mem_file_path"`
	}
	// snapshotLoad is SnapshotLoadParams with the memory backend that
	// replaced the deprecated mem_file_path (Firecracker 1.1 and later).
	snapshotLoad struct {
		SnapshotPath string        `json:"snapshot_path"`
		MemBackend   memoryBackend `json:"mem_backend"`
		ResumeVM     bool          `json:"resume_vm"`
	}
	memoryBackend struct {
		BackendType string `json:"backend_type"`
		BackendPath string `json:"backend_path"`
	}
)

// Actions (InstanceActionInfo.action_type).
const (
	actionInstanceStart  = "InstanceStart"
	actionSendCtrlAltDel = "SendCtrlAltDel"
)

// APIError is a request Firecracker refused: an HTTP status other than
// 2xx with the Error body's fault_message. It wraps
// errdefs.ErrInvalidParameter for 400 (Firecracker rejected the
// configuration, e.g. a memory size it cannot give) and
// errdefs.ErrUnavailable for anything else (Firecracker failed).
type APIError struct {
	Method, Path string
	StatusCode   int
	// FaultMessage is Firecracker's explanation ("" if the body had none).
	FaultMessage string
}

func (e *APIError) Error() string {
	msg := e.FaultMessage
	if msg == "" {
		msg = "no fault message"
	}
	return fmt.Sprintf("firecracker %s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), msg)
}

// Unwrap returns the errdefs kind of the refusal.
func (e *APIError) Unwrap() error {
	if e.StatusCode == http.StatusBadRequest {
		return errdefs.ErrInvalidParameter
	}
	return errdefs.ErrUnavailable
}

// maxErrorBody bounds how much of an error answer is read.
const maxErrorBody = 64 << 10

// Values of the snapshot requests.
const (
	vmPaused     = "Paused"
	snapshotFull = "Full"
	backendFile  = "File"
)

// put sends body as JSON to path.
func (c *apiClient) put(ctx context.Context, path string, body any) error {
	return c.send(ctx, http.MethodPut, path, body)
}

// send sends body as JSON to path with method. Transport failures
// (Firecracker gone, socket missing) wrap errdefs.ErrUnavailable.
func (c *apiClient) send(ctx context.Context, method, path string, body any) error {
	b, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("encoding firecracker %s %s: %w", method, path, err)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://localhost"+path, bytes.NewReader(b))
	if err != nil {
		return fmt.Errorf("firecracker %s %s: %w", method, path, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("firecracker %s %s: %w", method, path, context.Cause(ctx))
		}
		return fmt.Errorf("firecracker %s %s: %w: %w", method, path, err, errdefs.ErrUnavailable)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		// Drain so the connection can be kept.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		return nil
	}
	return apiErrorFrom(method, path, resp)
}

func apiErrorFrom(method, path string, resp *http.Response) *APIError {
	e := &APIError{Method: method, Path: path, StatusCode: resp.StatusCode}
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var body struct {
		FaultMessage string `json:"fault_message"`
	}
	if json.Unmarshal(raw, &body) == nil && body.FaultMessage != "" {
		e.FaultMessage = body.FaultMessage
	} else {
		e.FaultMessage = strings.TrimSpace(strings.ToValidUTF8(string(raw), "?"))
	}
	return e
}

// putLogger and putMetrics are accepted once each, before InstanceStart
// or a snapshot load.
func (c *apiClient) putLogger(ctx context.Context, l loggerConfig) error {
	return c.put(ctx, "/logger", l)
}

func (c *apiClient) putMetrics(ctx context.Context, m metricsConfig) error {
	return c.put(ctx, "/metrics", m)
}

func (c *apiClient) putMachineConfig(ctx context.Context, m machineConfig) error {
	return c.put(ctx, "/machine-config", m)
}

func (c *apiClient) putBootSource(ctx context.Context, b bootSource) error {
	return c.put(ctx, "/boot-source", b)
}

func (c *apiClient) putDrive(ctx context.Context, d drive) error {
	return c.put(ctx, "/drives/"+d.DriveID, d)
}

// patchDrive points a running VM's drive id at the file path (PATCH
// /drives/{drive_id}, allowed after InstanceStart): Firecracker opens the
// new file and tells the guest the disk's new size.
func (c *apiClient) patchDrive(ctx context.Context, id, path string) error {
	return c.send(ctx, http.MethodPatch, "/drives/"+id, partialDrive{DriveID: id, PathOnHost: path})
}

func (c *apiClient) putVsock(ctx context.Context, v vsockDevice) error {
	return c.put(ctx, "/vsock", v)
}

func (c *apiClient) putEntropy(ctx context.Context) error {
	return c.put(ctx, "/entropy", entropyDevice{})
}

func (c *apiClient) putNetworkInterface(ctx context.Context, n networkInterface) error {
	return c.put(ctx, "/network-interfaces/"+n.IfaceID, n)
}

func (c *apiClient) action(ctx context.Context, action string) error {
	return c.put(ctx, "/actions", instanceAction{ActionType: action})
}

// pause pauses the running VM's vCPUs (PATCH /vm), which a snapshot needs.
func (c *apiClient) pause(ctx context.Context) error {
	return c.send(ctx, http.MethodPatch, "/vm", vmState{State: vmPaused})
}

func (c *apiClient) createSnapshot(ctx context.Context, s snapshotCreate) error {
	return c.put(ctx, "/snapshot/create", s)
}

// loadSnapshot is only accepted by a Firecracker that has not been
// configured; when it fails, Firecracker exits.
func (c *apiClient) loadSnapshot(ctx context.Context, s snapshotLoad) error {
	return c.put(ctx, "/snapshot/load", s)
}

// isAPIError reports whether err is a refusal by Firecracker (as opposed
// to Firecracker not answering).
func isAPIError(err error) bool {
	var ae *APIError
	return errors.As(err, &ae)
}
