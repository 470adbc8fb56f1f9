package guest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/invokex/invokex/internal/errdefs"
	"github.com/invokex/invokex/internal/runtimes"
)

var provided = &runtimes.Runtime{ID: "provided.al2023", Family: runtimes.FamilyProvided, Bootstrap: []string{"/var/task/bootstrap"}}

func TestCheckStatic(t *testing.T) {
	if err := CheckStatic(buildStatic(t)); err != nil {
		t.Errorf("CGO_ENABLED=0 binary: %v", err)
	}
	// /bin/ls is dynamically linked on every distribution we run on.
	err := CheckStatic("/bin/ls")
	if !errors.Is(err, ErrNotStatic) || !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("dynamic /bin/ls: %v, want ErrNotStatic", err)
	}
	if err != nil && !strings.Contains(err.Error(), "CGO_ENABLED=0") {
		t.Errorf("error %q does not say how to build a static agent", err)
	}
	script := filepath.Join(t.TempDir(), "script")
	os.WriteFile(script, []byte("#!/bin/sh\n"), 0o755)
	if err := CheckStatic(script); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("a shell script: %v, want ErrInvalidParameter", err)
	}
}

func TestRootImageProvided(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	cache := t.TempDir()
	agent := buildStatic(t)
	img, err := RootImage(ctx, cache, provided, agent)
	if err != nil {
		t.Fatal(err)
	}
	names := imageNames(t, img, "/")
	for _, want := range []string{"sbin", "etc", "proc", "sys", "dev", "tmp", "run", "var", "mnt", "opt"} {
		if !contains(names, want) {
			t.Errorf("root image / has %v, want %s", names, want)
		}
	}
	for _, d := range []string{"/var", "/mnt"} {
		t.Logf("%s: %v", d, imageNames(t, img, d))
	}
	if n := imageNames(t, img, "/var"); !contains(n, "task") || !contains(n, "runtime") {
		t.Errorf("/var has %v, want task and runtime mount points", n)
	}
	fi, _ := os.Stat(agent)
	e, ok := imageStat(t, img, "/sbin", "init")
	if !ok || e.mode != "100755" || e.uid != "0" || e.size != strconv.FormatInt(fi.Size(), 10) {
		t.Errorf("/sbin/init = %+v (found %v), want the agent: mode 100755, owner 0, %d bytes", e, ok, fi.Size())
	}
	if passwd := debugfs(t, img, "cat /etc/passwd"); !strings.Contains(passwd, "sbx_user1051:x:993:993:") {
		t.Errorf("/etc/passwd has no sandbox user:\n%s", passwd)
	}
	if group := debugfs(t, img, "cat /etc/group"); !strings.Contains(group, "sbx_user1051:x:993:") {
		t.Errorf("/etc/group has no sandbox group:\n%s", group)
	}
	if l := debugfs(t, img, "stat /etc/resolv.conf"); !strings.Contains(l, "/proc/net/pnp") {
		t.Errorf("/etc/resolv.conf is not the link to /proc/net/pnp:\n%s", l)
	}
	if _, err := os.Stat(hostCACerts); err == nil {
		if _, ok := imageStat(t, img, "/etc/ssl/certs", "ca-certificates.crt"); !ok {
			t.Error("the host has a CA bundle but the root image does not")
		}
	}
	if out := debugfs(t, img, "features"); strings.Contains(out, "has_journal") {
		t.Errorf("a read-only root image has a journal: %s", out)
	}

	// Cache hit: the same inputs return the same file, not rebuilt (a
	// rebuild renames a new file into place), only marked used.
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(img, old, old); err != nil {
		t.Fatal(err)
	}
	before, _ := os.Stat(img)
	img2, err := RootImage(ctx, cache, provided, agent)
	if err != nil {
		t.Fatal(err)
	}
	after, _ := os.Stat(img2)
	if img2 != img || !os.SameFile(before, after) {
		t.Errorf("second RootImage = %s, want the cached %s, not a rebuilt one", img2, img)
	}
	if !after.ModTime().After(old) {
		t.Errorf("a cache hit did not mark the image used (mtime %s)", after.ModTime())
	}
	// A new agent binary makes a new image.
	agent2 := filepath.Join(t.TempDir(), "agent2")
	b, _ := os.ReadFile(agent)
	os.WriteFile(agent2, append(b, 0), 0o755)
	img3, err := RootImage(ctx, cache, provided, agent2)
	if err != nil {
		t.Fatal(err)
	}
	if img3 == img {
		t.Error("a changed agent binary reused the old root image")
	}
	left, _ := filepath.Glob(filepath.Join(cache, "images", ".*"))
	if len(left) != 0 {
		t.Errorf("temporary files left in the image cache: %v", left)
	}
}

func TestRootImageRejectsDynamicAgent(t *testing.T) {
	_, err := RootImage(context.Background(), t.TempDir(), provided, "/bin/ls")
	if !errors.Is(err, ErrNotStatic) {
		t.Errorf("RootImage with a dynamic agent: %v, want ErrNotStatic", err)
	}
}

