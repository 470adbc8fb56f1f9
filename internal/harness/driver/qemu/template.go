package qemu

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/invokex/invokex/internal/guest"
	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/protocol"
)

// Spare templates. A spare VM (vmm.SpareMachine) is booted ahead of need
// so that a cold start skips the boot. Rather than booting each spare,
// the driver boots the first spare of a shape once more as a *template*
// (its RAM in a file), snapshots it while its init waits for an
// assignment, and restores every later spare of that shape from the
// snapshot, as SnapStart restores a version's: tens of milliseconds
// instead of a boot, the RAM a copy-on-write mapping of the template's
// file shared by all of them. A restored spare is sent a
// protocol.Renewal before it reports ready: its kernel takes the host's
// clock and fresh randomness (every restore starts from the same memory;
// nothing of a function has run in it yet).
//
// Under TCG this is what makes spares pay: a booted VM's cache of
// translated code is full of the boot's (the kernel's init, run once) and
// is emptied when full, mid-way through the cold start that takes the
// spare. A restored spare starts with an empty cache, and the renewal's
// warm-up (see package vminit) fills it with exactly the kernel's and the
// agent's paths every cold start takes: the cold start then translates
// only the function's own code and the cache holds it all.

// templateRetry is how long a shape whose template could not be made
// boots its spares before the next attempt.
const templateRetry = time.Minute

// templateMax bounds the templates a driver keeps (each holds a copy of a
// booted guest's memory on disk, ~35 MB for 128 MB); the least recently
// used goes first. The spare pool keeps spares for few shapes anyway.
const templateMax = 4

// templates are a driver's spare templates, one per shape
// (vmm.Host.ShapeKey). Safe for concurrent use.
type templates struct {
	d  *Driver
	mu sync.Mutex
	// byKey are the templates made or being made; failed ones stay, so a
	// shape whose template cannot be made boots its spares.
	byKey map[string]*template
}

// template is one shape's template.
type template struct {
	// ready is closed once src or err is set.
	ready chan struct{}
	src   *snapSource
	err   error
	// dir is the template's own directory (vmm.Host.OwnDir).
	dir  string
	used time.Time
	// done is when the attempt ended.
	done time.Time
}

// close releases tp's sealed RAM (restores that have it keep their copy).
func (tp *template) close() {
	if tp.src != nil && tp.src.ram != nil {
		tp.src.ram.Close()
	}
}

// close releases every made template's sealed RAM; the Host removes
// their directories. After Close no restore runs (one being made fails).
func (t *templates) close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for key, tp := range t.byKey {
		if tp.ended() {
			tp.close()
			delete(t.byKey, key)
		}
	}
}

// ended reports whether tp's attempt has ended (made or failed).
func (tp *template) ended() bool {
	select {
	case <-tp.ready:
		return true
	default:
		return false
	}
}

// failedLocked reports whether tp is an attempt that failed.
func (tp *template) failedLocked() bool { return tp.ended() && tp.err != nil }

func newTemplates(d *Driver) *templates {
	return &templates{d: d, byKey: map[string]*template{}}
}

