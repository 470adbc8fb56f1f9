package agent

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/protocol"
)

// Renew makes a kernel restored from a snapshot a new environment, as the
// Restore frame does: the host's clock, fresh randomness, the hostname if
// set. For a VM's init that renews a spare restored from a template
// (protocol.Renewal) before any agent runs; it acts on the kernel.
func Renew(req protocol.Restore) error { return renew(req) }

// renewEnv is renew; tests replace it (they must never act on the host).
var renewEnv = renew

// renew makes a kernel restored from a snapshot a new environment: the
// host's clock, fresh randomness, the new hostname. Only for an agent that
// owns its kernel (see Options.OwnsKernel).
func renew(req protocol.Restore) error {
	if req.HostUnixNano > 0 {
		if err := setClock(req.HostUnixNano); err != nil {
			return fmt.Errorf("setting the clock: %w", err)
		}
	}
	if len(req.Seed) > 0 {
		if err := reseed(req.Seed); err != nil {
			return fmt.Errorf("reseeding the kernel's random generator: %w", err)
		}
	}
	if req.Hostname != "" {
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("setting the hostname: %w", err)
		}
	}
	return nil
}

// reseed credits seed to the kernel's entropy pool and makes the kernel's
// generator reseed from the pool at once: every restore of a snapshot
// starts from the same generator state, and without this they would hand
// the same "random" bytes to every environment (getrandom, /dev/urandom,
// and so every runtime's own generator seeded from them).
func reseed(seed []byte) error {
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(seed))
	binary.NativeEndian.PutUint32(info[0:], uint32(len(seed)*8))
	binary.NativeEndian.PutUint32(info[4:], uint32(len(seed)))
	copy(info[8:], seed)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", errno)
	}
	return nil
}
