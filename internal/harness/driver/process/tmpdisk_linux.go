package process

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/guest"
)

// A sandbox's /tmp is, when the driver can make it so, an ext4 file
// system on a loop device over a sparse file of EphemeralMB in the
// sandbox's state directory: as on Lambda, /tmp is storage, not memory.
// What a function writes there is page cache the kernel can write back
// and reclaim, so a 128 MB function can fill a 512 MB /tmp; on a tmpfs
// (the fallback) every byte of /tmp is memory the sandbox's memory cgroup
// charges and can never reclaim without swap.
//
// The file is a sparse copy of a template made once per size (mkfs takes
// ~10 ms, a sparse copy of its few hundred KiB of metadata well under one)
// and only takes host space for what is written, at most EphemeralMB. The
// loop device is set to clear itself when the file system is unmounted,
// which happens when the sandbox's mount namespace ends with its init: a
// crashed harness leaves no loop device and no mount, and the file goes
// with the state directory.

const (
	// tmpTemplatesDir, in StateDir, holds the templates; Recover leaves
	// it alone and New empties it.
	tmpTemplatesDir = ".tmp-templates"
)

// tmpDisks makes the /tmp images of a driver's sandboxes.
type tmpDisks struct {
	dir string // StateDir/tmpTemplatesDir

	mu        sync.Mutex
	templates map[int]*tmpTemplate // by size in MiB
}

// tmpTemplate is one size's template; ready is closed once it is made or
// its making failed (err), and a failed one is forgotten.
type tmpTemplate struct {
	ready chan struct{}
	path  string
	err   error
}

// minTmpDiskMB is the smallest /tmp made as a disk (mkfs's floor); a
// smaller one is a tmpfs, whose few MiB of memory do not matter.
const minTmpDiskMB = 8

// newTmpDisks returns the /tmp image maker of a driver on stateDir, and
// "" if the host can give sandboxes a disk-backed /tmp; else nil and the
// reason (the sandboxes then get a tmpfs). It needs real root (a loop
// device and an ext4 mount), loop devices the driver can open, Linux 5.8
// (LOOP_CONFIGURE, and the mount API of 5.2), mkfs.ext4, and a state
// directory on a disk: an image on a tmpfs would be memory again.
func newTmpDisks(stateDir string, rootless bool) (*tmpDisks, string) {
	if rootless {
		return nil, "rootless"
	}
	if !kernelAtLeast(5, 8) {
		return nil, "Linux before 5.8 has no LOOP_CONFIGURE"
	}
	if err := probeLoop(); err != nil {
		return nil, "no usable loop device: " + err.Error()
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		return nil, "no mkfs.ext4 (e2fsprogs)"
	}
	var st unix.Statfs_t
	if err := unix.Statfs(stateDir, &st); err != nil {
		return nil, fmt.Sprintf("inspecting the state directory: %v", err)
	}
	if st.Type == unix.TMPFS_MAGIC || st.Type == unix.RAMFS_MAGIC {
		return nil, "the state directory is in memory (tmpfs)"
	}
	dir := filepath.Join(stateDir, tmpTemplatesDir)
	// A previous driver's templates may be of another mkfs; they are
	// cheap to make again.
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Sprintf("removing old /tmp templates: %v", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Sprintf("creating %s: %v", dir, err)
	}
	return &tmpDisks{dir: dir, templates: map[int]*tmpTemplate{}}, ""
}

// kernelAtLeast reports whether the running kernel is major.minor or later.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	var maj, min int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &maj, &min); err != nil {
		return false
	}
	return maj > major || maj == major && min >= minor
}

// probeLoop checks that the driver can get a free loop device and open
// it (a container's device rules or a static /dev can forbid either).
func probeLoop() error {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer ctl.Close()
	n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
	}
	dev, err := os.OpenFile("/dev/loop"+strconv.Itoa(n), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return dev.Close()
}

// close removes the templates; for the driver's Close, after its
// sandboxes. A nil t has none.
func (t *tmpDisks) close() error {
	if t == nil {
		return nil
	}
	if err := os.RemoveAll(t.dir); err != nil {
		return fmt.Errorf("removing /tmp templates: %w", err)
	}
	return nil
}

// make puts a fresh /tmp image of sizeMB MiB into the sandbox directory
// dir and returns its path; "" for a tmpfs (a nil t, or a size below
// minTmpDiskMB). The file is named after its size, so an image a sandbox
// was started with is never rewritten under it.
func (t *tmpDisks) make(ctx context.Context, dir string, sizeMB int) (string, error) {
	if t == nil || sizeMB < minTmpDiskMB {
		return "", nil
	}
	tmpl, err := t.template(ctx, sizeMB)
	if err != nil {
		return "", err
	}
	img := filepath.Join(dir, tmpDiskName(sizeMB))
	if err := guest.CopySparse(ctx, tmpl, img); err != nil {
		return "", fmt.Errorf("making /tmp: %w", err)
	}
	return img, nil
}

// tmpDiskName is the file name of a sandbox's /tmp image of sizeMB.
func tmpDiskName(sizeMB int) string { return "tmp-" + strconv.Itoa(sizeMB) + ".ext4" }

