package guest

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

const (
	// rootImageVersion changes when what RootImage adds to a tree changes.
	rootImageVersion = "root-image-1"
	// tinyRootVersion changes when the provided runtimes' tiny root changes.
	tinyRootVersion = "tiny-root-1"
	// sandboxUser is Lambda's runtime user (uid and gid 993), as in the
	// process sandbox.
	sandboxUser = "sbx_user1051"
	sandboxUID  = 993
)

// hostCACerts is copied into tiny roots so that static functions can make
// TLS connections (Lambda's provided runtimes ship a CA bundle).
var hostCACerts = "/etc/ssl/certs/ca-certificates.crt"

// ErrNotStatic is returned for an agent binary that needs a dynamic loader.
var ErrNotStatic = errors.New("the agent binary must be static: build invokex with CGO_ENABLED=0")

// CheckStatic returns nil if path is an x86-64 ELF executable without a
// program interpreter (PT_INTERP): the guest's root has no dynamic loader
// the agent could use. Errors wrap ErrNotStatic and ErrInvalidParameter.
func CheckStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("inspecting agent binary %s: %w: %w", path, err, errdefs.ErrInvalidParameter)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 || f.Class != elf.ELFCLASS64 {
		return fmt.Errorf("agent binary %s is %s/%s, the guest is x86-64: %w", path, f.Class, f.Machine, errdefs.ErrInvalidParameter)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s: %w: %w", path, ErrNotStatic, errdefs.ErrInvalidParameter)
		}
	}
	return nil
}

// RootImage returns the root file system image (read-only ext4, the VM's
// /dev/vda) for rt with agentBin as /sbin/init, building it if needed.
//
// The tree comes from, in order: the root last imported or built for
// rt.ID (ImportRoot, BuildRoot); for provided.* runtimes a tiny root made
// here (the agent, /etc with the sandbox user, a CA bundle and the mount
// points); for python and nodejs runtimes a Debian root built with BuildRoot
// (minutes, once). For interpreted runtimes the tree must hold rt's
// interpreter (rt.Interpreter, or the Debian recipe's path when empty).
//
// Images are cached under cacheDir/images by a digest of the tree, the
// agent binary and this recipe, so a new agent binary costs one mkfs (a
// few seconds), not a new tree. Errors: ErrInvalidParameter for a
// non-static agent or a tree without the interpreter, ErrInvalidRuntime for
// a runtime with no recipe and no imported root.
func RootImage(ctx context.Context, cacheDir string, rt *runtimes.Runtime, agentBin string) (string, error) {
	if rt == nil || rt.ID == "" || strings.ContainsAny(rt.ID, "/\x00") || strings.HasPrefix(rt.ID, ".") {
		return "", fmt.Errorf("root image: bad runtime: %w", errdefs.ErrInvalidParameter)
	}
	if err := CheckStatic(agentBin); err != nil {
		return "", err
	}
	agentSum, err := cachedSHA256(agentBin)
	if err != nil {
		return "", fmt.Errorf("reading agent binary: %w", err)
	}
	tree, treeID, err := rootTree(ctx, cacheDir, rt)
	if err != nil {
		return "", err
	}
	if tree != "" {
		// Checked on every call, cached image or not: the runtime row may
		// have changed since the image was made.
		if err := checkTreeInterpreter(tree, rt); err != nil {
			return "", err
		}
	}
	d := digest([]byte(rootImageVersion), []byte(rt.ID), []byte(treeID), []byte(agentSum))
	dir := filepath.Join(cacheDir, "images")
	out := filepath.Join(dir, rt.ID+"-"+d+".ext4")
	if exists(out) {
		markUsed(out)
		return out, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating image cache: %w", err)
	}
	unlock, err := lock(ctx, cacheDir, "image-"+rt.ID+"-"+d)
	if err != nil {
		return "", err
	}
	defer unlock()
	if exists(out) {
		return out, nil
	}
	if tree == "" {
		err = tinyRootImage(ctx, dir, out, agentBin)
	} else {
		err = treeRootImage(ctx, cacheDir, rt, tree, out, agentBin)
	}
	if err != nil {
		return "", fmt.Errorf("building the %s root image: %w", rt.ID, err)
	}
	pruneRootImages(dir, rt.ID, out, time.Now().Add(-unusedImageAge))
	return out, nil
}

// unusedImageAge is how long a root image may go unused before a newer
// image of the same runtime replaces it in the cache.
const unusedImageAge = time.Hour

