package vminit_test

import "strings"

// KernelCmdline is the guest command line the boot test uses (see
// guest/README.md for why each option is there).
const KernelCmdline = "console=ttyS0 quiet panic=-1 reboot=t i8042.noaux i8042.nokbd i8042.nopnp i8042.dumbkbd " +
	"tsc=reliable no_timer_check nolapic_timer root=/dev/vda ro rootfstype=ext4 init=/sbin/init"

// QEMUArgs is a QEMU microvm command line (TCG) booting vmlinux with the
// three disks, the agent's virtio-serial port on a unix socket, and the
// serial console into a file.
func QEMUArgs(vmlinux, root, code, scratch, sock, console string, extraCmdline ...string) []string {
	cmdline := KernelCmdline
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
		"-drive", "id=scratch,file=" + scratch + ",format=raw,if=none",
		"-device", "virtio-blk-device,drive=scratch",
		"-device", "virtio-rng-device",
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + sock + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=invokex.agent",
		"-serial", "file:" + console,
	}
}
