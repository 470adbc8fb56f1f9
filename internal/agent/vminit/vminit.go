// Package vminit is the agent as PID 1 of an InvokeX microVM.
//
// The guest kernel runs /sbin/init (the invokex binary itself) with no
// arguments. Main mounts what a runtime needs, opens the stream to the host
// (the virtio-serial port QEMU attached, or a vsock connection under
// Firecracker), tells the host it is ready and then runs exactly the agent
// of the process sandbox (package agent) on that stream.
// When the agent returns (Shutdown, host gone) it syncs and ends the VM.
//
// # Guest layout
//
//	/            root image, read-only (/dev/vda)
//	/mnt/code    code image, read-only (invokex.code, default /dev/vdb)
//	/var/task    bind of /mnt/code/task, read-only
//	/var/runtime bind of /mnt/code/runtime, read-only
//	/tmp         scratch image, read-write, mode 1777 (invokex.scratch, default /dev/vdc)
//	/dev         devtmpfs; /dev/shm tmpfs
//	/run         tmpfs (the generated /etc/hosts lives here)
//
// # Kernel command line
//
// Parameters with a dot are ignored by the kernel and passed to nobody, so
// Main reads them from /proc/cmdline:
//
//	invokex.code=/dev/vdb      code disk
//	invokex.scratch=/dev/vdc   scratch disk ("tmpfs" for a tmpfs /tmp)
//	invokex.port=invokex.agent name of the virtio-serial port to the host
//	invokex.vsock=PORT         serve the host on this AF_VSOCK port instead
//	invokex.hostname=NAME      hostname (default: the kernel's, "invokex")
//	invokex.clock=UNIX_MS      host wall clock when the VM was launched
//	invokex.agentcpu=1         the VM has a vCPU for the agent: the agent runs on
//	                           the first, the runtime on the others (agent.Options.SplitCPUs)
//	invokex.spare=1            a spare VM: the code disk is mounted on assignment
//	invokex.debug=1            log progress to the console
//
// # Host handshake
//
// After opening the port, Main writes Ready ("INVOKEX-AGENT-READY\n")
// to it. The write blocks until the host has connected to its end, and
// the host must not send anything before it has read that line: data sent
// before the guest opened the port is lost.
//
// A spare VM (invokex.spare=1) is booted before any function needs it.
// Its code disk is a placeholder, so Main mounts everything but the code,
// writes Spare instead of Ready and waits for one protocol.Assignment line
// from the host, which has put the instance's code disk in the
// placeholder's place by then. Main sets the hostname it names, mounts the
// code, and goes on as any VM: Ready, then the agent.
//
// With invokex.vsock=PORT there is no virtio-serial port: Main listens on
// AF_VSOCK PORT (any CID), accepts the host's one connection (under
// Firecracker, what a host "CONNECT PORT" on the hybrid vsock's unix
// socket becomes), stops listening and writes Ready on that connection
// before anything else, so the host's side of the handshake is the same
// on both transports.
package vminit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/agent"
	"github.com/invokex/invokex/internal/protocol"
)

// Ready is the line the agent writes on its port once it serves.
const Ready = "INVOKEX-AGENT-READY\n"

// Spare is the line the init of a spare VM writes on its port once it
// waits for its assignment.
const Spare = "INVOKEX-AGENT-SPARE\n"

// Defaults of the kernel command line parameters.
const (
	DefaultCodeDevice    = "/dev/vdb"
	DefaultScratchDevice = "/dev/vdc"
	DefaultPortName      = "invokex.agent"
)

// portWait bounds the wait for the host to name the agent's port (the
// name arrives on virtio-serial's control queue after the port appears).
const portWait = 10 * time.Second

// IsVMInit reports whether this process is PID 1 of a microVM: run by the
// kernel as init (argv[0] "/sbin/init" or "init"), not the process
// sandbox's init (which is PID 1 of a pid namespace, started as
// "invokex sandbox-init").
func IsVMInit() bool {
	return isVMInit(os.Getpid(), os.Args)
}

func isVMInit(pid int, args []string) bool {
	if pid != 1 || len(args) == 0 {
		return false
	}
	if len(args) > 1 && args[1] == "sandbox-init" {
		return false
	}
	return filepath.Base(args[0]) == "init"
}

