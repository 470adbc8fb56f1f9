package qemu

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/invokex/invokex/internal/harness/driver"
	"github.com/invokex/invokex/internal/harness/driver/hostproc"
	"github.com/invokex/invokex/internal/harness/driver/vmm"
	"github.com/invokex/invokex/internal/harness/network"
)

// instance is one VM: the state every VM has (vmm.Instance) and QEMU's
// own. Its fields are set by Boot and read-only once Start has returned.
type instance struct {
	*vmm.Instance
	d *Driver
	// uid is the user QEMU runs as (0: the driver's own).
	uid int
	// from is the snapshot a restored VM boots from (nil: a fresh boot).
	from *snapSource
	// cfg and disks are what the VM was launched with, for Snapshot.
	cfg      vmConfig
	launched vmDisks
	// rec is the VM's record, which Assign rewrites.
	rec *record
	// net is the VM's network namespace and tap (Options.Network and
	// Spec.Network), nil without; Release closes it.
	net *network.VMNet
	// template: booted as a spare template (see template.go), to be
	// snapshotted. noTemplate: booted even if its shape has a template (after a
	// restore from the template failed).
	template, noTemplate bool
	// cacheMB, if set, is the TCG cache of a restored VM (vmConfig.TCGCacheMB).
	cacheMB int
}

var _ vmm.SpareMachine = (*instance)(nil)

var _ vmm.Machine = (*instance)(nil)

// newInstance is the machine of a VM about to start: a driver running as
// root runs it as the user of its slot (see Options.UIDBase).
func (d *Driver) newInstance(base *vmm.Instance) *instance {
	i := &instance{Instance: base, d: d}
	if d.asRoot == "" {
		i.uid = d.opts.UIDBase + base.Slot()
	}
	return i
}

// Boot records the VM, makes its disks, starts QEMU and waits until the
// agent inside is ready; see vmm.Machine.
func (i *instance) Boot(ctx context.Context, spec driver.Spec) error {
	if i.from != nil {
		return i.bootRestored(ctx, spec)
	}
	if i.d.templates != nil && !i.noTemplate {
		if src := i.d.templates.made(ctx, spec); src != nil {
			if code, ok := i.spareCode(ctx, spec); ok {
				return i.startFromTemplate(ctx, spec, src, code)
			}
		}
	}
	return i.boot(ctx, spec, false)
}

// BootSpare restores a spare VM from its shape's template (making the
// template first if there is none), or boots it if templates are off or
// its template cannot be made; see vmm.SpareMachine and template.go.
func (i *instance) BootSpare(ctx context.Context, spec driver.Spec) error {
	if i.template || i.d.templates == nil {
		return i.boot(ctx, spec, true)
	}
	src, err := i.d.templates.get(ctx, spec)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return i.boot(ctx, spec, true)
	}
	return i.bootFromTemplate(ctx, spec, src, i.d.accel == accelTCG)
}

// boot is Boot, or BootSpare if spare.
func (i *instance) boot(ctx context.Context, spec driver.Spec, spare bool) error {
	d := i.d
	i.rec = &record{Record: vmm.NewRecord(spec), QEMU: d.opts.QEMUPath, AgentSocket: agentSock, QMPSocket: qmpSock}
	rec := i.rec
	rec.UID = i.uid
	if err := i.Create(rec); err != nil {
		return err
	}
	disks, err := i.disks(ctx, spec, spare)
	if err != nil {
		return err
	}
	cfg := vmConfig{
		ID: spec.ID, Accel: d.accel,
		MemoryMB: spec.MemoryMB, VCPUs: d.host.VCPUs(spec.MemoryMB), AgentCPU: d.host.AgentCPU(),
		TSCkHz: d.tscKHz, KernelHz: d.kernelHz, TCGCacheMB: d.opts.TCGCacheMB,
		Network: spec.Network, Spare: spare,
	}
	if err := i.connect(ctx, &cfg); err != nil {
		return err
	}
	launched := time.Now()
	var ram *os.File
	if spec.ForSnapshot {
		f, err := i.ramFile(spec.MemoryMB)
		if err != nil {
			return err
		}
		defer f.Close() // QEMU has its own copy
		ram, cfg.RAMFile = f, true
	}
	if err := i.launch(cfg, disks, &rec.Record, nil, ram); err != nil {
		return err
	}
	if err := i.Record(rec); err != nil {
		return err
	}
	if spare {
		err = i.waitSpare(ctx)
	} else {
		err = i.waitReady(ctx)
	}
	if err != nil {
		return err
	}
	i.Log().Debug("vm ready", "boot", time.Since(launched), "disks", launched.Sub(rec.Created), "config", cfg.String(), "spare", spare)
	return nil
}

