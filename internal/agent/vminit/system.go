package vminit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sysVirtioPorts is where the kernel lists virtio-serial ports.
const sysVirtioPorts = "/sys/class/virtio-ports"

// mount mounts source on target; EBUSY (already mounted, e.g. /dev by
// CONFIG_DEVTMPFS_MOUNT) is success.
func mount(source, target, fstype string, flags uintptr, data string) error {
	err := unix.Mount(source, target, fstype, flags, data)
	if err != nil && !errors.Is(err, unix.EBUSY) {
		return fmt.Errorf("mounting %s on %s: %w", fstype, target, err)
	}
	return nil
}

// mountBase mounts the pseudo file systems everything else needs.
func mountBase() error {
	const nosuid = unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC
	steps := []struct {
		src, dst, fs string
		flags        uintptr
		data         string
	}{
		{"proc", "/proc", "proc", nosuid, ""},
		{"sysfs", "/sys", "sysfs", nosuid, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID | unix.MS_NOEXEC, "mode=0755"},
	}
	for _, s := range steps {
		if err := mount(s.src, s.dst, s.fs, s.flags, s.data); err != nil {
			return err
		}
	}
	// The mount below sets its mode.
	if err := os.MkdirAll("/dev/shm", 0o755); err != nil {
		return fmt.Errorf("creating /dev/shm: %w", err)
	}
	if err := mount("shm", "/dev/shm", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=1777"); err != nil {
		return err
	}
	return mount("run", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755,size=1m")
}

// setupSystem mounts the code (unless the VM is a spare, see
// awaitAssignment) and scratch disks, sets the hostname, brings up
// loopback, seeds the entropy pool if needed and hardens PID 1.
func setupSystem(cfg Config, log *slog.Logger) error {
	if !cfg.Spare {
		if err := mountCode(cfg.CodeDevice); err != nil {
			return err
		}
	}
	if err := mountScratch(cfg.ScratchDevice); err != nil {
		return err
	}
	if cfg.Hostname != "" {
		if err := unix.Sethostname([]byte(cfg.Hostname)); err != nil {
			return fmt.Errorf("setting hostname: %w", err)
		}
	}
	if err := writeHosts(); err != nil {
		// Resolving the own hostname is a nicety; the root's hosts file stays.
		log.Warn("writing /etc/hosts", "err", err)
	}
	if err := loopbackUp(); err != nil {
		return err
	}
	if err := seedEntropy(); err != nil {
		log.Warn("seeding entropy", "err", err)
	}
	if err := os.WriteFile(pageReportingOrder, []byte(freePageReportingOrder), 0); err != nil && !os.IsNotExist(err) {
		log.Warn("tuning free page reporting", "err", err)
	}
	// Nothing in the guest may gain privileges through exec (setuid
	// binaries of a Debian root): the runtime runs as sbx_user1051.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("setting no_new_privs: %w", err)
	}
	// A function that exhausts the VM's memory must be the OOM killer's
	// victim, never the agent (the agent resets the runtime's score to 0).
	if err := os.WriteFile("/proc/self/oom_score_adj", []byte("-1000"), 0); err != nil {
		log.Warn("protecting the agent from the OOM killer", "err", err)
	}
	return limitTasks(procThreadsMax)
}

// mountCode mounts the code disk dev on /mnt/code and binds its task and
// runtime directories on /var/task and /var/runtime, all read-only. The
// block device's buffers are dropped first: on a spare VM the host
// swapped the disk behind it (see awaitAssignment), and what the kernel
// read of the placeholder when it probed the device must not be mistaken
// for the code disk's.
func mountCode(dev string) error {
	if err := flushBuffers(dev); err != nil {
		return err
	}
	const ro = unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV
	if err := mount(dev, "/mnt/code", "ext4", ro, ""); err != nil {
		return err
	}
	for _, b := range [][2]string{{"/mnt/code/task", "/var/task"}, {"/mnt/code/runtime", "/var/runtime"}} {
		if err := bindRO(b[0], b[1]); err != nil {
			return err
		}
	}
	return nil
}