// get returns the template of spec's shape, making it if there is none:
// one boot, by the first caller; later ones wait for it. An error means
// spares of this shape boot (it is logged once, by the caller that made
// the attempt).
func (t *templates) get(ctx context.Context, spec driver.Spec) (*snapSource, error) {
	key, ok := t.d.host.ShapeKey(ctx, spec)
	if !ok {
		return nil, fmt.Errorf("no template for this shape")
	}
	t.mu.Lock()
	tp, found := t.byKey[key]
	if found && tp.failedLocked() && time.Since(tp.done) > templateRetry {
		delete(t.byKey, key)
		found = false
	}
	if !found {
		t.evictLocked()
		tp = &template{ready: make(chan struct{})}
		t.byKey[key] = tp
	}
	tp.used = time.Now()
	t.mu.Unlock()
	if !found {
		src, dir, err := t.make(ctx, spec, key)
		t.mu.Lock()
		tp.src, tp.dir, tp.err, tp.done = src, dir, err, time.Now()
		t.mu.Unlock()
		if tp.err != nil && ctx.Err() != nil {
			// Given up on, not failed: the next spare tries again.
			t.mu.Lock()
			delete(t.byKey, key)
			t.mu.Unlock()
		} else if tp.err != nil {
			t.d.log.Warn("spare vms of this shape boot: making their template failed", "shape", spec.Runtime.ID, "memory_mb", spec.MemoryMB, "err", tp.err)
		}
		close(tp.ready)
	}
	select {
	case <-tp.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	t.mu.Lock() // failed may change them
	defer t.mu.Unlock()
	return tp.src, tp.err
}

// made returns the template of spec's shape if it has been made (nil if
// not, or if it is being made: a cold start does not wait for it).
func (t *templates) made(ctx context.Context, spec driver.Spec) *snapSource {
	key, ok := t.d.host.ShapeKey(ctx, spec)
	if !ok {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	tp, found := t.byKey[key]
	if !found || !tp.ended() {
		return nil
	}
	tp.used = time.Now()
	return tp.src // nil if it failed
}

// failed drops the template src after a restore from it failed: its
// files go, and spares of its shape boot until templateRetry has passed
// (a template that cannot be restored would otherwise be made again for
// every spare, and no spare would ever be ready).
func (t *templates) failed(src *snapSource, err error) {
	t.mu.Lock()
	var dirs []string
	for _, tp := range t.byKey {
		if tp.src == src && !tp.failedLocked() {
			tp.close()
			tp.src, tp.err, tp.done = nil, fmt.Errorf("restoring from the template failed: %w", err), time.Now()
			dirs = append(dirs, tp.dir)
		}
	}
	t.mu.Unlock()
	for _, dir := range dirs {
		// A restore that opened the files already keeps them.
		_ = os.RemoveAll(dir)
	}
}

// evictLocked makes room for one more template.
func (t *templates) evictLocked() {
	for len(t.byKey) >= templateMax {
		var oldest string
		for key, tp := range t.byKey {
			if !tp.ended() {
				continue // being made
			}
			if oldest == "" || tp.used.Before(t.byKey[oldest].used) {
				oldest = key
			}
		}
		if oldest == "" {
			return
		}
		// A restore that opened its files already keeps them.
		t.byKey[oldest].close()
		_ = os.RemoveAll(t.byKey[oldest].dir)
		delete(t.byKey, oldest)
	}
}

// make boots a spare of spec's shape as a template VM (RAM in a file),
// snapshots it (which stops it) into a directory of the driver's own, and
// returns the snapshot.
func (t *templates) make(ctx context.Context, spec driver.Spec, key string) (*snapSource, string, error) {
	sum := sha256.Sum256([]byte(key))
	dir, err := t.d.host.OwnDir("template-" + hex.EncodeToString(sum[:8]))
	if err != nil {
		return nil, "", fmt.Errorf("making the spare template: %w", err)
	}
	fail := func(err error) (*snapSource, string, error) {
		_ = os.RemoveAll(dir)
		return nil, "", fmt.Errorf("making the spare template: %w", err)
	}
	var id [6]byte
	_, _ = rand.Read(id[:])
	name := "template-vm-" + hex.EncodeToString(id[:])
	tspec := spec
	tspec.ForSnapshot = true // its RAM in a file, which the snapshot keeps
	if _, err := t.d.host.BootTemplate(ctx, name, tspec, func(base *vmm.Instance) *instance {
		i := t.d.newInstance(base)
		i.template = true
		return i
	}); err != nil {
		return fail(err)
	}
	snap := filepath.Join(dir, "snapshot")
	if err := t.d.Snapshot(ctx, name, snap); err != nil {
		return fail(err)
	}
	b, err := os.ReadFile(filepath.Join(snap, snapMetaFile))
	if err != nil {
		return fail(err)
	}
	src := &snapSource{dir: snap}
	if err := json.Unmarshal(b, &src.meta); err != nil {
		return fail(err)
	}
	if src.ram, err = sealRAM(ctx, filepath.Join(snap, snapRAM)); err != nil {
		return fail(err)
	}
	t.d.log.Debug("spare template made", "dir", snap, "config", src.meta.Config.String())
	return src, dir, nil
}

// templateCacheMB is the TCG cache of a VM restored from a template: twice
// a booted VM's (Options.TCGCacheMB). A booted VM's cache fills with the
// boot's code, run once, and is best emptied early (a small cache); a
// restored VM translates no boot, only what it runs again (the warm-up's
// kernel and agent paths, then the function's), which should all stay:
// ~40 MB for a Go function's cold start after a warm-up. It costs host
// memory only as it fills.
func (d *Driver) templateCacheMB() int {
	mb := d.opts.TCGCacheMB
	if mb <= 0 {
		mb = DefaultTCGCacheMB
	}
	return 2 * mb
}

// errFromTemplate marks a failed restore of a template: Driver.Start
// then boots the instance instead.
var errFromTemplate = errors.New("restoring the spare template")

// sealRAM moves the template's saved RAM at path into a sealed memfd and
// removes the file. QEMU 7.2 opens a private mapping's file read-write
// (see Snapshot), so a file would be writable by every VM's user, and a
// guest that escaped into its QEMU could change what every later VM of
// the shape runs (a template serves every function of its shape) and the
// pages running ones have not written yet. A memfd sealed against writes
// (F_SEAL_WRITE: no write, no hole punched, no shared writable mapping;
// F_SEAL_SEAL: for good) can still be mapped privately by every restore,
// its pages shared as the file's were. It lives in memory (shmem) while
// the template does: ~30 MB for a 128 MB guest.
func sealRAM(ctx context.Context, path string) (*os.File, error) {
	in, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return nil, err
	}
	fd, err := unix.MemfdCreate("invokex-template-ram", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, fmt.Errorf("creating the template's memfd: %w", err)
	}
	ram := os.NewFile(uintptr(fd), "invokex-template-ram")
	if err := guest.CopySparseFile(ctx, in, ram, fi.Size()); err != nil {
		ram.Close()
		return nil, fmt.Errorf("copying the template's ram: %w", err)
	}
	const seals = unix.F_SEAL_WRITE | unix.F_SEAL_GROW | unix.F_SEAL_SHRINK | unix.F_SEAL_SEAL
	if _, err := unix.FcntlInt(ram.Fd(), unix.F_ADD_SEALS, seals); err != nil {
		ram.Close()
		return nil, fmt.Errorf("sealing the template's ram: %w", err)
	}
	if err := os.Remove(path); err != nil {
		ram.Close()
		return nil, err
	}
	return ram, nil
}

// dupFile is a descriptor of its own for f's open file.
func dupFile(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// bootFromTemplate restores the VM from the template src and renews it,
// warming it up if warmUp; it returns once the guest has written its
// spare line again. A failed restore drops the template, and its error
// wraps errFromTemplate.
func (i *instance) bootFromTemplate(ctx context.Context, spec driver.Spec, src *snapSource, warmUp bool) error {
	i.from, i.cacheMB = src, i.d.templateCacheMB()
	if err := i.bootRestored(ctx, spec); err != nil {
		if ctx.Err() != nil {
			return err // given up on (Stop, or the caller): not the template's fault
		}
		i.d.templates.failed(src, err)
		return fmt.Errorf("%w: %w", errFromTemplate, err)
	}
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	r := protocol.Renewal{
		Restore: protocol.Restore{HostUnixNano: time.Now().UnixNano(), Seed: seed},
		WarmUp:  warmUp,
	}
	began := time.Now()
	if err := i.RenewSpare(ctx, i.d.opts.ReadyTimeout, r); err != nil {
		if ctx.Err() != nil {
			return err
		}
		// The guest, not necessarily the template: it stays.
		return fmt.Errorf("%w: %w", errFromTemplate, err)
	}
	i.Log().Debug("vm restored from its shape's spare template", "renewal", time.Since(began), "warm_up", r.WarmUp)
	return nil
}

// startFromTemplate is Boot from the template src with the code image
// code: what a cold start does with a spare, without the spare. Without
// the warm-up, which would cost the cold start what it saves it, the
// restore and renewal take a fraction of a boot. An error wraps
// errFromTemplate unless ctx ended: Driver.Start then boots instead.
func (i *instance) startFromTemplate(ctx context.Context, spec driver.Spec, src *snapSource, code string) error {
	if err := i.bootFromTemplate(ctx, spec, src, false); err != nil {
		return err
	}
	// Failures from here on are this VM's, not the template's; the
	// instance boots instead, as after a failed assignment of a spare.
	err := i.attachCode(ctx, code)
	if err == nil {
		i.launched.code = code
		err = i.SendAssignment(ctx, i.d.opts.ReadyTimeout)
	}
	if err != nil && ctx.Err() == nil {
		return fmt.Errorf("%w: %w", errFromTemplate, err)
	}
	return err
}

// spareCode returns spec's code image if a VM restored from a template
// can take it (it fits a spare's code disk); ok is false otherwise, and
// the VM boots (which reports what is wrong with the image, if anything).
func (i *instance) spareCode(ctx context.Context, spec driver.Spec) (code string, ok bool) {
	code, err := i.d.host.CodeImage(ctx, spec)
	if err != nil {
		return "", false
	}
	fi, err := os.Stat(code)
	return code, err == nil && fi.Size() <= vmm.SpareCodeBytes
}
