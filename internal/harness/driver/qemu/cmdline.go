package qemu

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/network"
)

// Files in the instance directory. The driver creates all of them (QEMU
// gets descriptors, never paths, so it needs no access to the directory).
const (
	// agentSock and qmpSock are listening sockets QEMU serves.
	agentSock = "agent.sock"
	qmpSock   = "qmp.sock"
	// scratchImage is the instance's writable /tmp.
	scratchImage = "scratch.img"
	// ramImage holds the RAM of a VM that will be snapshotted.
	ramImage = "ram.img"
)

// Descriptors QEMU inherits (cmd.ExtraFiles starts at 3), in this order.
const (
	fdAgent = 3 + iota
	fdQMP
	fdKernel
	fdRoot
	fdCode
	fdScratch
)

// agentPort is the virtio-serial port the agent speaks on, named to
// package vminit on the kernel command line; the agent writes
// vmm.ReadyLine on it when it is about to serve.
const agentPort = "invokex.agent"

// accel is how QEMU runs guest code.
type accel string

const (
	accelKVM accel = "kvm"
	accelTCG accel = "tcg"
)

// vmConfig is everything the QEMU command line is built from. The kernel
// and the disks are the descriptors fdKernel ... fdScratch, the sockets
// fdAgent and fdQMP.
type vmConfig struct {
	ID       string
	Accel    accel
	MemoryMB int
	VCPUs    int
	// AgentCPU: one of VCPUs is the agent's (vmm.Host.AgentCPU).
	AgentCPU bool
	// TSCkHz is the host's TSC frequency, 0 if unknown. Under TCG the
	// guest's TSC runs at the host's rate; telling the guest skips the
	// calibration against the PIT, which is slow and, under emulation,
	// flaky (boots hung without it).
	TSCkHz int64
	// KernelHz is the guest kernel's CONFIG_HZ, for lpj.
	KernelHz int
	// TCGCacheMB is TCG's translated-code cache (Options.TCGCacheMB);
	// 0: DefaultTCGCacheMB.
	TCGCacheMB int `json:",omitempty"`
	// ClockUnixMs is the host's wall clock at launch: the guest sets its
	// clock from it (the RTC has only whole seconds), so deadlines the
	// harness computes hold inside to the millisecond.
	ClockUnixMs int64
	// Network gives the guest a NIC: on a tap in a namespace of the VM's
	// own (Tap; package network) or, without, on QEMU's user-mode network
	// (see guestNet); without Network the guest has loopback only.
	Network bool
	Tap     bool   `json:",omitempty"`
	TapFD   int    `json:"-"`
	DNS     string `json:",omitempty"`
	// Spare boots a spare VM (vmm.SpareMachine): its code disk is a
	// placeholder of vmm.SpareCodeBytes (no descriptor) until assignment.
	Spare bool `json:",omitempty"`
	// Incoming starts QEMU waiting for a migration stream (a snapshot to
	// restore) instead of running the guest: "-incoming defer", then QMP
	// migrate-incoming from fdState.
	Incoming bool `json:"-"`
	// RAMFile keeps guest RAM in a file (descriptor RAMFD): shared with
	// the file in a VM that will be snapshotted (the snapshot then needs
	// no copy of RAM), mapped privately in a VM restored from such a
	// snapshot (its pages are read from the file as the guest touches
	// them and shared, in the page cache, by every restore of it).
	RAMFile bool
	RAMFD   int  `json:"-"`
	RAMCopy bool `json:"-"` // private (restore) rather than shared
}

// fdState is the descriptor of a snapshot's state file a restoring QEMU
// inherits, after the disks.
const fdState = fdScratch + 1

// The guest's address plan on QEMU's user-mode network (slirp). QEMU
// answers as the gateway and the DNS server itself and turns the guest's
// connections into connections of the QEMU process on the host: outbound
// only, nothing on the host can connect in. Every VM has its own private
// copy of this network, so one VM cannot reach another.
const (
	guestNetIP      = "10.0.2.15"
	guestNetGateway = "10.0.2.2"
	guestNetMask    = "255.255.255.0"
	guestNetDNS     = "10.0.2.3"
)

// guestNetParam is the kernel's ip= parameter (CONFIG_IP_PNP): eth0 is
// configured statically before init runs, no DHCP client needed, and
// /proc/net/pnp (the images' resolv.conf) names the DNS server.
func guestNetParam() string {
	// ip=client:server:gateway:netmask:hostname:device:autoconf:dns0
	return "ip=" + guestNetIP + "::" + guestNetGateway + ":" + guestNetMask + "::eth0:off:" + guestNetDNS
}