// flushBuffers drops the cached blocks of block device dev (BLKFLSBUF).
func flushBuffers(dev string) error {
	f, err := os.Open(dev)
	if err != nil {
		return fmt.Errorf("opening %s: %w", dev, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.BLKFLSBUF, 0); err != nil {
		return fmt.Errorf("flushing the buffers of %s: %w", dev, err)
	}
	return nil
}

// pageReportingOrder is the smallest block of free guest memory the
// kernel reports to the VMM (free page reporting, virtio-balloon), as a
// page order. The kernel sets it to its pageblock order when the balloon
// registers, 4 MiB blocks on our guest kernel, and a small guest's free
// memory is rarely free in blocks that big: after an idle agent drops the
// caches, most of it would stay with the guest. 64 KiB blocks let the
// host take most of it back; reports happen only as memory is freed.
const (
	pageReportingOrder     = "/sys/module/page_reporting/parameters/page_reporting_order"
	freePageReportingOrder = "4"
)

// runtimeTasks is Lambda's limit of processes plus threads per execution
// environment, which the guest applies to the runtime's user.
const runtimeTasks = 1024

// procThreadsMax is the kernel's system-wide limit of tasks.
const procThreadsMax = "/proc/sys/kernel/threads-max"

// threadsMaxFloor is the lowest system-wide task limit the guest keeps:
// the runtime's runtimeTasks plus room for the kernel's threads and the
// agent's, so the runtime's limit is always the one a fork bomb hits.
const threadsMaxFloor = runtimeTasks + 512

// limitTasks gives the runtime Lambda's limit of runtimeTasks processes
// and threads.
//
// The guest kernel has no cgroups, so the limit is RLIMIT_NPROC, set soft
// and hard on PID 1 and inherited by everything it starts. The kernel
// counts it per real uid, threads included (each is a task), and enforces
// it in fork and clone only for a user other than root without
// CAP_SYS_RESOURCE or CAP_SYS_ADMIN: the agent (root) is never held by it,
// while the runtime, which the agent starts under its own uid, gets all
// 1,024 for itself and cannot raise the hard limit back.
//
// The kernel also caps tasks system-wide (threads-max), from the memory
// size: about 1,000 in a 128 MB guest, below the runtime's limit. A fork
// bomb stopped there would also stop the agent from creating a thread,
// which the Go runtime answers by aborting PID 1 (a kernel panic), so the
// cap is raised to threadsMaxFloor.
func limitTasks(threadsMax string) error {
	if err := raiseThreadsMax(threadsMax, threadsMaxFloor); err != nil {
		return err
	}
	lim := unix.Rlimit{Cur: runtimeTasks, Max: runtimeTasks}
	if err := unix.Setrlimit(unix.RLIMIT_NPROC, &lim); err != nil {
		return fmt.Errorf("setting RLIMIT_NPROC: %w", err)
	}
	return nil
}

// raiseThreadsMax writes floor to the sysctl file path if it holds less.
func raiseThreadsMax(path string, floor int) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading threads-max: %w", err)
	}
	cur, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("reading threads-max: %q: %w", b, err)
	}
	if cur >= floor {
		return nil
	}
	if err := os.WriteFile(path, []byte(strconv.Itoa(floor)), 0); err != nil {
		return fmt.Errorf("raising threads-max to %d: %w", floor, err)
	}
	return nil
}

// bindRO bind-mounts src on dst read-only.
func bindRO(src, dst string) error {
	if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("binding %s on %s: %w", src, dst, err)
	}
	// A bind mount ignores MS_RDONLY until remounted.
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
	if err := unix.Mount("", dst, "", flags, ""); err != nil {
		return fmt.Errorf("making %s read-only: %w", dst, err)
	}
	return nil
}

