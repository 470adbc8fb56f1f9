package qemu

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/harness/driver/vmm"
)

// argValue returns the value after the first occurrence of flag whose
// value starts with prefix.
func argValues(args []string, flag string) []string {
	var vs []string
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			vs = append(vs, args[i+1])
		}
	}
	return vs
}

func TestArgsTCG(t *testing.T) {
	c := vmConfig{
		ID: "abc-1", Accel: accelTCG,
		MemoryMB: 256, VCPUs: 1, TSCkHz: 2445426, KernelHz: 100, ClockUnixMs: 1700000000123,
	}
	a := c.args()
	for flag, want := range map[string]string{
		"-name": "invokex-abc-1", "-accel": "tcg,tb-size=" + strconv.Itoa(DefaultTCGCacheMB), "-cpu": "max", "-m": "256M", "-smp": "1",
		"-kernel": "/proc/self/fd/5", "-mon": "chardev=qmp,mode=control",
		"-M": "microvm,x-option-roms=off,rtc=on,isa-serial=on,acpi=off",
	} {
		if got := argValues(a, flag); len(got) != 1 || got[0] != want {
			t.Errorf("%s = %q, want [%q]", flag, got, want)
		}
	}
	c.TCGCacheMB = 64
	if got := argValues(c.args(), "-accel"); len(got) != 1 || got[0] != "tcg,tb-size=64" {
		t.Errorf("-accel with TCGCacheMB 64 = %q", got)
	}
	c.TCGCacheMB = 0
	drives := argValues(a, "-drive")
	wantDrives := []string{
		"id=root,file=/proc/self/fd/6,format=raw,if=none,readonly=on",
		"id=scratch,file=/proc/self/fd/8,format=raw,if=none,cache=unsafe",
	}
	if !slices.Equal(drives, wantDrives) {
		t.Errorf("drives = %q, want %q", drives, wantDrives)
	}
	wantBlockdevs := []string{
		"driver=file,node-name=code-file,filename=/proc/self/fd/7,read-only=on",
		"driver=raw,node-name=code,file=code-file,read-only=on",
	}
	if bd := argValues(a, "-blockdev"); !slices.Equal(bd, wantBlockdevs) {
		t.Errorf("blockdevs = %q, want %q", bd, wantBlockdevs)
	}
	if strings.Contains(argValues(a, "-append")[0], "invokex.spare") {
		t.Errorf("a VM that is no spare has invokex.spare")
	}
	// A spare's code disk is a placeholder that reads as zeros, as large
	// as the largest code image it can take.
	c.Spare = true
	a = c.args()
	if bd := argValues(a, "-blockdev"); len(bd) != 2 || bd[0] != "driver=null-co,node-name=code-file,size=1073741824,read-zeroes=on,read-only=on" || bd[1] != wantBlockdevs[1] {
		t.Errorf("spare blockdevs = %q", bd)
	}
	if !strings.Contains(argValues(a, "-append")[0], " invokex.spare=1") {
		t.Errorf("a spare's kernel command line lacks invokex.spare=1")
	}
	c.Spare = false
	a = c.args()
	// Disks in the order vda, vdb, vdc; then rng, the balloon (free page
	// reporting) and the serial port.
	devs := argValues(a, "-device")
	wantDevs := []string{
		"virtio-blk-device,drive=root", "virtio-blk-device,drive=code", "virtio-blk-device,drive=scratch",
		"virtio-rng-device", "virtio-balloon-device,free-page-reporting=on",
		"virtio-serial-device,max_ports=2", "virtserialport,chardev=agent,name=invokex.agent",
	}
	if !slices.Equal(devs, wantDevs) {
		t.Errorf("devices = %q, want %q", devs, wantDevs)
	}
	wantChardevs := []string{
		"socket,id=agent,fd=3,server=on,wait=off",
		"socket,id=qmp,fd=4,server=on,wait=off",
		"stdio,id=console,signal=off",
	}
	if ch := argValues(a, "-chardev"); !slices.Equal(ch, wantChardevs) {
		t.Errorf("chardevs = %q, want %q", ch, wantChardevs)
	}
	// QEMU is given descriptors only: no path of the host's files.
	for _, arg := range a {
		if strings.Contains(arg, "path=") || strings.Contains(arg, "pidfile") {
			t.Errorf("argument %q names a host path", arg)
		}
	}
	for _, f := range []string{"-nodefaults", "-no-user-config", "-no-reboot"} {
		if !slices.Contains(a, f) {
			t.Errorf("missing %s", f)
		}
	}
	app := strings.Fields(argValues(a, "-append")[0])
	for _, want := range []string{
		"console=ttyS0", "quiet", "panic=-1", "reboot=t", "lapic_timer_period=10000000", "highres=off", "tsc=reliable",
		"tsc_early_khz=2445426", "lpj=24454260", "root=/dev/vda", "ro", "init=/sbin/init",
		"invokex.code=/dev/vdb", "invokex.scratch=/dev/vdc", "invokex.port=invokex.agent",
		"invokex.hostname=sandbox-abc-1", "invokex.clock=1700000000123",
	} {
		if !slices.Contains(app, want) {
			t.Errorf("kernel command line %q lacks %q", app, want)
		}
	}
	// The APIC timer is told its rate instead of being turned off: without
	// it an idle guest's vCPUs tick 250 times a second.
	if slices.Contains(app, "nolapic_timer") {
		t.Errorf("kernel command line turns the APIC timer off: %q", app)
	}
}

