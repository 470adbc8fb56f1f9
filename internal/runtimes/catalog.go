package runtimes

import (
	"context"
	"io/fs"
)

// Builtin returns every runtime identifier InvokeX knows, marked unavailable.
func Builtin() []*Runtime { panic("runtimes: not implemented yet") }

// Detect returns Builtin with Available set from probing this host.
func Detect(ctx context.Context) []*Runtime { panic("runtimes: not implemented yet") }

// CheckCode verifies that a package can start under rt with handler: the
// bootstrap (provided) or handler file (python, node) exists. lookup reports
// whether a slash path exists in the package and whether it is executable.
func CheckCode(rt *Runtime, handler string, lookup func(path string) (exists, executable bool)) error {
	panic("runtimes: not implemented yet")
}

// SupportFiles returns the files the sandbox sees at /var/runtime for a
// family (InvokeX's runtime interface clients), or nil when it needs none.
func SupportFiles(f Family) fs.FS { panic("runtimes: not implemented yet") }
