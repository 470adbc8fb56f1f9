package guest

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestPruneRootImages(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-2 * time.Hour)
	files := map[string]bool{ // name -> should survive
		"python3.11-aaaaaaaaaaaaaaaaaaaa.ext4":     false, // old, same runtime
		"python3.11-bbbbbbbbbbbbbbbbbbbb.ext4":     true,  // recently used
		"python3.11-cccccccccccccccccccc.ext4":     true,  // the one just built (keep)
		"python3.11-extra-dddddddddddddddddd.ext4": true,  // another runtime's
		"python3.1-eeeeeeeeeeeeeeeeeeee.ext4":      true,  // another runtime's
		".python3.11-ffff.ext4.tmp-1":              true,  // a build in progress
	}
	for name, keep := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if !keep || name != "python3.11-bbbbbbbbbbbbbbbbbbbb.ext4" {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	pruneRootImages(dir, "python3.11", filepath.Join(dir, "python3.11-cccccccccccccccccccc.ext4"), time.Now().Add(-unusedImageAge))
	for name, keep := range files {
		_, err := os.Stat(filepath.Join(dir, name))
		if keep && err != nil {
			t.Errorf("%s was removed", name)
		}
		if !keep && err == nil {
			t.Errorf("%s was kept", name)
		}
	}
}