func TestArgsKVM(t *testing.T) {
	c := vmConfig{ID: "x", Accel: accelKVM, MemoryMB: 4096, VCPUs: 3, TSCkHz: 2000000}
	a := c.args()
	if got := argValues(a, "-cpu"); got[0] != "host" {
		t.Errorf("-cpu %q under kvm, want host", got)
	}
	if got := argValues(a, "-smp"); got[0] != "3" {
		t.Errorf("-smp %q, want 3", got)
	}
	app := argValues(a, "-append")[0]
	for _, tcgOnly := range []string{"lapic_timer_period=", "highres=off", "nolapic_timer", "lpj=", "tsc_early_khz="} {
		if strings.Contains(app, tcgOnly) {
			t.Errorf("kvm command line has the TCG workaround %s: %q", tcgOnly, app)
		}
	}
}

func TestArgsUnknownTSC(t *testing.T) {
	app := vmConfig{ID: "x", Accel: accelTCG}.kernelCmdline()
	if strings.Contains(app, "lpj=") || strings.Contains(app, "tsc_early_khz=") {
		t.Errorf("command line guesses an unknown TSC rate: %q", app)
	}
	if !strings.Contains(app, " lapic_timer_period=4000000 ") {
		t.Errorf("tcg command line lacks the APIC timer's rate at the default HZ: %q", app)
	}
}

