package process

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
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
	// configEnv carries the sandboxConfig JSON from the driver to the init.
	configEnv = "INVOKEX_SANDBOX_CONFIG"
	// stageEnv set to "agent" makes InitMain run the agent (see InitMain).
	stageEnv = "INVOKEX_SANDBOX_STAGE"
	// harnessFD is the sandbox's end of the socketpair.
	harnessFD = 3
	// sandboxNoFile is Lambda's limit of 1,024 file descriptors.
	sandboxNoFile = 1024
)

// The start handshake on the socketpair, one byte each way, before the
// stream carries protocol frames.
const (
	// syncGo (driver -> init): the init is in its cgroups, go ahead.
	syncGo = 'G'
	// syncReady (agent -> driver): the sandbox is built and the agent is
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
	// OwnNetwork: the sandbox has its own network namespace (loopback only).
	OwnNetwork bool `json:"own_network"`
}

// InitMain is the entry point inside a new sandbox; the binary that
// InitCommand names calls it when run with InitArg and exits with its
// result. It runs twice, in two processes:
//
// First as the init: pid 1 of the sandbox's pid namespace. It waits until
// the driver has put it into the sandbox's cgroups, builds the root file
// system, brings up loopback, sets the hostname, forbids privilege gain,
// protects itself from the OOM killer and re-executes itself as the agent.
// Then it only reaps: orphans of the function are re-parented to pid 1 and
// would stay zombies otherwise. That is why the agent is a separate process:
// a reaper waiting for any child would steal the exit status of the runtime
// the agent waits for. The init exits with the agent's status, and its exit
// kills every process left in the namespace.
//
// Then as the agent (stageEnv=agent): it tells the driver it is ready and
// serves the harness with agent.Run on the socketpair until Shutdown, until
// the stream closes or until SIGTERM. The exit status is 0 on a clean exit.
func InitMain() int {
	var cfg sandboxConfig
	if err := json.Unmarshal([]byte(os.Getenv(configEnv)), &cfg); err != nil {
		fmt.Fprintf(os.Stderr, "sandbox-init: decoding %s: %v\n", configEnv, err)
		return 2
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if os.Getenv(stageEnv) == "agent" {
		return agentMain(&cfg, log.With("stage", "agent"))
	}
	return initMain(&cfg, log.With("stage", "init"))
}

func initMain(cfg *sandboxConfig, log *slog.Logger) int {
	var b [1]byte
	if n, err := unix.Read(harnessFD, b[:]); n != 1 || b[0] != syncGo {
		// The driver went away or gave up before the sandbox was ready.
		log.Error("waiting for the driver", "err", err, "read", n)
		return 3
	}
	if err := setupSandbox(cfg); err != nil {
		log.Error("building sandbox", "err", err)
		return 3
	}
	agentEnv := []string{
		"PATH=/usr/local/bin:/usr/bin:/bin",
		configEnv + "=" + os.Getenv(configEnv),
		stageEnv + "=agent",
	}
	harness := os.NewFile(harnessFD, "harness")
	// /proc/self/exe still reaches this binary although its file system is
	// no longer mounted here: the link resolves to the open executable.
	proc, err := os.StartProcess("/proc/self/exe", os.Args, &os.ProcAttr{
		Dir:   "/",
		Env:   agentEnv,
		Files: []*os.File{os.Stdin, os.Stderr, os.Stderr, harness},
	})
	harness.Close() // the agent holds the only sandbox end now
	if err != nil {
		log.Error("starting agent", "err", err)
		return 3
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP)
	go func() {
		for range sigs {
			// The agent shuts the runtime down and exits; the reap loop
			// then ends the init.
			_ = proc.Signal(unix.SIGTERM)
		}
	}()
	return reap(proc.Pid)
}

// reap waits for every child until agentPID exits, returning its status.
func reap(agentPID int) int {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 4 // ECHILD: the agent is gone without being seen
		}
		if pid != agentPID {
			continue
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}

// setupSandbox prepares the namespaces the init was cloned into.
func setupSandbox(cfg *sandboxConfig) error {
	if err := buildRoot(cfg); err != nil {
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
	// The init and the agent (which inherits this) must survive an OOM in
	// the sandbox so that the harness learns what happened; the agent sets
	// the runtime's score back to 0. Lowering the score needs
	// CAP_SYS_RESOURCE, which a rootless sandbox (or a host that withholds
	// it; New reports that) lacks: best effort.
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

func agentMain(cfg *sandboxConfig, log *slog.Logger) int {
	f := os.NewFile(harnessFD, "harness")
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