// Config is what Main takes from the kernel command line.
type Config struct {
	CodeDevice    string
	ScratchDevice string
	PortName      string
	// VsockPort, if not 0, is the AF_VSOCK port to serve the host on
	// instead of the virtio-serial port PortName.
	VsockPort uint32
	Hostname  string
	// ClockUnixMs is the host's wall clock at launch (0: keep the RTC's).
	ClockUnixMs int64
	// AgentCPU: the VMM added a vCPU for the agent (invokex.agentcpu=1).
	AgentCPU bool
	// Spare: the VM waits for an assignment before it mounts its code
	// (invokex.spare=1).
	Spare bool
	Debug bool
}

// ParseCmdline reads the invokex.* parameters of a kernel command line.
// Unknown parameters are ignored; malformed values are errors.
func ParseCmdline(cmdline string) (Config, error) {
	c := Config{CodeDevice: DefaultCodeDevice, ScratchDevice: DefaultScratchDevice, PortName: DefaultPortName}
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(k, "invokex.") {
			continue
		}
		switch strings.TrimPrefix(k, "invokex.") {
		case "code":
			c.CodeDevice = v
		case "scratch":
			c.ScratchDevice = v
		case "port":
			c.PortName = v
		case "vsock":
			p, err := parseVsockPort(v)
			if err != nil {
				return c, err
			}
			c.VsockPort = p
		case "hostname":
			c.Hostname = v
		case "clock":
			ms, err := strconv.ParseInt(v, 10, 64)
			if err != nil || ms <= 0 {
				return c, fmt.Errorf("invokex.clock=%q: not a unix time in ms", v)
			}
			c.ClockUnixMs = ms
		case "agentcpu":
			c.AgentCPU = v == "1" || v == "true"
		case "spare":
			c.Spare = v == "1" || v == "true"
		case "debug":
			c.Debug = v == "1" || v == "true"
		}
	}
	if !isDevPath(c.CodeDevice) {
		return c, fmt.Errorf("invokex.code=%q: want a /dev path", c.CodeDevice)
	}
	if c.ScratchDevice != "tmpfs" && !isDevPath(c.ScratchDevice) {
		return c, fmt.Errorf("invokex.scratch=%q: want a /dev path or tmpfs", c.ScratchDevice)
	}
	if c.PortName == "" || strings.ContainsAny(c.PortName, "/ ") {
		return c, fmt.Errorf("invokex.port=%q: bad port name", c.PortName)
	}
	if len(c.Hostname) > 64 {
		return c, fmt.Errorf("invokex.hostname: longer than 64 bytes")
	}
	return c, nil
}

func isDevPath(p string) bool {
	return strings.HasPrefix(p, "/dev/") && !strings.Contains(p, "..") && len(p) > len("/dev/")
}

// Main is PID 1 of the guest. It does not return while the VM is healthy:
// after the agent is done it ends the VM (reboot, which QEMU's -no-reboot
// and Firecracker turn into an exit). It returns only if ending the VM
// failed, and the kernel then panics (panic=-1 reboots at once).
func Main() int {
	// The kernel opened /dev/console (the serial console) as stdin,
	// stdout and stderr; every byte there is slow under emulation, so the
	// init logs only warnings unless asked.
	lvl := new(slog.LevelVar)
	lvl.Set(slog.LevelWarn)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	err := run(log, lvl)
	if err != nil {
		log.Error("invokex init failed", "err", err)
	}
	end(log)
	return 1
}