func TestCodeImage(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	cache := t.TempDir()
	code := t.TempDir()
	os.WriteFile(filepath.Join(code, "bootstrap"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	os.MkdirAll(filepath.Join(code, "lib", "deep"), 0o755)
	os.WriteFile(filepath.Join(code, "lib", "deep", "data.txt"), []byte("payload"), 0o644)
	os.Symlink("lib/deep/data.txt", filepath.Join(code, "link"))
	rtDir := t.TempDir()
	os.MkdirAll(filepath.Join(rtDir, "python"), 0o755)
	os.WriteFile(filepath.Join(rtDir, "python", "bootstrap.py"), []byte("print()"), 0o644)

	img, err := CodeImage(ctx, cache, code, rtDir, "sha-A")
	if err != nil {
		t.Fatal(err)
	}
	if n := imageNames(t, img, "/"); !contains(n, "task") || !contains(n, "runtime") {
		t.Fatalf("code image / has %v, want task and runtime", n)
	}
	if e, ok := imageStat(t, img, "/task", "bootstrap"); !ok || e.mode != "100755" {
		t.Errorf("/task/bootstrap = %+v, %v; want mode 100755", e, ok)
	}
	if got := debugfs(t, img, "cat /task/lib/deep/data.txt"); got != "payload" {
		t.Errorf("/task/lib/deep/data.txt = %q, want payload", got)
	}
	if l := debugfs(t, img, "stat /task/link"); !strings.Contains(l, "lib/deep/data.txt") {
		t.Errorf("/task/link is not the symlink:\n%s", l)
	}
	if got := debugfs(t, img, "cat /runtime/python/bootstrap.py"); got != "print()" {
		t.Errorf("/runtime/python/bootstrap.py = %q", got)
	}
	// Same key: cached, even though the directory changed (the key is
	// the caller's promise about content).
	os.WriteFile(filepath.Join(code, "new"), []byte("x"), 0o644)
	if again, err := CodeImage(ctx, cache, code, rtDir, "sha-A"); err != nil || again != img {
		t.Errorf("CodeImage with the same key = %s, %v; want the cached %s", again, err, img)
	}
	other, err := CodeImage(ctx, cache, code, "", "sha-B")
	if err != nil {
		t.Fatal(err)
	}
	if other == img {
		t.Fatal("a new key reused the old image")
	}
	if !contains(imageNames(t, other, "/task"), "new") {
		t.Error("the image for the new key misses the new file")
	}
	if n := imageNames(t, other, "/runtime"); len(n) != 0 && !(len(n) == 1 && n[0] == "lost+found") {
		t.Errorf("runtime/ without a runtime dir holds %v", n)
	}
	if _, err := CodeImage(ctx, cache, code, "", ""); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("empty key: %v, want ErrInvalidParameter", err)
	}
	if left, _ := filepath.Glob(filepath.Join(cache, "code", ".*")); len(left) != 0 {
		t.Errorf("staging left in the code cache: %v", left)
	}
}

// TestCodeImageConcurrent builds one key from several goroutines: all get
// the same image and nothing is left half-built.
func TestCodeImageConcurrent(t *testing.T) {
	requireTools(t)
	cache := t.TempDir()
	code := t.TempDir()
	os.WriteFile(filepath.Join(code, "bootstrap"), []byte("x"), 0o755)
	var wg sync.WaitGroup
	paths := make([]string, 4)
	errs := make([]error, 4)
	for i := range paths {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = CodeImage(context.Background(), cache, code, "", "same")
		}()
	}
	wg.Wait()
	for i := range paths {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Errorf("caller %d: %s, %v; want %s", i, paths[i], errs[i], paths[0])
		}
	}
	m, _ := filepath.Glob(filepath.Join(cache, "code", "*"))
	if len(m) != 1 {
		t.Errorf("code cache holds %v, want one image", m)
	}
}

func TestScratchImage(t *testing.T) {
	requireTools(t)
	p := filepath.Join(t.TempDir(), "scratch.ext4")
	if err := ScratchImage(context.Background(), p, 512); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 512<<20 {
		t.Errorf("scratch disk is %d bytes, want 512 MiB", fi.Size())
	}
	// Sparse: only metadata takes host space.
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used > 64<<20 {
		t.Errorf("scratch disk uses %d MiB of host disk, want a sparse file", used>>20)
	}
	if n := imageNames(t, p, "/"); len(n) != 1 || n[0] != "lost+found" {
		t.Errorf("scratch / holds %v, want an empty file system", n)
	}
	out := debugfs(t, p, "stats")
	if !strings.Contains(out, "Block count:              131072") {
		t.Errorf("scratch disk is not 131072 blocks of 4 KiB:\n%s", firstLines(out, 20))
	}
	if err := ScratchImage(context.Background(), p, 1); !errors.Is(err, errdefs.ErrInvalidParameter) {
		t.Errorf("1 MiB scratch: %v, want ErrInvalidParameter", err)
	}
	// Replacing an existing disk works (instances reuse their path).
	if err := ScratchImage(context.Background(), p, 64); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(p); fi.Size() != 64<<20 {
		t.Errorf("replaced scratch is %d bytes, want 64 MiB", fi.Size())
	}
}

func TestLockWaits(t *testing.T) {
	cache := t.TempDir()
	unlock, err := lock(context.Background(), cache, "x")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*lockPoll)
	defer cancel()
	if _, err := lock(ctx, cache, "x"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second lock while held: %v, want it to wait until the deadline", err)
	}
	got := make(chan error, 1)
	go func() {
		u, err := lock(context.Background(), cache, "x")
		if err == nil {
			u()
		}
		got <- err
	}()
	unlock()
	select {
	case err := <-got:
		if err != nil {
			t.Errorf("lock after unlock: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the waiting locker never got the lock")
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

func TestCachedSHA256FollowsTheFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "agent")
	for i, content := range []string{"first content", "other content", "other content"} {
		if i < 2 {
			if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		want, err := fileSHA256(p)
		if err != nil {
			t.Fatal(err)
		}
		got, err := cachedSHA256(p)
		if err != nil || got != want {
			t.Errorf("round %d: cachedSHA256 = %s, %v; want %s (the file's)", i, got, err, want)
		}
	}
	if _, err := cachedSHA256(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Errorf("no error for a missing file")
	}
}