// markUsed stamps an image's mtime with now: the cache's record of use.
func markUsed(path string) {
	now := time.Now()
	_ = os.Chtimes(path, now, now)
}

// pruneRootImages removes the root images of runtime id other than keep
// that nobody has used since before cutoff. Every new agent binary or root
// tree makes a new image (hundreds of MB for a Debian runtime), so without
// this the cache only grows. A VM still running on a removed image is
// unaffected (its QEMU holds the file open); a server that wants the image
// again builds it again.
func pruneRootImages(dir, id, keep string, cutoff time.Time) {
	matches, err := filepath.Glob(filepath.Join(dir, id+"-*.ext4"))
	if err != nil {
		return
	}
	for _, m := range matches {
		// Only this runtime's images: for id "foo", "foo-bar-<digest>" is
		// runtime foo-bar's.
		d := strings.TrimSuffix(strings.TrimPrefix(filepath.Base(m), id+"-"), ".ext4")
		if m == keep || d == "" || strings.ContainsAny(d, "-.") {
			continue
		}
		if fi, err := os.Stat(m); err == nil && fi.ModTime().Before(cutoff) {
			_ = os.Remove(m)
		}
	}
}

// rootTree finds the tree RootImage uses for rt: the current imported or
// built tree, "" for the tiny root, or a freshly built Debian root.
func rootTree(ctx context.Context, cacheDir string, rt *runtimes.Runtime) (tree, id string, err error) {
	if tree, ok := CurrentRoot(cacheDir, rt.ID); ok {
		return tree, filepath.Base(tree), nil
	}
	if rt.Family == runtimes.FamilyProvided {
		certs, _ := fileSHA256(hostCACerts) // none is fine: no bundle then
		return "", tinyRootVersion + "-" + certs, nil
	}
	tree, err = BuildRoot(ctx, cacheDir, rt, slog.Default())
	if err != nil {
		return "", "", err
	}
	return tree, filepath.Base(tree), nil
}

// CurrentRoot returns the root tree that RootImage uses for runtimeID,
// if one was imported or built.
func CurrentRoot(cacheDir, runtimeID string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(cacheDir, "roots", runtimeID, "current"))
	if err != nil {
		return "", false
	}
	name := strings.TrimSpace(string(b))
	if name == "" || strings.ContainsAny(name, "/\x00") || strings.HasPrefix(name, ".") {
		return "", false
	}
	tree := filepath.Join(cacheDir, "roots", runtimeID, name)
	if fi, err := os.Stat(tree); err != nil || !fi.IsDir() {
		return "", false
	}
	return tree, true
}

// setCurrentRoot makes tree (a directory in cacheDir/roots/<runtimeID>)
// the one RootImage uses.
func setCurrentRoot(cacheDir, runtimeID, tree string) error {
	return writeFileAtomic(filepath.Join(cacheDir, "roots", runtimeID, "current"), []byte(filepath.Base(tree)+"\n"), 0o644)
}

// tinyRootImage builds the provided runtimes' root: the agent as
// /sbin/init, the mount points vminit needs, /etc and a CA bundle.
// Functions are static binaries; anything else they need comes in the
// code image (/var/task) or a layer.
func tinyRootImage(ctx context.Context, dir, out, agentBin string) error {
	stage, err := os.MkdirTemp(dir, ".stage-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(stage)
	if err := os.Chmod(stage, 0o755); err != nil {
		return err
	}
	r, err := openTree(stage)
	if err != nil {
		return err
	}
	defer r.Close()
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "lib", "usr/lib", "etc/ssl/certs", "root", "var/tmp"} {
		fd, err := r.mkdirAll(d)
		if err != nil {
			return err
		}
		closeFD(fd)
	}
	if err := prepareTree(r); err != nil {
		return err
	}
	if b, err := os.ReadFile(hostCACerts); err == nil {
		if err := r.writeFile("etc/ssl/certs/ca-certificates.crt", bytes.NewReader(b), 0o644); err != nil {
			return err
		}
	}
	if err := installAgent(r, agentBin); err != nil {
		return err
	}
	return makeImage(ctx, stage, out, imageOptions{label: "root", readOnly: true})
}

