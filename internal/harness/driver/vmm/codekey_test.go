package vmm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/harness/driver"
)

func TestCodeKey(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(a, "bootstrap"), []byte("one"), 0o755)
	os.WriteFile(filepath.Join(b, "bootstrap"), []byte("one"), 0o755)
	key := func(sp driver.Spec) string {
		k, err := CodeKey(sp)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	ka, kb := key(driver.Spec{CodeDir: a}), key(driver.Spec{CodeDir: b})
	if ka != kb {
		t.Errorf("same content, different keys")
	}
	os.WriteFile(filepath.Join(b, "bootstrap"), []byte("two"), 0o755)
	if key(driver.Spec{CodeDir: b}) == ka {
		t.Errorf("different content, same key")
	}
	if key(driver.Spec{CodeDir: a, RuntimeDir: b}) == ka {
		t.Errorf("the runtime directory does not change the key")
	}
	s1 := key(driver.Spec{CodeDir: a, CodeSha256: "abc="})
	if s1 == ka || s1 != key(driver.Spec{CodeDir: b, CodeSha256: "abc="}) {
		t.Errorf("a digest must key the code by itself")
	}
	if strings.ContainsAny(ka, "/+=") {
		t.Errorf("key %q is not file-name safe", ka)
	}
	if _, err := CodeKey(driver.Spec{CodeDir: filepath.Join(a, "absent")}); err == nil {
		t.Errorf("a missing code directory has a key")
	}
}

// TestCodeKeyGolden pins the keys: images already in caches are found by
// them, and the qemu and firecracker drivers share the images (they
// computed these keys before the code moved here).
func TestCodeKeyGolden(t *testing.T) {
	base := t.TempDir()
	code, rt := filepath.Join(base, "code"), filepath.Join(base, "runtime")
	for _, d := range []string{filepath.Join(code, "lib"), rt} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	files := []struct {
		path, content string
		mode          os.FileMode
	}{
		{filepath.Join(code, "bootstrap"), "#!/bin/sh\necho hi\n", 0o755},
		{filepath.Join(code, "lib", "a.txt"), "a", 0o644},
		{filepath.Join(rt, "rie"), "x", 0o644},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, []byte(f.content), f.mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(f.path, f.mode) // whatever the umask
	}
	if err := os.Symlink("lib/a.txt", filepath.Join(code, "link")); err != nil {
		t.Fatal(err)
	}
	for d, mode := range map[string]os.FileMode{code: 0o755, filepath.Join(code, "lib"): 0o750, rt: 0o755} {
		os.Chmod(d, mode)
	}
	for _, c := range []struct {
		spec driver.Spec
		want string
	}{
		{driver.Spec{CodeDir: code}, "S2ds6hAWN4zyYJrBheZDwqrq3pvb6Wo29mW6B548u9E"},
		{driver.Spec{CodeDir: code, RuntimeDir: rt}, "rUu-sSwT9YhbH6xV2R-EHVXhNV3aWAqy84RKdMEyS30"},
		{driver.Spec{CodeDir: code, CodeSha256: "abc="}, "jYhW6RFA4dVai0yfBRcdsC9ALEOmXPH68LfBEVYGNeE"},
		{driver.Spec{CodeSha256: "abc=", RuntimeDir: rt}, "pG4KgogjTQuE9urD-LW-bXzSstQX_dDnxxTMN_OzfB8"},
	} {
		got, err := CodeKey(c.spec)
		if err != nil || got != c.want {
			t.Errorf("CodeKey(code %t, runtime %t, digest %q) = %s, %v; want %s",
				c.spec.CodeDir != "", c.spec.RuntimeDir != "", c.spec.CodeSha256, got, err, c.want)
		}
	}
}
