package process

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// The sandbox user, as on Lambda: the runtime runs as this uid/gid when the
// harness asks for it (protocol.Init UID/GID).
const (
	sandboxUID  = 993
	sandboxGID  = 993
	sandboxUser = "sbx_user1051"
)

// rootDirName is the directory under StateDir/<id> on which the sandbox
// mounts its root tmpfs (in its own mount namespace only).
const rootDirName = "root"

// hostSystemDirs are bound read-only from the host (or recreated as
// symlinks on merged-/usr systems, where /bin is a link to usr/bin).
var hostSystemDirs = []string{"usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin"}

// hostEtcDirs are bound read-only when present: TLS roots, the
// alternatives links some interpreters resolve through, and Debian's
// python configuration (its sitecustomize.py in /usr links there).
var hostEtcDirs = []string{"ssl", "ca-certificates", "alternatives", "pki", "python3*"}

// hostEtcFiles are copied (symlinks recreated) when present: what libc and
// language runtimes read for name resolution, dynamic linking and time.
var hostEtcFiles = []string{
	"ld.so.cache", "ld.so.conf", "nsswitch.conf", "resolv.conf", "host.conf", "gai.conf",
	"localtime", "timezone", "os-release", "services", "protocols", "mime.types",
}

// buildRoot assembles the sandbox's root file system under cfg.Root and
// pivots into it. It runs as (namespaced) root in the sandbox's fresh mount
// namespace, so every mount vanishes with the namespace: nothing needs to be
// unmounted on the host. The result:
//
//	/                 tmpfs, read-only after setup
//	/usr /lib* /bin /sbin   host, read-only (or symlinks as on the host)
//	/etc              generated passwd, group, hosts, hostname; copied resolver
//	                  and linker files; ssl, ca-certificates, alternatives read-only
//	/var/task         Spec.CodeDir, read-only
//	/var/runtime      Spec.RuntimeDir, read-only (when given)
//	/opt              empty
//	/tmp              ext4 of EphemeralMB on a loop device (tmpdisk_linux.go),
//	                  or, where the driver cannot make one, a tmpfs; mode 1777
//	/proc             the sandbox's pid namespace
//	/dev              null zero full random urandom tty, shm, fd and std links
//
// A tmpfs /tmp is memory: its pages count against the sandbox's memory
// cgroup, so a function filling it uses its memory. That is why /tmp is a
// disk wherever the driver can make one, as in the VM drivers.
func buildRoot(cfg *sandboxConfig, stagedTmp int) error {
	// Nothing mounted from now on may propagate back to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making / private: %w", err)
	}
	root := cfg.Root
	if err := unix.Mount("tmpfs", root, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "size=16m,mode=0755"); err != nil {
		return fmt.Errorf("mounting root tmpfs: %w", err)
	}
	for _, d := range hostSystemDirs {
		if err := mirrorHost("/"+d, filepath.Join(root, d)); err != nil {
			return err
		}
	}
	if err := buildEtc(cfg, filepath.Join(root, "etc")); err != nil {
		return err
	}
	if err := bindRO(cfg.CodeDir, filepath.Join(root, "var/task")); err != nil {
		return err
	}
	if cfg.RuntimeDir != "" {
		if err := bindRO(cfg.RuntimeDir, filepath.Join(root, "var/runtime")); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "opt"), 0o755); err != nil {
		return fmt.Errorf("creating /opt: %w", err)
	}
	if err := mountTmp(cfg, stagedTmp, filepath.Join(root, "tmp")); err != nil {
		return err
	}
	if err := mountAt("proc", filepath.Join(root, "proc"), "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return err
	}
	if err := buildDev(cfg, filepath.Join(root, "dev")); err != nil {
		return err
	}
	return pivot(root)
}

// mirrorHost recreates host path src at dst: a symlink as the same symlink,
// a directory as a read-only bind mount. A missing src is skipped.
func mirrorHost(src, dst string) error {
	fi, err := os.Lstat(src)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspecting %s: %w", src, err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		target, err := os.Readlink(src)
		if err != nil {
			return fmt.Errorf("reading link %s: %w", src, err)
		}
		if err := os.Symlink(target, dst); err != nil {
			return fmt.Errorf("linking %s: %w", dst, err)
		}
		return nil
	}
	if !fi.IsDir() {
		return nil
	}
	return bindRO(src, dst)
}

// bindRO bind-mounts src (with everything mounted below it) read-only,
// nosuid and nodev at dst, creating dst as a file or directory like src.
func bindRO(src, dst string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("binding %s: %w", src, err)
	}
	if fi.IsDir() {
		err = os.MkdirAll(dst, 0o755)
	} else {
		err = touch(dst)
	}
	if err != nil {
		return fmt.Errorf("creating mount point %s: %w", dst, err)
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding %s: %w", src, err)
	}
	// mount_setattr makes the whole bound tree read-only; a plain remount
	// would leave mounts below src writable.
	attr := &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY | unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NODEV}
	err = unix.MountSetattr(-1, dst, unix.AT_RECURSIVE, attr)
	if errors.Is(err, unix.ENOSYS) {
		err = remountRO(dst)
	}
	if err != nil {
		return fmt.Errorf("making %s read-only: %w", dst, err)
	}
	return nil
}