// Assign makes a spare the instance of spec; see vmm.SpareMachine.
func (i *instance) Assign(ctx context.Context, spec driver.Spec, code string) error {
	began := time.Now()
	// Renamed before the record says so: a crash in between leaves a
	// record naming the spare (ID), which is QEMU's -name all the same.
	if err := i.Rename(); err != nil {
		return err
	}
	i.rec.ID, i.rec.Function, i.rec.RevisionID, i.rec.Machine = spec.ID, spec.Function, spec.RevisionID, i.Name()
	if err := i.Record(i.rec); err != nil {
		return err
	}
	renamed := time.Now()
	if err := i.attachCode(ctx, code); err != nil {
		return err
	}
	attached := time.Now()
	i.launched.code = code
	if err := i.SendAssignment(ctx, i.d.opts.ReadyTimeout); err != nil {
		return err
	}
	i.Log().Debug("spare vm assigned", "spare", i.Name(), "took", time.Since(began),
		"record", renamed.Sub(began), "attach", attached.Sub(renamed), "guest", time.Since(attached))
	return nil
}

// attachCode puts the code image at path in the place of a spare's
// placeholder: QEMU gets the image as a descriptor set, opens it as a new
// file node, and the code disk's raw node is reopened over it (QMP
// blockdev-reopen); the guest, which has not read the disk, then reads
// the image.
func (i *instance) attachCode(ctx context.Context, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("opening the code image: %w", err)
	}
	defer f.Close() // QEMU has its own copy
	q, err := dialQMP(ctx, filepath.Join(i.Dir(), qmpSock))
	if err != nil {
		return err
	}
	defer q.Close()
	set, err := q.AddFD(ctx, f)
	if err != nil {
		return err
	}
	const imageNode = "code-image"
	steps := []struct {
		cmd  string
		args any
	}{
		{"blockdev-add", map[string]any{"driver": "file", "node-name": imageNode, "filename": "/dev/fdset/" + strconv.Itoa(set.ID), "read-only": true}},
		{"blockdev-reopen", map[string]any{"options": []map[string]any{{"driver": "raw", "node-name": codeNode, "file": imageNode, "read-only": true}}}},
		{"blockdev-del", map[string]any{"node-name": codeFileNode}},
		// The file node holds its own copy of the descriptor.
		{"remove-fd", map[string]any{"fdset-id": set.ID}},
	}
	for _, s := range steps {
		if err := q.Execute(ctx, s.cmd, s.args, nil); err != nil {
			return fmt.Errorf("attaching the code image: %w", err)
		}
	}
	return nil
}

// ramFile creates the file a VM to be snapshotted keeps its RAM in (sparse,
// the VM's user's) and opens it.
func (i *instance) ramFile(memoryMB int) (*os.File, error) {
	path := filepath.Join(i.Dir(), ramImage)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating the ram file: %w", err)
	}
	if err := f.Truncate(int64(memoryMB) << 20); err != nil {
		f.Close()
		return nil, fmt.Errorf("sizing the ram file: %w", err)
	}
	if i.uid != 0 {
		if err := f.Chown(i.uid, i.uid); err != nil {
			f.Close()
			return nil, fmt.Errorf("handing the ram file to the vm user: %w", err)
		}
	}
	return f, nil
}

// vmDisks are an instance's kernel and images.
type vmDisks struct {
	kernel, root, code, scratch string
}

// disks makes the root, code and scratch images; a spare has no code
// image (its descriptor is /dev/null, which QEMU never opens).
func (i *instance) disks(ctx context.Context, spec driver.Spec, spare bool) (vmDisks, error) {
	scratch := filepath.Join(i.Dir(), scratchImage)
	var root, code string
	var err error
	if spare {
		code = os.DevNull
		root, err = i.d.host.SpareDisks(ctx, spec, scratch)
	} else {
		root, code, err = i.d.host.Disks(ctx, spec, scratch)
	}
	if err != nil {
		return vmDisks{}, err
	}
	if i.uid != 0 {
		// QEMU re-opens the scratch disk through its descriptor, which
		// checks the file's own permissions.
		if err := os.Chown(scratch, i.uid, i.uid); err != nil {
			return vmDisks{}, fmt.Errorf("handing the scratch image to the vm user: %w", err)
		}
	}
	return vmDisks{kernel: i.d.opts.KernelPath, root: root, code: code, scratch: scratch}, nil
}