// kernelCmdline is the guest's kernel command line. The tuning follows
// what was measured under TCG (docs in shared/reference/qemu-tcg.md):
// quiet, no keyboard controller probing, the TSC trusted and its rate
// given, no APIC timer calibration.
func (c vmConfig) kernelCmdline() string {
	parts := []string{
		"console=ttyS0", "quiet", "panic=-1", "reboot=t",
		"i8042.noaux", "i8042.nokbd", "i8042.nopnp", "i8042.dumbkbd",
		"tsc=reliable", "no_timer_check",
	}
	if c.Accel == accelTCG {
		hz := c.KernelHz
		if hz <= 0 {
			hz = defaultKernelHz
		}
		if c.TSCkHz > 0 {
			parts = append(parts,
				"lpj="+strconv.FormatInt(c.TSCkHz*1000/int64(hz), 10),
				"tsc_early_khz="+strconv.FormatInt(c.TSCkHz, 10))
		}
		// There is no TSC-deadline timer under TCG, and calibrating the
		// APIC timer against the PIT costs ~0.2 s of boot; QEMU's APIC
		// timer counts at 1 GHz, so the guest is told its rate instead
		// (guest/kernel/lapic-timer-period.patch). Without a working APIC
		// timer (nolapic_timer) the guest cannot stop an idle vCPU's tick.
		parts = append(parts, "lapic_timer_period="+strconv.Itoa(apicTimerHz/hz))
		// Timers at the tick's resolution: with high-resolution timers
		// every short sleep of the runtimes (Go's scheduler sleeps 20 µs
		// at a time) is an emulated APIC interrupt of its own, and warm
		// invocations ran at half the rate in A/B runs.
		parts = append(parts, "highres=off")
	}
	parts = append(parts,
		"root=/dev/vda", "rootfstype=ext4", "ro", "init=/sbin/init",
		// QEMU's virtio-mmio offers 1,024-slot queues and virtio-blk
		// preallocates a request per slot; a microVM's disks need few.
		"virtio_blk.queue_depth=64",
		"invokex.code=/dev/vdb", "invokex.scratch=/dev/vdc", "invokex.port="+agentPort,
		"invokex.hostname="+vmm.Hostname(c.ID),
	)
	if c.ClockUnixMs > 0 {
		parts = append(parts, "invokex.clock="+strconv.FormatInt(c.ClockUnixMs, 10))
	}
	if c.Network && c.Tap {
		parts = append(parts, "ip="+network.KernelIP(c.DNS))
	} else if c.Network {
		parts = append(parts, guestNetParam())
	}
	if c.AgentCPU {
		parts = append(parts, "invokex.agentcpu=1")
	}
	if c.Spare {
		parts = append(parts, "invokex.spare=1")
	}
	return strings.Join(parts, " ")
}

// defaultKernelHz is CONFIG_HZ's default.
const defaultKernelHz = 250

// apicTimerHz is the rate of QEMU's emulated local APIC timer under TCG
// (its counter advances once per nanosecond of the virtual clock, before
// the divider the guest programs).
const apicTimerHz = 1_000_000_000