func run(log *slog.Logger, lvl *slog.LevelVar) error {
	start := time.Now()
	if err := mountBase(); err != nil {
		return err
	}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return fmt.Errorf("reading the kernel command line: %w", err)
	}
	cfg, err := ParseCmdline(string(b))
	if err != nil {
		return err
	}
	if cfg.Debug {
		lvl.Set(slog.LevelDebug)
		log.Debug("init started", "uptime", uptime()-time.Since(start))
	}
	if cfg.ClockUnixMs > 0 {
		if err := setClock(cfg.ClockUnixMs); err != nil {
			log.Warn("setting the clock", "err", err)
		}
	}
	if err := setupSystem(cfg, log); err != nil {
		return err
	}
	port, err := openHost(cfg)
	if err != nil {
		return err
	}
	log.Debug("agent port open", "since_init", time.Since(start), "uptime", uptime(), "vsock", cfg.VsockPort)
	if cfg.Spare {
		if err := awaitAssignment(port, cfg, log); err != nil {
			port.Close()
			return err
		}
		log.Debug("assigned", "uptime", uptime())
	}
	// Blocks until the host has connected to its end of the port (a vsock
	// connection is the host's already).
	if _, err := port.Write([]byte(Ready)); err != nil {
		port.Close()
		return fmt.Errorf("writing the handshake: %w", err)
	}
	// Run owns and closes the port. No signal reaches PID 1 unless
	// handled, and nothing in the guest should stop the agent: the host
	// ends it by Shutdown or by closing the stream.
	err = agent.Run(context.Background(), port, agent.Options{
		RuntimeAPIAddr: agent.DefaultRuntimeAPIAddr, Logger: log, OwnsKernel: true, SplitCPUs: cfg.AgentCPU,
	})
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	log.Debug("agent done")
	return nil
}

// awaitAssignment makes a spare VM an instance's: it writes Spare on the
// port (blocking until the host has connected), reads the host's
// protocol.Assignment, sets the hostname and mounts the code disk the host
// has attached by then. A renewal (a spare restored from a template)
// renews the kernel, warms up if asked, and starts over.
func awaitAssignment(port io.ReadWriter, cfg Config, log *slog.Logger) error {
	for {
		if _, err := io.WriteString(port, Spare); err != nil {
			return fmt.Errorf("writing the spare line: %w", err)
		}
		a, err := protocol.ReadAssignment(port)
		if err != nil {
			return err
		}
		if a.Renew == nil {
			if err := unix.Sethostname([]byte(a.Hostname)); err != nil {
				return fmt.Errorf("setting hostname: %w", err)
			}
			if err := writeHosts(); err != nil {
				log.Warn("writing /etc/hosts", "err", err)
			}
			return mountCode(cfg.CodeDevice)
		}
		// Nothing that must be unique may run before the renewal: the
		// warm-up's runtime draws from the reseeded kernel.
		if err := agent.Renew(a.Renew.Restore); err != nil {
			return fmt.Errorf("renewing the restored spare: %w", err)
		}
		if a.Renew.WarmUp {
			began := time.Now()
			if err := warmUp(context.Background(), log); err != nil {
				// Only speed is lost: the cold start translates instead.
				log.Warn("warming up the spare", "err", err)
			}
			log.Debug("spare warmed up", "took", time.Since(began))
		}
	}
}

// openHost opens the stream to the host: the vsock connection the host
// makes when invokex.vsock is set, else the virtio-serial port. The wait
// for the host itself has no deadline on either: a host that never
// connects kills the VM instead.
func openHost(cfg Config) (io.ReadWriteCloser, error) {
	if cfg.VsockPort != 0 {
		return acceptVsock(context.Background(), cfg.VsockPort)
	}
	return openPort(context.Background(), sysVirtioPorts, cfg.PortName, portWait)
}

// end flushes the file systems and ends the VM. With reboot=t (QEMU) or
// reboot=k (Firecracker) a restart resets the machine, which -no-reboot
// and Firecracker turn into the VMM's exit; power-off needs ACPI, which a
// microvm does not have, so it is only the fallback.
func end(log *slog.Logger) {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
		log.Error("restarting the VM", "err", err)
	}
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.Error("powering off the VM", "err", err)
	}
}

// setClock sets the wall clock from the host's launch time plus the time
// this kernel has been up: the guest then runs behind the host by only the
// VMM's own start-up, instead of by up to a second (the RTC's resolution).
func setClock(hostMs int64) error {
	var up unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &up); err != nil {
		return err
	}
	now := time.UnixMilli(hostMs).Add(time.Duration(up.Nano()))
	tv := unix.NsecToTimeval(now.UnixNano())
	return unix.Settimeofday(&tv)
}

// uptime is the time since the kernel started, for boot timing logs.
func uptime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}