// mountScratch mounts the writable /tmp, world-writable and sticky like any
// /tmp, and empty (mkfs's lost+found is removed).
func mountScratch(dev string) error {
	const flags = unix.MS_NOSUID | unix.MS_NODEV
	if dev == "tmpfs" {
		return mount("tmp", "/tmp", "tmpfs", flags, "mode=1777")
	}
	// noinit_itable: the disk is fresh from mkfs with lazy inode tables;
	// zeroing them in the background would write up to hundreds of MB of
	// zeros into the host's sparse file for nothing.
	if err := mount(dev, "/tmp", "ext4", flags, "noinit_itable"); err != nil {
		return err
	}
	if err := unix.Chmod("/tmp", 0o1777); err != nil {
		return fmt.Errorf("opening /tmp: %w", err)
	}
	if err := os.Remove("/tmp/lost+found"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("emptying /tmp: %w", err)
	}
	return nil
}

// writeHosts makes the hostname resolvable: a hosts file in /run bound
// over the read-only root's /etc/hosts. Called again (a spare VM's new
// hostname), it rewrites the file in place, which the bind shows.
func writeHosts() error {
	name, err := os.Hostname()
	if err != nil {
		return err
	}
	if err := os.MkdirAll("/run/invokex", 0o755); err != nil {
		return err
	}
	content := fmt.Sprintf("127.0.0.1\tlocalhost %s\n::1\tlocalhost ip6-localhost ip6-loopback\n", name)
	p := "/run/invokex/hosts"
	_, statErr := os.Stat(p)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		return err
	}
	if statErr == nil {
		return nil // bound already
	}
	if _, err := os.Stat("/etc/hosts"); err != nil {
		return err
	}
	return bindRO(p, "/etc/hosts")
}

// loopbackUp brings up lo, which the Runtime API listens on.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bringing up loopback: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
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

// seedEntropy credits the kernel's pool from the virtio-rng device if the
// pool is not initialised yet, so the runtime's first getrandom does not
// block. A 6.1 kernel usually has its pool ready long before init (jitter
// entropy, RDRAND and the hwrng feeding thread).
func seedEntropy() error {
	var b [1]byte
	if _, err := unix.Getrandom(b[:], unix.GRND_NONBLOCK); err == nil {
		return nil
	}
	f, err := os.Open("/dev/hwrng")
	if err != nil {
		return fmt.Errorf("no initialised pool and no hwrng: %w", err)
	}
	defer f.Close()
	const n = 64
	buf := make([]byte, n)
	if _, err := f.Read(buf); err != nil {
		return fmt.Errorf("reading /dev/hwrng: %w", err)
	}
	rnd, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer rnd.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+n)
	*(*int32)(unsafe.Pointer(&info[0])) = n * 8
	*(*int32)(unsafe.Pointer(&info[4])) = n
	copy(info[8:], buf)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, rnd.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("crediting entropy: %w", errno)
	}
	return nil
}

// openPort waits until the virtio-serial port named name appears under
// sysDir (the host names ports asynchronously) and opens its device.
// The returned file is pollable, so closing it unblocks a pending Read.
func openPort(ctx context.Context, sysDir, name string, wait time.Duration) (*os.File, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		dev, err := findPort(sysDir, name)
		if err == nil {
			f, err := os.OpenFile(filepath.Join("/dev", dev), os.O_RDWR, 0)
			if err != nil {
				return nil, fmt.Errorf("opening agent port %s: %w", dev, err)
			}
			return f, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no virtio-serial port named %q: %w", name, err)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// findPort returns the device name (vportNpM) of the port named name.
func findPort(sysDir, name string) (string, error) {
	entries, err := os.ReadDir(sysDir)
	if err != nil {
		return "", err
	}
	var seen []string
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(sysDir, e.Name(), "name"))
		if err != nil {
			continue
		}
		n := strings.TrimSpace(string(b))
		if n == name {
			return e.Name(), nil
		}
		seen = append(seen, e.Name()+"="+n)
	}
	return "", fmt.Errorf("ports: %v: %w", seen, os.ErrNotExist)
}
