package runtimes

import (
	"strings"
	"unicode"

	"github.com/invokex/invokex/internal/errdefs"
)

// CheckCode verifies that a package can start under rt with handler: the
// bootstrap (provided) or handler file (python, node) exists. lookup reports
// whether a slash path exists in the package and whether it is executable.
//
// An empty handler stands for rt.DefaultHandler. Every error wraps
// errdefs.ErrInvalidParameter and its message is meant for the caller.
func CheckCode(rt *Runtime, handler string, lookup func(path string) (exists, executable bool)) error {
	if rt == nil {
		return errdefs.Invalid("no runtime given")
	}
	if handler == "" {
		handler = rt.DefaultHandler
	}
	switch rt.Family {
	case FamilyProvided:
		// The handler is informational for provided runtimes (_HANDLER).
		exists, executable := lookup("bootstrap")
		if !exists {
			return errdefs.Invalid("Couldn't find valid bootstrap(s): [%s]: a %s deployment package must hold an executable file named bootstrap at its root", taskBootstrap, rt.ID)
		}
		if !executable {
			return errdefs.Invalid("bootstrap in the deployment package is not executable: give it mode 0755 before zipping it for %s", rt.ID)
		}
		return nil
	case FamilyPython:
		return checkPython(rt, handler, lookup)
	case FamilyNode:
		return checkNode(rt, handler, lookup)
	default:
		return errdefs.Invalid("runtime %s has an unknown family %q", rt.ID, rt.Family)
	}
}

func malformed(rt *Runtime, handler, why string) error {
	if why != "" {
		why = " (" + why + ")"
	}
	return errdefs.Invalid("Handler '%s' is not valid for runtime %s%s: it must be of the form %s, e.g. %s",
		handler, rt.ID, why, rt.HandlerFormat, rt.DefaultHandler)
}

// checkHandlerText applies the rules common to every handler: Lambda's
// pattern [^\s]+ and 128 characters at most, no absolute path and no "..",
// which would reach outside the task root.
func checkHandlerText(rt *Runtime, handler string) error {
	switch {
	case len(handler) > 128:
		return malformed(rt, handler, "longer than 128 characters")
	case strings.ContainsFunc(handler, unicode.IsSpace):
		return malformed(rt, handler, "contains white space")
	case strings.HasPrefix(handler, "/"):
		return malformed(rt, handler, "absolute path")
	case strings.Contains(handler, ".."):
		return malformed(rt, handler, "'..' is not allowed")
	}
	return nil
}

// checkPython follows the python RIC: "file.function" splits at the last
// dot; the module part may use slashes or dots as separators ("pkg/mod.fn",
// "pkg.mod.fn"), and names pkg/mod.py or the package pkg/mod/__init__.py.
func checkPython(rt *Runtime, handler string, lookup func(string) (bool, bool)) error {
	if err := checkHandlerText(rt, handler); err != nil {
		return err
	}
	mod, fn, ok := cutLast(handler, ".")
	if !ok || mod == "" || fn == "" || strings.Contains(fn, "/") {
		return malformed(rt, handler, "")
	}
	modPath := strings.ReplaceAll(mod, ".", "/")
	if hasEmptyPart(modPath) {
		return malformed(rt, handler, "")
	}
	candidates := []string{modPath + ".py", modPath + "/__init__.py"}
	if anyExists(lookup, candidates) {
		return nil
	}
	return errdefs.Invalid("Unable to import module '%s': handler '%s' needs %s or %s in the deployment package, and neither is there",
		strings.ReplaceAll(mod, "/", "."), handler, candidates[0], candidates[1])
}

// checkNode follows the node RIC: in "dir/file.export.path" the module is
// dir/file (the last path element up to its first dot), resolved as
// file.js, file.mjs or file.cjs, or as a directory with an index file.
func checkNode(rt *Runtime, handler string, lookup func(string) (bool, bool)) error {
	if err := checkHandlerText(rt, handler); err != nil {
		return err
	}
	dir, base, hasDir := cutLast(handler, "/")
	if !hasDir {
		dir = ""
	}
	file, export, ok := strings.Cut(base, ".")
	if !ok || file == "" || export == "" || hasEmptyPart(export) || strings.Contains(export, "..") {
		return malformed(rt, handler, "")
	}
	mod := file
	if dir != "" {
		if hasEmptyPart(dir) {
			return malformed(rt, handler, "")
		}
		mod = dir + "/" + file
	}
	var candidates []string
	for _, ext := range []string{".js", ".mjs", ".cjs"} {
		candidates = append(candidates, mod+ext)
	}
	for _, ext := range []string{".js", ".mjs", ".cjs"} {
		candidates = append(candidates, mod+"/index"+ext)
	}
	// A package installed in node_modules, which Lambda's runtime also
	// resolves for a bare module name.
	candidates = append(candidates, "node_modules/"+file+"/package.json")
	if anyExists(lookup, candidates) {
		return nil
	}
	return errdefs.Invalid("Cannot find module '%s': handler '%s' needs %s.js, %s.mjs or %s.cjs in the deployment package",
		file, handler, mod, mod, mod)
}

func cutLast(s, sep string) (before, after string, found bool) {
	i := strings.LastIndex(s, sep)
	if i < 0 {
		return s, s, false
	}
	return s[:i], s[i+len(sep):], true
}

// hasEmptyPart reports whether a slash or dot separated path has an empty
// element ("a//b", "a.", "/a").
func hasEmptyPart(p string) bool {
	for _, part := range strings.Split(strings.ReplaceAll(p, ".", "/"), "/") {
		if part == "" {
			return true
		}
	}
	return false
}

func anyExists(lookup func(string) (bool, bool), paths []string) bool {
	for _, p := range paths {
		if exists, _ := lookup(p); exists {
			return true
		}
	}
	return false
}