// treeRootImage adds the agent to a cached tree and images it. The tree is
// shared by every image of the runtime, so the write of /sbin/init and the
// mkfs that reads it hold the tree's lock.
func treeRootImage(ctx context.Context, cacheDir string, rt *runtimes.Runtime, tree, out, agentBin string) error {
	unlock, err := lock(ctx, cacheDir, "tree-"+rt.ID+"-"+filepath.Base(tree))
	if err != nil {
		return err
	}
	defer unlock()
	r, err := openTree(tree)
	if err != nil {
		return err
	}
	defer r.Close()
	if err := installAgent(r, agentBin); err != nil {
		return err
	}
	return makeImage(ctx, tree, out, imageOptions{label: "root", readOnly: true})
}

func checkTreeInterpreter(tree string, rt *runtimes.Runtime) error {
	r, err := openTree(tree)
	if err != nil {
		return err
	}
	defer r.Close()
	return checkInterpreter(r, rt)
}

// checkInterpreter makes sure an interpreted runtime's tree can run its
// bootstrap command: the harness runs rt.Bootstrap[0] (the interpreter) in
// the guest by the same path the runtimes DB has.
func checkInterpreter(r *treeRoot, rt *runtimes.Runtime) error {
	if rt.Family == runtimes.FamilyProvided {
		return nil
	}
	paths := []string{}
	if rt.Interpreter != "" {
		paths = append(paths, rt.Interpreter)
	}
	if len(rt.Bootstrap) > 0 && rt.Bootstrap[0] != rt.Interpreter && strings.HasPrefix(rt.Bootstrap[0], "/usr") {
		paths = append(paths, rt.Bootstrap[0])
	}
	if len(paths) == 0 {
		if rec, ok := DebianRecipe(rt.ID); ok {
			paths = append(paths, rec.Interpreter)
		}
	}
	for _, p := range paths {
		if !r.isExecutable(p) {
			return fmt.Errorf("the %s root has no executable %s (the runtime's interpreter): %w", rt.ID, p, errdefs.ErrInvalidParameter)
		}
	}
	return nil
}

// installAgent writes the agent as /sbin/init (through the tree's own
// /sbin symlink, if any, resolved inside the tree).
func installAgent(r *treeRoot, agentBin string) error {
	f, err := os.Open(agentBin)
	if err != nil {
		return err
	}
	defer f.Close()
	return r.writeFile("sbin/init", f, 0o755)
}

// mountPoints are the directories vminit mounts on; a read-only root must
// have them.
var mountPoints = []string{"proc", "sys", "dev", "tmp", "run", "var/task", "var/runtime", "mnt/code", "opt"}

// prepareTree makes a root tree bootable by vminit and matches Lambda's
// environment: the mount points, the sandbox user in passwd and group,
// hosts, nsswitch and a resolv.conf that follows the kernel's ip= config.
func prepareTree(r *treeRoot) error {
	for _, d := range mountPoints {
		fd, err := r.mkdirAll(d)
		if err != nil {
			return err
		}
		closeFD(fd)
	}
	if err := ensureLine(r, "etc/passwd", "root:", "root:x:0:0:root:/root:/bin/sh\n"); err != nil {
		return err
	}
	if err := ensureLine(r, "etc/passwd", sandboxUser+":", fmt.Sprintf("%s:x:%d:%d::/tmp:/sbin/nologin\n", sandboxUser, sandboxUID, sandboxUID)); err != nil {
		return err
	}
	if err := ensureLine(r, "etc/group", "root:", "root:x:0:\n"); err != nil {
		return err
	}
	if err := ensureLine(r, "etc/group", sandboxUser+":", fmt.Sprintf("%s:x:%d:\n", sandboxUser, sandboxUID)); err != nil {
		return err
	}
	// vminit bind-mounts a hosts file naming the instance's hostname over
	// this one; this is the fallback.
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	if err := r.writeFile("etc/hosts", strings.NewReader(hosts), 0o644); err != nil {
		return err
	}
	if b, _ := r.readFile("etc/nsswitch.conf"); len(b) == 0 {
		ns := "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n"
		if err := r.writeFile("etc/nsswitch.conf", strings.NewReader(ns), 0o644); err != nil {
			return err
		}
	}
	// The kernel writes the nameservers of ip=...:<dns0>:<dns1> to
	// /proc/net/pnp in resolv.conf syntax; with no network it is empty.
	return r.symlink("/proc/net/pnp", "etc/resolv.conf")
}

// ensureLine appends line to rel unless a line starting with prefix exists.
func ensureLine(r *treeRoot, rel, prefix, line string) error {
	b, err := r.readFile(rel)
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, prefix) {
			return nil
		}
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		b = append(b, '\n')
	}
	return r.writeFile(rel, bytes.NewReader(append(b, line...)), 0o644)
}
