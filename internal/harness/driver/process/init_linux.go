package process

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/agent"
)

// InitArg is the argument InitCommand runs the binary with; the binary must
// call InitMain when it sees it (the invokex CLI has a hidden command).
const InitArg = "sandbox-init"

const (
	// harnessFD is the sandbox's end of the socketpair.
	harnessFD = 3
	// sandboxNoFile is Lambda's limit of 1,024 file descriptors.
	sandboxNoFile = 1024
	// maxConfigSize bounds the config frame the init accepts.
	maxConfigSize = 64 << 10
)

// The start handshake on the socketpair, before the stream carries
// protocol frames: the driver sends the sandbox's config as one frame (a
// 4-byte big-endian length, then JSON) once the init is in its cgroups;
// the init answers syncReady when the sandbox is built. The init may wait
// for its config for a long time: a warm sandbox (see newWarmPool) is started
// before anyone knows which function it will run.
const (
	// syncReady (init -> driver): the sandbox is built and the agent is
	// about to serve the stream.
	syncReady = 'R'
)

// sandboxConfig is what the init needs to build the sandbox.
type sandboxConfig struct {
	ID          string `json:"id"`
	Hostname    string `json:"hostname"`
	Root        string `json:"root"`
	CodeDir     string `json:"code_dir"`
	RuntimeDir  string `json:"runtime_dir,omitempty"`
	MemoryMB    int    `json:"memory_mb"`
	EphemeralMB int    `json:"ephemeral_mb"`
	// OwnNetwork: the sandbox has its own network namespace: loopback
	// only, or loopback and the link the harness gave it (Options.Network).
	OwnNetwork bool `json:"own_network"`
	// Nameservers, if not nil, are /etc/resolv.conf's (the sandbox's own
	// network's); nil copies the host's file.
	Nameservers []string `json:"nameservers,omitempty"`
	// TmpImage is the ext4 image to mount as /tmp (see tmpdisk_linux.go);
	// "" for a tmpfs of EphemeralMB. TmpStaged: it is the image the init
	// was started with (tmpImageEnv), which it may have mounted already.
	TmpImage  string `json:"tmp_image,omitempty"`
	TmpStaged bool   `json:"tmp_staged,omitempty"`
}

// InitMain is the entry point inside a new sandbox; the binary that
// InitCommand names calls it when run with InitArg and exits with its
// result. It runs as pid 1 of the sandbox's pid namespace and becomes the
// agent: it waits for its config, which the driver sends once it has put
// it into the sandbox's cgroups, builds the root file system, brings up loopback, sets the hostname and
// the rlimits, forbids privilege gain, protects itself from the OOM killer,
// tells the driver it is ready and serves the harness with agent.Run on
// the socketpair until Shutdown, until the stream closes or until SIGTERM.
// As pid 1 the agent also reaps the orphans of the function and can kill
// every process of the sandbox on a reset. When InitMain returns, the
// kernel kills whatever is left in the namespace. The exit status is 0 on a
// clean exit.
func InitMain() int {
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	f := os.NewFile(harnessFD, "harness")
	// A sandbox started with its /tmp image mounts it while it waits for
	// its config. On failure it is mounted again from the config, which
	// then says why.
	stagedTmp := -1
	if image := os.Getenv(tmpImageEnv); image != "" {
		if fd, err := stageTmp(image); err == nil {
			stagedTmp = fd
		}
	}
	cfg, err := readConfig(f)
	if err != nil {
		// The driver went away or gave up before the sandbox was ready.
		log.Error("waiting for the sandbox config", "err", err)
		return 3
	}
	if err := setupSandbox(cfg, stagedTmp); err != nil {
		log.Error("building sandbox", "err", err)
		return 3
	}
	// A net.Conn, unlike a blocking *os.File, lets the agent's Close
	// unblock its own pending read.
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		log.Error("opening harness stream", "err", err)
		return 3
	}
	if _, err := conn.Write([]byte{syncReady}); err != nil {
		log.Error("signalling readiness", "err", err)
		return 3
	}
	// As pid 1, signals from outside the namespace arrive only if handled.
	ctx, stop := signal.NotifyContext(context.Background(), unix.SIGTERM, unix.SIGINT)
	defer stop()
	// In its own network namespace the sandbox owns port 9001 as on
	// Lambda; sharing the host's network, any free port will do.
	addr := "127.0.0.1:9001"
	if !cfg.OwnNetwork {
		addr = "127.0.0.1:0"
	}
	err = agent.Run(ctx, conn, agent.Options{RuntimeAPIAddr: addr, Logger: log})
	if err != nil && ctx.Err() == nil {
		log.Error("agent failed", "err", err)
		return 1
	}
	return 0
}

// readConfig reads the config frame from r (blocking: the init has
// nothing else to do until it arrives).
func readConfig(r io.Reader) (*sandboxConfig, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("reading config length: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || n > maxConfigSize {
		return nil, fmt.Errorf("config of %d bytes (at most %d)", n, maxConfigSize)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	var cfg sandboxConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("decoding config: %w", err)
	}
	return &cfg, nil
}

// encodeConfig is readConfig's frame of cfg.
func encodeConfig(cfg *sandboxConfig) ([]byte, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, fmt.Errorf("encoding sandbox config: %w", err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("sandbox config of %d bytes (at most %d)", len(b), maxConfigSize)
	}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(b)), uint32(len(b)))
	return append(out, b...), nil
}

// setupSandbox prepares the namespaces the init was cloned into.
func setupSandbox(cfg *sandboxConfig, stagedTmp int) error {
	if err := buildRoot(cfg, stagedTmp); err != nil {
		return err
	}
	if cfg.OwnNetwork {
		if err := loopbackUp(); err != nil {
			return err
		}
	}
	if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
		return fmt.Errorf("setting hostname: %w", err)
	}
	// No exec in the sandbox may gain privileges (setuid binaries, file
	// capabilities); setuid() by the root agent stays possible.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	// Lambda's per-environment limits that rlimits express, set here so
	// that everything in the sandbox inherits them: 1,024 descriptors and
	// no core dumps. Lowering limits needs no privilege.
	for res, v := range map[int]uint64{unix.RLIMIT_NOFILE: sandboxNoFile, unix.RLIMIT_CORE: 0} {
		if err := unix.Setrlimit(res, &unix.Rlimit{Cur: v, Max: v}); err != nil {
			return fmt.Errorf("setting rlimit %d: %w", res, err)
		}
	}
	// The agent must survive an OOM in the sandbox so that the harness
	// learns what happened. The runtime's processes carry the highest score
	// (the agent sets it), so the kernel kills them first; lowering the
	// agent's own as well needs CAP_SYS_RESOURCE, which a rootless sandbox
	// (or a host that withholds it) lacks: best effort.
	_ = os.WriteFile("/proc/self/oom_score_adj", []byte("-999"), 0)
	return nil
}

// loopbackUp brings "lo" up in the sandbox's new network namespace.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bringing up loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return fmt.Errorf("bringing up loopback: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing up loopback: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing up loopback: %w", err)
	}
	return nil
}