// launch binds the instance's sockets, opens its kernel and disks and
// starts QEMU with them as inherited descriptors (then state, if not nil,
// as fdState), as the instance's own unprivileged user when the driver is
// root.
func (i *instance) launch(cfg vmConfig, disks vmDisks, rec *vmm.Record, state, ram *os.File) error {
	d := i.d
	i.cfg, i.launched = cfg, disks
	var files []*os.File
	defer func() {
		// QEMU has its copies; the driver's would keep a dead VM's
		// sockets accepting into a backlog nobody serves.
		for _, f := range files {
			f.Close()
		}
	}()
	for _, s := range []string{agentSock, qmpSock} {
		f, err := listenUnix(filepath.Join(i.Dir(), s))
		if err != nil {
			return err
		}
		files = append(files, f)
	}
	for _, p := range []string{disks.kernel, disks.root, disks.code} {
		f, err := os.Open(p)
		if err != nil {
			return fmt.Errorf("opening vm image: %w", err)
		}
		files = append(files, f)
	}
	f, err := os.OpenFile(disks.scratch, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("opening scratch image: %w", err)
	}
	files = append(files, f)
	if state != nil {
		files = append(files, state)
	}
	if ram != nil {
		cfg.RAMFD = 3 + len(files)
		files = append(files, ram)
	}
	if i.net != nil && i.net.Tap != nil {
		// The tap lives while QEMU holds it (and its namespace until
		// Release): the driver's copy is closed with the others.
		cfg.TapFD = 3 + len(files)
		files = append(files, i.net.Tap)
		i.net.Tap = nil
	}

	cfg.ClockUnixMs = time.Now().UnixMilli()
	cmd := exec.Command(d.opts.QEMUPath, cfg.args()...)
	cmd.ExtraFiles = files // fdAgent, fdQMP, fdKernel, fdRoot, fdCode, fdScratch[, fdState]
	// QEMU needs nothing of the harness's directory or environment.
	cmd.Dir = "/"
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	// Setsid: a terminal's Ctrl-C reaches only the server, which then
	// stops VMs in order. Pdeathsig: a harness that dies takes its VMs.
	attr := &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setsid: true}
	if i.uid != 0 {
		attr.Credential = &syscall.Credential{Uid: uint32(i.uid), Gid: uint32(i.uid), Groups: d.vmGroups}
	}
	cmd.SysProcAttr = attr
	i.Log().Debug("starting vm", "config", cfg.String(), "uid", i.uid, "args", cmd.Args)
	return i.Launch(cmd, rec)
}

// waitReady connects to the agent socket and waits for the guest's ready
// line. The socket is bound before QEMU starts, so the connection waits
// in its backlog until QEMU accepts it; QEMU exiting first resets it,
// which ends the wait with QEMU's output in the error.
func (i *instance) waitReady(ctx context.Context) error {
	ctx, cancel := i.ReadyContext(ctx, i.d.opts.ReadyTimeout)
	defer cancel()
	return i.AwaitAgent(ctx, "connecting to the agent socket", func(ctx context.Context) (net.Conn, error) {
		return hostproc.DialUnix(ctx, filepath.Join(i.Dir(), agentSock))
	})
}

// waitSpare connects to the agent socket like waitReady and waits for a
// spare's line.
func (i *instance) waitSpare(ctx context.Context) error {
	ctx, cancel := i.ReadyContext(ctx, i.d.opts.ReadyTimeout)
	defer cancel()
	return i.AwaitSpare(ctx, "connecting to the agent socket", func(ctx context.Context) (net.Conn, error) {
		return hostproc.DialUnix(ctx, filepath.Join(i.Dir(), agentSock))
	})
}

// Ask asks QEMU to exit: QMP quit, or SIGTERM (which QEMU also treats as
// a request to quit) when QMP does not answer; see vmm.Machine.
func (i *instance) Ask(ctx context.Context, grace time.Duration) {
	select {
	case <-i.Done():
		return
	default:
	}
	qctx, cancel := context.WithTimeout(ctx, min(grace, qmpQuitTimeout))
	defer cancel()
	q, err := dialQMP(qctx, filepath.Join(i.Dir(), qmpSock))
	if err == nil {
		err = q.Quit(qctx)
		q.Close()
	}
	if err != nil {
		i.Log().Debug("qmp quit failed; sending SIGTERM", "err", err)
		_ = i.Cmd().Process.Signal(syscall.SIGTERM)
	}
}

// Release closes the VM's network (its namespace goes once QEMU, holding
// the tap, has exited); all else a VM holds besides its QEMU is in the
// instance directory, and its user is its slot's.
func (i *instance) Release(context.Context) error {
	if i.net == nil {
		return nil
	}
	err := i.net.Close()
	i.net = nil
	return err
}

// connect gives a VM whose cfg asks for a network its namespace and tap
// when the driver has a network manager (else the VM uses QEMU's
// user-mode network, which reaches the host).
func (i *instance) connect(ctx context.Context, cfg *vmConfig) error {
	mgr := i.d.opts.Network
	if !cfg.Network || mgr == nil {
		cfg.Tap = false
		if cfg.Network && i.d.sharedNet.CompareAndSwap(false, true) {
			i.d.log.Warn("vm isolation degraded", "reason", sharedNetNote)
		}
		return nil
	}
	v, err := mgr.NewVMNet(ctx, network.TapOptions{})
	if err != nil {
		return fmt.Errorf("connecting the vm's network: %w", err)
	}
	i.net, cfg.Tap, cfg.DNS = v, true, network.KernelDNS(mgr.DNS())
	return nil
}