func TestParseCPUInfo(t *testing.T) {
	for in, want := range map[string]int64{
		"processor\t: 0\ncpu MHz\t\t: 2445.426\n": 2445426,
		"cpu MHz : 3000\n":                        3000000,
		"processor : 0\n":                         0,
		"cpu MHz : fast\n":                        0,
		"cpu MHz : -5\n":                          0,
	} {
		if got := parseCPUInfoKHz(strings.NewReader(in)); got != want {
			t.Errorf("parseCPUInfoKHz(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestChooseAccel(t *testing.T) {
	fake := fakeQEMUPath(t)
	ctx := context.Background()
	if a, _, err := chooseAccel(ctx, "tcg", fake); err != nil || a != accelTCG {
		t.Errorf("tcg: %v, %v", a, err)
	}
	if _, _, err := chooseAccel(ctx, "hvf", fake); err == nil {
		t.Errorf("an unknown accel was accepted")
	}
	if vmm.OpenKVM() != nil {
		t.Skip("skipping the KVM probe: /dev/kvm cannot be opened here")
	}
	// The fake fails as QEMU does where KVM cannot run a guest.
	a, why, err := chooseAccel(ctx, "auto", fake)
	if err != nil || a != accelTCG || !strings.Contains(why, "failed to set MSR") {
		t.Errorf("auto with an unusable kvm = %v, %q, %v; want tcg and QEMU's reason", a, why, err)
	}
	if _, _, err := chooseAccel(ctx, "kvm", fake); err == nil || !strings.Contains(err.Error(), "failed to set MSR") {
		t.Errorf("kvm with an unusable kvm: %v, want an error with QEMU's reason", err)
	}
}

func TestArgsNetwork(t *testing.T) {
	c := vmConfig{ID: "n", Accel: accelTCG, MemoryMB: 128, VCPUs: 1}
	if got := argValues(c.args(), "-netdev"); len(got) != 0 {
		t.Errorf("without Network: -netdev %q", got)
	}
	if strings.Contains(c.kernelCmdline(), "ip=") {
		t.Errorf("without Network the guest configures an address: %s", c.kernelCmdline())
	}
	c.Network = true
	a := c.args()
	if got := argValues(a, "-netdev"); len(got) != 1 || !strings.HasPrefix(got[0], "user,id=net,") {
		t.Errorf("-netdev = %q, want one user-mode network", got)
	}
	if !slices.Contains(argValues(a, "-device"), "virtio-net-device,netdev=net") {
		t.Errorf("no virtio-net device in %q", argValues(a, "-device"))
	}
	// The disks keep their order (vda, vdb, vdc) with a NIC present.
	devs := strings.Join(argValues(a, "-device"), " ")
	if i, j := strings.Index(devs, "drive=scratch"), strings.Index(devs, "virtio-net"); i < 0 || j < i {
		t.Errorf("devices out of order: %s", devs)
	}
	want := "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off:10.0.2.3"
	if !slices.Contains(strings.Fields(c.kernelCmdline()), want) {
		t.Errorf("kernel command line lacks %s: %s", want, c.kernelCmdline())
	}
}

func TestArgsIncoming(t *testing.T) {
	c := vmConfig{ID: "r", Accel: accelTCG, MemoryMB: 128, VCPUs: 1}
	if got := argValues(c.args(), "-incoming"); len(got) != 0 {
		t.Errorf("a fresh boot waits for a migration: %q", got)
	}
	c.Incoming = true
	if got := argValues(c.args(), "-incoming"); len(got) != 1 || got[0] != "defer" {
		t.Errorf("-incoming = %q, want [defer]", got)
	}
}

func TestArgsRAMFile(t *testing.T) {
	c := vmConfig{ID: "s", Accel: accelTCG, MemoryMB: 128, VCPUs: 1, RAMFile: true, RAMFD: 9}
	a := c.args()
	if got := argValues(a, "-M"); len(got) != 1 || !strings.HasSuffix(got[0], ",memory-backend=ram") {
		t.Errorf("-M = %q", got)
	}
	if got := argValues(a, "-object"); len(got) != 1 || got[0] != "memory-backend-file,id=ram,size=128M,mem-path=/proc/self/fd/9,share=on" {
		t.Errorf("a VM to snapshot: -object = %q", got)
	}
	c.RAMCopy, c.RAMFD = true, 10
	if got := argValues(c.args(), "-object"); len(got) != 1 || got[0] != "memory-backend-file,id=ram,size=128M,mem-path=/proc/self/fd/10,share=off" {
		t.Errorf("a restored VM: -object = %q", got)
	}
	// QEMU 7.2 would punch reported free pages out of the snapshot's file.
	if got := argValues(c.args(), "-device"); slices.ContainsFunc(got, func(d string) bool { return strings.Contains(d, "free-page-reporting=on") }) {
		t.Errorf("a VM with its RAM in a file reports free pages: %q", got)
	}
	c = vmConfig{ID: "n", Accel: accelTCG, MemoryMB: 128, VCPUs: 1}
	if got := argValues(c.args(), "-object"); len(got) != 0 {
		t.Errorf("an ordinary VM keeps its RAM in a file: %q", got)
	}
	if got := argValues(c.args(), "-device"); !slices.Contains(got, "virtio-balloon-device,free-page-reporting=on") {
		t.Errorf("an ordinary VM does not report free pages: %q", got)
	}
}

func TestArgsAgentCPU(t *testing.T) {
	c := vmConfig{ID: "a", Accel: accelTCG, MemoryMB: 128, VCPUs: 2, AgentCPU: true}
	if got := argValues(c.args(), "-smp"); len(got) != 1 || got[0] != "2" {
		t.Errorf("-smp = %q, want 2", got)
	}
	if !slices.Contains(strings.Fields(c.kernelCmdline()), "invokex.agentcpu=1") {
		t.Errorf("kernel command line lacks invokex.agentcpu=1: %s", c.kernelCmdline())
	}
	c.AgentCPU, c.VCPUs = false, 1
	if strings.Contains(c.kernelCmdline(), "agentcpu") {
		t.Errorf("without AgentCPU: %s", c.kernelCmdline())
	}
}
