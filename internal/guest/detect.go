package guest

import (
	"context"
	"fmt"

	"github.com/invokex/invokex/internal/runtimes"
)

// DetectRuntimes is the runtimes DB of a host that runs functions in VMs:
// which runtime has a root image (or can get one) and where its
// interpreter is inside it. The host's own interpreters do not matter.
//
//   - provided.*: always (the tiny root).
//   - an interpreted runtime with a root imported or built into cacheDir:
//     available with the interpreter found in that tree.
//   - one Debian packages (DebianRecipe): available; its root is built on
//     first use (minutes, once; needs the host's Debian mirror).
//   - any other: unavailable, with the reason and the way out (import).
func DetectRuntimes(ctx context.Context, cacheDir string) []*runtimes.Runtime {
	out := runtimes.Builtin()
	for _, rt := range out {
		if ctx.Err() != nil {
			rt.Available, rt.Reason = false, "runtime detection cut short"
			continue
		}
		detectRuntime(cacheDir, rt)
	}
	return out
}

func detectRuntime(cacheDir string, rt *runtimes.Runtime) {
	if rt.Family == runtimes.FamilyProvided {
		rt.Available, rt.Reason = true, ""
		return
	}
	rec, hasRecipe := DebianRecipe(rt.ID)
	if tree, ok := CurrentRoot(cacheDir, rt.ID); ok {
		for _, p := range interpreterCandidates(rt, rec, hasRecipe) {
			try := *rt
			try.UseInterpreter(p)
			if checkTreeInterpreter(tree, &try) == nil {
				*rt = try
				return
			}
		}
		rt.Available = false
		rt.Reason = fmt.Sprintf("the root in %s has no %s interpreter where InvokeX looks (%v)",
			tree, rt.ID, interpreterCandidates(rt, rec, hasRecipe))
		return
	}
	if hasRecipe {
		rt.UseInterpreter(rec.Interpreter)
		return
	}
	rt.Available = false
	rt.Reason = fmt.Sprintf("no Debian release packages %s: import a root for it (invokex guest runtime import %s DIR|IMAGE.tar)", rt.ID, rt.ID)
}

// interpreterCandidates are the paths a root's interpreter is looked for
// at, the Debian recipe's first.
func interpreterCandidates(rt *runtimes.Runtime, rec Recipe, hasRecipe bool) []string {
	var c []string
	if hasRecipe {
		c = append(c, rec.Interpreter)
	}
	v := runtimes.Version(rt.ID)
	switch rt.Family {
	case runtimes.FamilyPython:
		c = append(c, "/usr/bin/python"+v, "/usr/local/bin/python"+v, "/usr/bin/python3", "/usr/local/bin/python3")
	case runtimes.FamilyNode:
		c = append(c, "/usr/bin/node", "/usr/local/bin/node")
	}
	return c
}
