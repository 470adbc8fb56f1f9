package runtimes

import (
	"embed"
	"io/fs"
)

// The runtime interface clients, one embedded tree per family so that each
// family's FS holds only its own directory.
var (
	//go:embed ric/python
	pythonRIC embed.FS
	//go:embed ric/nodejs
	nodeRIC embed.FS
)

// SupportFiles returns the files the sandbox sees at /var/runtime for a
// family (InvokeX's runtime interface clients), or nil when it needs none.
// The FS for FamilyPython holds python/bootstrap.py and the one for
// FamilyNode holds nodejs/bootstrap.mjs, matching the runtimes' Bootstrap.
func SupportFiles(f Family) fs.FS {
	var tree embed.FS
	switch f {
	case FamilyPython:
		tree = pythonRIC
	case FamilyNode:
		tree = nodeRIC
	default:
		return nil
	}
	sub, err := fs.Sub(tree, "ric")
	if err != nil {
		// fs.Sub fails only for an invalid directory name, a constant here.
		panic("runtimes: embedded support files: " + err.Error())
	}
	return sub
}
