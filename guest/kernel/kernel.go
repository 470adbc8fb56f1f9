// Package kernel carries InvokeX's guest kernel recipe: the config fragment
// applied on top of `make tinyconfig` and the patches applied to the source
// before building. They are embedded so that an installed invokex binary
// can build its own guest kernel (package internal/guest does the build).
package kernel

import (
	"embed"
	"io/fs"
	"sort"
)

//go:embed invokex.config *.patch
var files embed.FS

// ConfigName is the file name of the fragment.
const ConfigName = "invokex.config"

// Config returns the config fragment.
func Config() []byte {
	b, err := files.ReadFile(ConfigName)
	if err != nil {
		panic("guest/kernel: embedded fragment missing: " + err.Error())
	}
	return b
}

// Patch is one source patch, applied with `patch -p1` in name order.
type Patch struct {
	Name string
	Data []byte
}

// Patches returns the source patches in the order they are applied.
func Patches() []Patch {
	names, err := fs.Glob(files, "*.patch")
	if err != nil {
		panic("guest/kernel: " + err.Error())
	}
	sort.Strings(names)
	out := make([]Patch, 0, len(names))
	for _, n := range names {
		b, err := files.ReadFile(n)
		if err != nil {
			panic("guest/kernel: " + err.Error())
		}
		out = append(out, Patch{Name: n, Data: b})
	}
	return out
}
