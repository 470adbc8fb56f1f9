package firecracker

import (
	"strconv"
	"strings"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// Names inside the guest, shared with package vminit through the kernel
// command line.
const (
	// guestCID is the guest's vsock context ID; 3 is the first one free
	// (0-2 are reserved) and each VM has its own vsock device, so every
	// VM can use it.
	guestCID = 3
	// agentVsockPort is the AF_VSOCK port the guest's agent listens on
	// (invokex.vsock); it writes vmm.ReadyLine on a stream it accepts.
	agentVsockPort = 1024
)

// Files of a VM, relative to the directory Firecracker sees as its own:
// the instance directory (Firecracker's working directory) or, jailed,
// the chroot.
const (
	apiSock    = "firecracker.sock"
	vsockSock  = "vsock.sock"
	kernelFile = "vmlinux"
	rootImage  = "root.ext4"
	codeImage  = "code.ext4"
	// assignedCode is the code image an assigned spare's code drive is
	// switched to (codeImage is its placeholder).
	assignedCode = "code-assigned.ext4"
	scratchImage = "scratch.ext4"
)

// Drive IDs, in the order the driver adds them: Firecracker makes the root
// device /dev/vda and the others /dev/vdb, /dev/vdc in that order.
const (
	driveRoot    = "root"
	driveCode    = "code"
	driveScratch = "scratch"
)

// bootConfig is what the guest kernel's command line is built from.
type bootConfig struct {
	ID string
	// ClockUnixMs is the host's wall clock just before the boot source is
	// set: the guest sets its clock from it.
	ClockUnixMs int64
	// IP, if set, is the value of the kernel's ip= parameter (the guest's
	// address on its network interface).
	IP string
	// AgentCPU: the VM has a vCPU for the agent (vmm.Host.AgentCPU).
	AgentCPU bool
	// Spare: the VM is a spare (vmm.SpareMachine), its code drive a
	// placeholder until Assign.
	Spare bool
}

// kernelCmdline is the guest's command line. console=ttyS0 puts the
// kernel's and init's messages on Firecracker's stdout (the driver's
// bounded log); reboot=k makes the guest's restart (vminit's way to end
// the VM) a keyboard-controller reset, which Firecracker turns into its
// exit; panic=-1 restarts at once on a panic; pci=off skips probing a bus
// Firecracker does not have. root= and ro are what Firecracker adds for a
// read-only root device too; they are repeated so the line stands alone.
func (c bootConfig) kernelCmdline() string {
	parts := []string{
		"console=ttyS0", "quiet", "reboot=k", "panic=-1", "pci=off",
		"root=/dev/vda", "rootfstype=ext4", "ro", "init=/sbin/init",
		"invokex.code=/dev/vdb", "invokex.scratch=/dev/vdc",
		"invokex.vsock=" + strconv.Itoa(agentVsockPort),
		"invokex.hostname=" + vmm.Hostname(c.ID),
	}
	if c.ClockUnixMs > 0 {
		parts = append(parts, "invokex.clock="+strconv.FormatInt(c.ClockUnixMs, 10))
	}
	if c.IP != "" {
		parts = append(parts, "ip="+c.IP)
	}
	if c.AgentCPU {
		parts = append(parts, "invokex.agentcpu=1")
	}
	if c.Spare {
		parts = append(parts, "invokex.spare=1")
	}
	return strings.Join(parts, " ")
}

// slotString replaces "{slot}" in pattern by the VM's slot number: how
// Options.TapName and Options.GuestIP name one VM's network.
func slotString(pattern string, slot int) string {
	return strings.ReplaceAll(pattern, "{slot}", strconv.Itoa(slot))
}
