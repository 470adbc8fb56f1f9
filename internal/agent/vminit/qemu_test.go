package vminit_test

import (
	"bufio"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// KernelCmdline is the guest command line the boot tests use (see
// guest/README.md for why each option is there).
const KernelCmdline = "console=ttyS0 quiet panic=-1 reboot=t i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd " +
	"tsc=reliable no_timer_check lapic_timer_period=4000000 highres=off root=/dev/vda rootfstype=ext4 ro init=/sbin/init"

// QEMUArgs is a QEMU microvm command line (TCG) booting vmlinux with the
// three disks, the agent's virtio-serial port on a unix socket, and the
// serial console into a file.
func QEMUArgs(vmlinux, root, code, scratch, sock, console string, extraCmdline ...string) []string {
	cmdline := KernelCmdline
	if khz := hostTSCkHz(); khz > 0 {
		// Calibrating the TSC against the PIT is slow and, under TCG,
		// sometimes fails (the kernel then runs on jiffies): say it.
		hz := kernelHz(vmlinux)
		cmdline += " tsc_early_khz=" + strconv.FormatInt(khz, 10) + " lpj=" + strconv.FormatInt(khz*1000/int64(hz), 10)
	}
	if len(extraCmdline) > 0 {
		cmdline += " " + strings.Join(extraCmdline, " ")
	}
	return []string{
		"-M", "microvm,x-option-roms=off,rtc=on,isa-serial=on,acpi=off",
		"-accel", "tcg", "-cpu", "max", "-m", "128M", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", vmlinux, "-append", cmdline,
		"-drive", "id=root,file=" + root + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
		"-drive", "id=code,file=" + code + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=code",
		"-drive", "id=scratch,file=" + scratch + ",format=raw,if=none,cache=unsafe",
		"-device", "virtio-blk-device,drive=scratch",
		"-device", "virtio-rng-device",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=invokex.agent",
		"-serial", "file:" + console,
	}
}

// hostTSCkHz is the host's "cpu MHz" in kHz (0 if unknown); TCG's TSC
// runs at the host's rate.
func hostTSCkHz() int64 {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || mhz <= 0 {
				return 0
			}
			return int64(math.Round(mhz * 1000))
		}
	}
	return 0
}

// kernelHz reads CONFIG_HZ from the config guest keeps next to vmlinux.
func kernelHz(vmlinux string) int {
	b, err := os.ReadFile(filepath.Join(filepath.Dir(vmlinux), "config"))
	if err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "CONFIG_HZ="); ok {
				if hz, err := strconv.Atoi(v); err == nil && hz > 0 {
					return hz
				}
			}
		}
	}
	return 250
}
