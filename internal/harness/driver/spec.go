package driver

import (
	"os"
	"path/filepath"
	"regexp"

	"github.com/invokex/invokex/internal/errdefs"
)

var idPattern = regexp.MustCompile(`^[a-z0-9-]{1,40}$`)

// Validate checks what every driver needs of a Spec: an ID of [a-z0-9-]
// (at most 40 bytes, so it can name files and cgroups), positive memory
// and ephemeral sizes, and CodeDir (and RuntimeDir when set) absolute
// paths to existing directories. Errors are ErrInvalidParameter. Drivers
// add their own limits on top (a VM's minimum memory, say).
func (s Spec) Validate() error {
	if !idPattern.MatchString(s.ID) {
		return errdefs.Invalid("sandbox id %q must be 1 to 40 of [a-z0-9-]", s.ID)
	}
	if s.MemoryMB <= 0 || s.EphemeralMB <= 0 {
		return errdefs.Invalid("sandbox %s: MemoryMB and EphemeralMB must be positive", s.ID)
	}
	for _, d := range []struct{ name, dir string }{{"CodeDir", s.CodeDir}, {"RuntimeDir", s.RuntimeDir}} {
		if d.dir == "" && d.name == "RuntimeDir" {
			continue
		}
		if !filepath.IsAbs(d.dir) {
			return errdefs.Invalid("sandbox %s: %s %q must be an absolute path", s.ID, d.name, d.dir)
		}
		if fi, err := os.Stat(d.dir); err != nil || !fi.IsDir() {
			return errdefs.Invalid("sandbox %s: %s %q is not a directory", s.ID, d.name, d.dir)
		}
	}
	return nil
}