// remountRO is the fallback for kernels before 5.12. In a user namespace
// the flags the host mount has (nosuid, noexec ...) are locked and must be
// repeated, or the remount fails with EPERM.
func remountRO(dst string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dst, &st); err != nil {
		return err
	}
	keep := uintptr(st.Flags) & (unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_NODIRATIME | unix.MS_RELATIME)
	return unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV|keep, "")
}

func mountAt(source, dst, fstype string, flags uintptr, data string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("creating mount point %s: %w", dst, err)
	}
	if err := unix.Mount(source, dst, fstype, flags, data); err != nil {
		return fmt.Errorf("mounting %s on %s: %w", fstype, dst, err)
	}
	return nil
}

func touch(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

func buildEtc(cfg *sandboxConfig, etc string) error {
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return fmt.Errorf("creating /etc: %w", err)
	}
	for _, pattern := range hostEtcDirs {
		srcs, _ := filepath.Glob(filepath.Join("/etc", pattern))
		for _, src := range srcs {
			if fi, err := os.Stat(src); err == nil && fi.IsDir() {
				if err := bindRO(src, filepath.Join(etc, filepath.Base(src))); err != nil {
					return err
				}
			}
		}
	}
	for _, f := range hostEtcFiles {
		if err := copyEtcFile(filepath.Join("/etc", f), filepath.Join(etc, f)); err != nil {
			return err
		}
	}
	generated := map[string]string{
		"passwd": "root:x:0:0:root:/root:/sbin/nologin\n" +
			fmt.Sprintf("%s:x:%d:%d::/tmp:/sbin/nologin\n", sandboxUser, sandboxUID, sandboxGID) +
			"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n",
		"group": "root:x:0:\n" +
			fmt.Sprintf("%s:x:%d:\n", sandboxUser, sandboxGID) +
			"nogroup:x:65534:\n",
		"hosts": "127.0.0.1\tlocalhost " + cfg.Hostname + "\n" +
			"::1\tlocalhost ip6-localhost ip6-loopback\n",
		"hostname": cfg.Hostname + "\n",
	}
	if cfg.Nameservers != nil {
		// The host's file may name loopback resolvers (or be a link to
		// one's), which the sandbox's own network cannot reach.
		var b strings.Builder
		for _, ns := range cfg.Nameservers {
			b.WriteString("nameserver " + ns + "\n")
		}
		generated["resolv.conf"] = b.String()
		if err := os.Remove(filepath.Join(etc, "resolv.conf")); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("replacing /etc/resolv.conf: %w", err)
		}
	}
	for name, content := range generated {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("writing /etc/%s: %w", name, err)
		}
	}
	return nil
}

// copyEtcFile copies a small host file, or recreates it if it is a symlink
// (localtime, os-release). Missing files are skipped.
func copyEtcFile(src, dst string) error {
	fi, err := os.Lstat(src)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspecting %s: %w", src, err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		target, err := os.Readlink(src)
		if err != nil {
			return fmt.Errorf("reading link %s: %w", src, err)
		}
		if err := os.Symlink(target, dst); err != nil {
			return fmt.Errorf("linking %s: %w", dst, err)
		}
		return nil
	}
	if !fi.Mode().IsRegular() || fi.Size() > 4<<20 {
		return nil
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("copying %s: %w", src, err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		return fmt.Errorf("copying %s: %w", src, err)
	}
	return nil
}

// devNodes are bound from the host's /dev: binding works in a user
// namespace too, where mknod is not allowed.
var devNodes = []string{"null", "zero", "full", "random", "urandom", "tty"}

func buildDev(cfg *sandboxConfig, dev string) error {
	if err := mountAt("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "size=64k,mode=0755"); err != nil {
		return err
	}
	for _, n := range devNodes {
		src, dst := "/dev/"+n, filepath.Join(dev, n)
		if _, err := os.Stat(src); err != nil {
			continue
		}
		if err := touch(dst); err != nil {
			return fmt.Errorf("creating %s: %w", dst, err)
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding %s: %w", src, err)
		}
	}
	links := map[string]string{
		"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
		"stderr": "/proc/self/fd/2",
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(dev, name)); err != nil {
			return fmt.Errorf("linking /dev/%s: %w", name, err)
		}
	}
	// /dev/shm is memory-backed like /tmp and limited by the memory cgroup.
	shmOpts := "size=" + strconv.Itoa(cfg.MemoryMB) + "m,mode=1777"
	if err := mountAt("tmpfs", filepath.Join(dev, "shm"), "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, shmOpts); err != nil {
		return err
	}
	return nil
}

// pivot makes root the sandbox's / and detaches the host's file system
// from the namespace, then makes / and /dev read-only.
func pivot(root string) error {
	old := filepath.Join(root, ".oldroot")
	if err := os.Mkdir(old, 0o700); err != nil {
		return fmt.Errorf("creating old root: %w", err)
	}
	if err := unix.PivotRoot(root, old); err != nil {
		return fmt.Errorf("pivot_root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir to new root: %w", err)
	}
	if err := unix.Unmount("/.oldroot", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching old root: %w", err)
	}
	if err := os.Remove("/.oldroot"); err != nil {
		return fmt.Errorf("removing old root: %w", err)
	}
	for _, p := range []string{"/dev", "/"} {
		flags := uintptr(unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID)
		if p == "/" {
			flags |= unix.MS_NODEV
		} else {
			flags |= unix.MS_NOEXEC
		}
		if err := unix.Mount("", p, "", flags, ""); err != nil {
			return fmt.Errorf("remounting %s read-only: %w", p, err)
		}
	}
	return nil
}