// template returns the template of sizeMB, making it on first use;
// concurrent callers of one size wait for the one making it (or for their
// own ctx). It is made whatever the maker's ctx (~10 ms), so that a
// cancelled start fails no other; a failure is not kept, the next start
// tries again.
func (t *tmpDisks) template(ctx context.Context, sizeMB int) (string, error) {
	t.mu.Lock()
	tt := t.templates[sizeMB]
	maker := tt == nil
	if maker {
		tt = &tmpTemplate{ready: make(chan struct{})}
		t.templates[sizeMB] = tt
	}
	t.mu.Unlock()
	if maker {
		path := filepath.Join(t.dir, strconv.Itoa(sizeMB)+".ext4")
		if err := guest.ScratchImage(context.WithoutCancel(ctx), path, sizeMB); err != nil {
			tt.err = fmt.Errorf("making the /tmp template of %d MiB: %w", sizeMB, err)
			t.mu.Lock()
			delete(t.templates, sizeMB)
			t.mu.Unlock()
		} else {
			tt.path = path
		}
		close(tt.ready)
	}
	select {
	case <-tt.ready:
		return tt.path, tt.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

// tmpImageEnv names, in a new sandbox init's environment, the /tmp image
// it may mount ahead of its config (see stageTmp).
const tmpImageEnv = "INVOKEX_TMP_IMAGE"

// stageTmp mounts the ext4 image as a detached mount (not yet anywhere in
// a tree) through a loop device that clears itself when the mount goes,
// and returns the mount's descriptor for attachTmp. A warm sandbox stages
// its /tmp while it waits, which keeps the mount (~3 ms) off the cold
// start; closing the descriptor unmounts it. Runs in the sandbox's init,
// as root.
func stageTmp(image string) (int, error) {
	dev, err := attachLoop(image)
	if err != nil {
		return -1, fmt.Errorf("attaching /tmp's image: %w", err)
	}
	// The mount holds the device once made; closing ours lets autoclear
	// act when the mount goes.
	defer dev.Close()
	fsfd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("mounting /tmp: fsopen: %w", err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetString(fsfd, "source", dev.Name()); err != nil {
		return -1, fmt.Errorf("mounting /tmp: source: %w", err)
	}
	// noinit_itable: the image is a fresh sparse file whose inode tables
	// read as zeroes already; the kernel need not write them.
	if err := unix.FsconfigSetFlag(fsfd, "noinit_itable"); err != nil {
		return -1, fmt.Errorf("mounting /tmp: noinit_itable: %w", err)
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return -1, fmt.Errorf("mounting /tmp: %w", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, unix.MOUNT_ATTR_NOSUID|unix.MOUNT_ATTR_NODEV)
	if err != nil {
		return -1, fmt.Errorf("mounting /tmp: fsmount: %w", err)
	}
	return mfd, nil
}

// attachTmp puts the staged mount mfd at dst, mode 1777, and closes mfd.
func attachTmp(mfd int, dst string) error {
	defer unix.Close(mfd)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("creating mount point %s: %w", dst, err)
	}
	if err := unix.MoveMount(mfd, "", unix.AT_FDCWD, dst, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return fmt.Errorf("mounting /tmp on %s: %w", dst, err)
	}
	// Lambda's /tmp starts empty; mkfs's root-only lost+found would be
	// the one entry the function cannot remove.
	if err := os.Remove(filepath.Join(dst, "lost+found")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("emptying /tmp: %w", err)
	}
	return os.Chmod(dst, 0o777|os.ModeSticky)
}

// mountTmp mounts the sandbox's /tmp at dst: the staged mount (stagedFD,
// -1 if none) when cfg says it is the sandbox's image, else cfg's image,
// else a tmpfs of EphemeralMB. A staged mount not used is unmounted.
func mountTmp(cfg *sandboxConfig, stagedFD int, dst string) error {
	if stagedFD >= 0 {
		if cfg.TmpStaged {
			return attachTmp(stagedFD, dst)
		}
		unix.Close(stagedFD) // another size: unmounted, its device cleared
	}
	if cfg.TmpImage != "" {
		mfd, err := stageTmp(cfg.TmpImage)
		if err != nil {
			return err
		}
		return attachTmp(mfd, dst)
	}
	opts := "size=" + strconv.Itoa(cfg.EphemeralMB) + "m,mode=1777"
	return mountAt("tmpfs", dst, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts)
}

// attachLoop binds a free loop device to the file at path, set to clear
// itself on its last close (LO_FLAGS_AUTOCLEAR), with direct I/O where the
// file's file system allows it (the file's own page cache would hold
// every byte twice). It returns the open device.
func attachLoop(path string) (*os.File, error) {
	backing, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer backing.Close() // the device holds its own reference
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer ctl.Close()
	// Another attach may take the device between GET_FREE and CONFIGURE
	// (EBUSY): ask for another one.
	for range 16 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		dev, err := os.OpenFile("/dev/loop"+strconv.Itoa(n), os.O_RDWR, 0)
		if err != nil {
			return nil, err
		}
		err = configureLoop(dev, backing, unix.LO_FLAGS_AUTOCLEAR|unix.LO_FLAGS_DIRECT_IO)
		if errors.Is(err, unix.EINVAL) {
			// No direct I/O on the file's file system (tmpfs).
			err = configureLoop(dev, backing, unix.LO_FLAGS_AUTOCLEAR)
		}
		if err == nil {
			return dev, nil
		}
		dev.Close()
		if !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("LOOP_CONFIGURE: %w", err)
		}
	}
	return nil, fmt.Errorf("LOOP_CONFIGURE: every free loop device was taken: %w", unix.EBUSY)
}

// configureLoop binds dev to backing with flags (LOOP_CONFIGURE, Linux
// 5.8: one call where LOOP_SET_FD and LOOP_SET_STATUS64 were two).
func configureLoop(dev, backing *os.File, flags uint32) error {
	var cfg unix.LoopConfig
	cfg.Fd = uint32(backing.Fd())
	cfg.Info.Flags = flags
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, dev.Fd(), unix.LOOP_CONFIGURE, uintptr(unsafe.Pointer(&cfg))); errno != 0 {
		return errno
	}
	return nil
}
