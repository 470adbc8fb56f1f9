package cli

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// progress shows an upload's progress on a terminal (one rewritten line)
// and nothing until the end elsewhere, so logs and CI output stay clean.
type progress struct {
	g     *globals
	name  string
	total int64
	tty   bool
	last  int
}

func newProgress(g *globals, name string, total int64) *progress {
	p := &progress{g: g, name: name, total: total, last: -1}
	if f, ok := g.stderr.(interface{ Fd() uintptr }); ok {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		p.tty = err == nil
	}
	return p
}

func (p *progress) reset() { p.last = -1 }

func (p *progress) update(sent, total int64) {
	if !p.tty || total == 0 {
		return
	}
	pct := int(sent * 100 / total)
	if pct == p.last {
		return
	}
	p.last = pct
	fmt.Fprintf(p.g.stderr, "\ruploading %s: %s / %s (%d%%)", p.name, human(sent), human(total), pct)
}

func (p *progress) done(err error) {
	if p.tty && p.last >= 0 {
		fmt.Fprint(p.g.stderr, "\r\033[K")
	}
	if err == nil {
		fmt.Fprintf(p.g.stderr, "uploaded %s (%s)\n", p.name, human(p.total))
	}
}

func human(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