// fdPath names an inherited descriptor as a file QEMU can open: opening
// the magic link re-opens the file without walking its real path, so QEMU
// needs no permission on the directories above it (the harness's state
// and cache directories), only on the file itself.
func fdPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// args is QEMU's command line (without argv[0]).
func (c vmConfig) args() []string {
	cpu := "max"
	if c.Accel == accelKVM {
		cpu = "host"
	}
	machine := "microvm,x-option-roms=off,rtc=on,isa-serial=on,acpi=off"
	if c.RAMFile {
		machine += ",memory-backend=ram"
	}
	a := []string{
		// The ID makes the process findable (ps, leftover checks).
		"-name", vmName(c.ID),
		"-M", machine,
		"-accel", c.accelArg(),
		"-cpu", cpu,
		"-m", strconv.Itoa(c.MemoryMB) + "M",
		"-smp", strconv.Itoa(c.VCPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		// QEMU runs as the harness's user (root): deny it what a VMM
		// never needs, in case a guest escapes into it.
		"-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
		"-kernel", fdPath(fdKernel),
		"-append", c.kernelCmdline(),
		// The order of the virtio-mmio devices is the order of vda, vdb, vdc.
		"-drive", "id=root,file=" + fdPath(fdRoot) + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
		// The code disk is a raw node over a file node, so a spare's
		// placeholder can be swapped for the code image (attachCode).
		"-blockdev", c.codeFile(),
		"-blockdev", "driver=raw,node-name=" + codeNode + ",file=" + codeFileNode + ",read-only=on",
		"-device", "virtio-blk-device,drive=" + codeNode,
		// The scratch disk dies with the instance: never flush it.
		"-drive", "id=scratch,file=" + fdPath(fdScratch) + ",format=raw,if=none,cache=unsafe",
		"-device", "virtio-blk-device,drive=scratch",
		"-device", "virtio-rng-device",
		"-device", c.balloon(),
	}
	if c.Network && c.Tap {
		a = append(a,
			"-netdev", "tap,id=net,fd="+strconv.Itoa(c.TapFD),
			"-device", "virtio-net-device,netdev=net,mac="+network.GuestMAC())
	} else if c.Network {
		a = append(a,
			"-netdev", "user,id=net,ipv6=off,net="+guestNetIP+"/24,host="+guestNetGateway+",dns="+guestNetDNS,
			"-device", "virtio-net-device,netdev=net")
	}
	a = append(a,
		// Two ports: QEMU reserves port 0 for a console, the agent's is 1.
		// The default 31 makes the guest set up 64 queues of 1,024 slots
		// (≈ 3.5 MiB of guest memory) for ports that never exist.
		"-device", "virtio-serial-device,max_ports=2",
		// Both sockets are bound by the driver and served by QEMU, so the
		// driver can connect before QEMU is up (the connection waits in
		// the backlog) and a new harness could connect again.
		"-chardev", "socket,id=agent,fd="+strconv.Itoa(fdAgent)+",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name="+agentPort,
		"-chardev", "socket,id=qmp,fd="+strconv.Itoa(fdQMP)+",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
		// The console goes to QEMU's stdout, a pipe the driver drains
		// into a bounded log: never into a file that could fill the disk.
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
	)
	if c.RAMFile {
		share := "on"
		if c.RAMCopy {
			share = "off"
		}
		a = append(a, "-object", "memory-backend-file,id=ram,size="+strconv.Itoa(c.MemoryMB)+"M,mem-path="+fdPath(c.RAMFD)+",share="+share)
	}
	if c.Incoming {
		a = append(a, "-incoming", "defer")
	}
	return a
}

// balloon is the virtio-balloon device. With free page reporting, pages
// the guest frees (its caches dropped by an idle agent, a runtime's freed
// heap) go back to the host. Not with RAMFile: QEMU 7.2 gives a reported
// page back by punching a hole in the RAM's file even when the mapping
// is private, which would zero that page in a snapshot's RAM for every
// VM restored from it, the running ones included (their pages not yet
// written are the file's). The restores of a snapshot must have the
// device its VM had, so a VM to be snapshotted has none either: restored
// VMs keep what their guest freed.
func (c vmConfig) balloon() string {
	if c.RAMFile {
		return "virtio-balloon-device"
	}
	return "virtio-balloon-device,free-page-reporting=on"
}

// Block nodes of the code disk: the device's raw node over a file node.
const (
	codeNode     = "code"
	codeFileNode = "code-file"
)

// codeFile is the -blockdev of the code disk's file node: the code image,
// or for a spare a placeholder that reads as zeros.
func (c vmConfig) codeFile() string {
	if c.Spare {
		return "driver=null-co,node-name=" + codeFileNode + ",size=" + strconv.Itoa(vmm.SpareCodeBytes) + ",read-zeroes=on,read-only=on"
	}
	return "driver=file,node-name=" + codeFileNode + ",filename=" + fdPath(fdCode) + ",read-only=on"
}

// accelArg is -accel's value.
func (c vmConfig) accelArg() string {
	if c.Accel == accelTCG {
		mb := c.TCGCacheMB
		if mb <= 0 {
			mb = DefaultTCGCacheMB
		}
		return string(c.Accel) + ",tb-size=" + strconv.Itoa(mb)
	}
	return string(c.Accel)
}

// vmName is QEMU's -name for instance id: it makes the process findable
// (Recover, ps, the suite's leftover checks).
func vmName(id string) string { return "invokex-" + id }

// hostTSCkHz reads the CPU frequency the host's kernel reports, which on
// hosts with a constant TSC is the TSC's rate; 0 when unknown.
func hostTSCkHz() int64 {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	return parseCPUInfoKHz(f)
}

func parseCPUInfoKHz(r io.Reader) int64 {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "cpu MHz" {
			continue
		}
		mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || mhz <= 0 || math.IsInf(mhz, 0) {
			return 0
		}
		return int64(math.Round(mhz * 1000))
	}
	return 0
}

// String renders the command line for logs and errors.
func (c vmConfig) String() string {
	return fmt.Sprintf("accel=%s vcpus=%d memory=%dM", c.Accel, c.VCPUs, c.MemoryMB)
}

// kernelHzOf reads CONFIG_HZ from the config package guest keeps next to
// the kernel it built; 0 when unknown.
func kernelHzOf(vmlinux string) int {
	f, err := os.Open(filepath.Join(filepath.Dir(vmlinux), "config"))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CONFIG_HZ="); ok {
			hz, err := strconv.Atoi(v)
			if err == nil && hz > 0 {
				return hz
			}
			return 0
		}
	}
	return 0
}
