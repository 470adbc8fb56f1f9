package bench

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

const gib = 1 << 30

// table is one section of the report, rendered either as aligned text or
// as Markdown.
type table struct {
	title  string
	header []string
	rows   [][]string
	notes  []string
}

func fmtMs(d time.Duration) string {
	v := ms(d)
	switch {
	case v < 0:
		return "-" + fmtMs(-d)
	case v >= 1000:
		return fmt.Sprintf("%.0f ms", v)
	default:
		return fmt.Sprintf("%.2f ms", v)
	}
}

func fmtMiB(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

// none is the cell of a figure that was not measured.
const none = "—"

// figure is one shared figure: a value for each system, rendered by f,
// with the InvokeX/RIE ratio. A negative value is "not measured".
func figure(name string, ix, rie float64, f func(float64) string) []string {
	cell := func(v float64) string {
		if v < 0 {
			return none
		}
		return f(v)
	}
	ratio := none
	if r, ok := Ratio(ix, rie); ok {
		ratio = fmt.Sprintf("%.2f×", r)
	}
	return []string{name, cell(ix), cell(rie), ratio}
}

// only is a figure RIE has no counterpart for.
func only(name, ix string) []string { return []string{name, ix, none, none} }

func msCell(v float64) string { return fmtMs(msToDuration(v)) }
func usCell(v float64) string { return fmt.Sprintf("%.0f µs", v) }

// cellOr is s when ok, else the not-measured cell.
func cellOr(ok bool, s string) string {
	if !ok {
		return none
	}
	return s
}
func mibCell(v float64) string { return fmtMiB(int64(v)) }
func rateCell(v float64) string {
	return strconv.FormatFloat(v, 'f', 0, 64) + "/s"
}
func countCell(v float64) string { return strconv.FormatFloat(v, 'f', 0, 64) }

// durOr returns d in ms, or -1 when the summary is empty.
func durOr(s Summary, pick func(Summary) time.Duration) float64 {
	if s.N == 0 {
		return -1
	}
	return ms(pick(s))
}

func p50(s Summary) time.Duration { return s.P50 }
func p90(s Summary) time.Duration { return s.P90 }
func p99(s Summary) time.Duration { return s.P99 }

var sharedHeader = []string{"figure", "InvokeX", "RIE", "InvokeX / RIE"}

func (r *Report) warmTable() table {
	t := table{title: "Warm invoke latency and throughput", header: sharedHeader}
	for _, w := range r.Warm {
		c := strconv.Itoa(w.Concurrency)
		// A level where RIE crashed has no RIE figure to compare with: its
		// few successes say nothing about its latency or throughput.
		rieBad := w.RIE.Died
		lat := func(l LoadResult, bad bool, pick func(Summary) time.Duration) float64 {
			if bad {
				return -1
			}
			return durOr(l.Latency, pick)
		}
		rate := func(l LoadResult, bad bool) float64 {
			if bad || l.Sent == 0 {
				return -1
			}
			return l.PerSec
		}
		ixBad := w.InvokeX.Sent == 0
		row := func(name string, ix, rie float64, f func(float64) string) []string {
			r := figure(name, ix, rie, f)
			if rieBad {
				r[2] = "crashed"
			}
			return r
		}
		t.rows = append(t.rows,
			row("c="+c+" p50", lat(w.InvokeX, ixBad, p50), lat(w.RIE, rieBad, p50), msCell),
			row("c="+c+" p90", lat(w.InvokeX, ixBad, p90), lat(w.RIE, rieBad, p90), msCell),
			row("c="+c+" p99", lat(w.InvokeX, ixBad, p99), lat(w.RIE, rieBad, p99), msCell),
			row("c="+c+" invocations/s", rate(w.InvokeX, ixBad), rate(w.RIE, rieBad), countCell),
			[]string{"c=" + c + " errors", errCell(w.InvokeX), errCell(w.RIE), none},
		)
		if w.InvokeXCPU.Measured || w.RIECPU.Measured {
			cpu := func(m bool, d time.Duration) float64 {
				if !m {
					return -1
				}
				return float64(d) / float64(time.Microsecond)
			}
			ix, rie := w.InvokeXCPU, w.RIECPU
			t.rows = append(t.rows,
				row("c="+c+" CPU per invoke: platform (server + sandbox / emulator)", cpu(ix.Measured, ix.Platform), cpu(rie.Measured, rie.Platform), usCell),
				only("c="+c+" CPU per invoke:   of which sandbox (init + agent)", cellOr(ix.Measured, usCell(float64(ix.Sandbox)/1e3))),
				row("c="+c+" CPU per invoke: function", cpu(ix.Measured, ix.Function), cpu(rie.Measured, rie.Function), usCell),
				row("c="+c+" CPU per invoke: benchmark client", cpu(ix.Measured, ix.Client), cpu(rie.Measured, rie.Client), usCell),
			)
		}
		if w.OtherCPU >= 0.05 {
			t.notes = append(t.notes, fmt.Sprintf("at concurrency %d, other processes used %.0f%% of the machine's CPU during the measurement", w.Concurrency, w.OtherCPU*100))
		}
		if w.InvokeXInstances > 0 {
			t.notes = append(t.notes, fmt.Sprintf("InvokeX at concurrency %d ran %d instances", w.Concurrency, w.InvokeXInstances))
		}
		if w.RIENote != "" {
			t.notes = append(t.notes, fmt.Sprintf("RIE at concurrency %d: %s", w.Concurrency, w.RIENote))
		}
		if w.InvokeX.Errors > 0 {
			t.notes = append(t.notes, fmt.Sprintf("InvokeX errors at concurrency %d: %s; first: %s",
				w.Concurrency, kindsString(w.InvokeX.ErrorKinds), strings.Join(w.InvokeX.FirstErrors, " | ")))
		}
	}
	return t
}

func errCell(l LoadResult) string {
	if l.Sent == 0 && l.Errors == 0 {
		return none
	}
	s := fmt.Sprintf("%d of %d", l.Errors, l.Sent)
	if l.Died {
		s += " (crashed)"
	}
	return s
}

func (r *Report) coldTable() table {
	t := table{title: "Cold start (first invoke of a new instance)", header: sharedHeader}
	rie := r.ColdRIE
	add := func(label string, s ColdSeries) {
		if s.Why != "" {
			t.notes = append(t.notes, label+": not measured: "+s.Why)
		}
		t.rows = append(t.rows,
			figure(label+": to first byte p50", durOr(s.TTFB, p50), durOr(rie.TTFB, p50), msCell),
			figure(label+": to first byte p99", durOr(s.TTFB, p99), durOr(rie.TTFB, p99), msCell),
			figure(label+": Init Duration p50", durOr(s.Init, p50), durOr(rie.Init, p50), msCell),
			figure(label+": Init Duration p99", durOr(s.Init, p99), durOr(rie.Init, p99), msCell),
			figure(label+": first byte − init p50", durOr(s.Net, p50), durOr(rie.Net, p50), msCell),
			figure(label+": first byte − init p99", durOr(s.Net, p99), durOr(rie.Net, p99), msCell),
			[]string{label + ": samples (reported cold)", coldCount(s), coldCount(rie), none},
		)
		if s.DriverStart.N > 0 {
			t.rows = append(t.rows,
				only(label+":   of which sandbox start (driver) p50", fmtMs(s.DriverStart.P50)),
				only(label+":   of which sandbox start (driver) p99", fmtMs(s.DriverStart.P99)),
			)
		}
		if s.Errors > 0 {
			t.notes = append(t.notes, fmt.Sprintf("%s: %d failed cold starts; first: %s", label, s.Errors, s.FirstError))
		}
	}
	add("after deploy", r.ColdAfterDeploy)
	add("after scale-to-zero", r.ColdAfterScaleZero)
	if rie.Errors > 0 {
		t.notes = append(t.notes, fmt.Sprintf("RIE: %d failed cold starts; first: %s", rie.Errors, rie.FirstError))
	}
	if rie.Why != "" {
		t.notes = append(t.notes, "RIE cold starts not measured: "+rie.Why)
	}
	return t
}

func coldCount(s ColdSeries) string {
	if s.TTFB.N == 0 && s.Errors == 0 {
		return none
	}
	return fmt.Sprintf("%d (%d)", s.TTFB.N, s.Cold)
}

func (r *Report) memoryTable() table {
	m := r.Memory
	t := table{title: "Memory", header: sharedHeader}
	b := func(v int64) float64 {
		if v <= 0 {
			return -1
		}
		return float64(v)
	}
	rieInst := m.RIEEmulator.Add(m.RIEFunction)
	ov := m.Overhead()
	perGiB := func(v int64) float64 {
		if v <= 0 {
			return -1
		}
		return float64(gib) / float64(v)
	}
	haveInst := m.Instances > 0
	ixInst := func(v int64) float64 {
		if !haveInst {
			return -1
		}
		return b(v)
	}
	ovCell := func(v int64) float64 {
		if !haveInst || m.RIEFunction.RSS <= 0 {
			return -1
		}
		return float64(v)
	}
	t.rows = append(t.rows,
		figure("server (InvokeX) / emulator (RIE) RSS, idle", b(m.ServerIdle.RSS), b(m.RIEEmulator.RSS), mibCell),
		only(fmt.Sprintf("server RSS with %d idle instances", m.Instances), cellMiB(m.ServerWithInstances.RSS)),
		only("server RSS after the warm loads", cellMiB(m.ServerAfterLoad.RSS)),
	)
	if isVMDriver(r.Driver) {
		// A VM's processes are its VMM: guest memory it touched, the
		// emulator's own (TCG's translated code) and device state. The
		// function's process is inside, invisible to the host.
		t.rows = append(t.rows,
			figure("per idle VM, host memory of its VMM process, RSS", ixInst(m.PerInstance.RSS), b(rieInst.RSS), mibCell),
			figure("per idle VM, host memory of its VMM process, PSS", ixInst(m.PerInstance.PSS), b(rieInst.PSS), mibCell),
			figure("per idle VM, host memory of its VMM process, private (USS)", ixInst(m.PerInstance.Private), b(rieInst.Private), mibCell),
			figure("  the same 1 s after its last invoke (before the idle trim), RSS", ixInst(m.SandboxFresh.RSS), b(rieInst.RSS), mibCell),
			only("per idle VM, host CPU of its VMM process (ms per second)", idleCPUCell(m)),
			figure("idle VMs per GiB of host memory (by PSS)", perGiBIf(haveInst, m.PerInstance.PSS, perGiB), perGiB(rieInst.PSS), countCell),
			figure("idle VMs per GiB of host memory (by RSS)", perGiBIf(haveInst, m.PerInstance.RSS, perGiB), perGiB(rieInst.RSS), countCell),
		)
		if m.Processes != "" {
			t.notes = append(t.notes, "one InvokeX VM's host processes: "+m.Processes+"; RIE's column is its emulator and function processes")
		}
		if m.Why != "" {
			t.notes = append(t.notes, "not measured: "+m.Why)
		}
		return t
	}
	t.rows = append(t.rows,
		figure("per idle instance, all processes, RSS", ixInst(m.PerInstance.RSS), b(rieInst.RSS), mibCell),
		figure("per idle instance, all processes, PSS", ixInst(m.PerInstance.PSS), b(rieInst.PSS), mibCell),
		figure("  of which the function process, RSS", ixInst(m.Function.RSS), b(m.RIEFunction.RSS), mibCell),
		figure("  of which the sandbox (init + agent) / emulator, RSS", ixInst(m.Sandbox.RSS), b(m.RIEEmulator.RSS), mibCell),
		figure("  of which the sandbox (init + agent) / emulator, PSS", ixInst(m.Sandbox.PSS), b(m.RIEEmulator.PSS), mibCell),
		figure("  sandbox 1 s after its last invoke (before the idle trim), RSS", ixInst(m.SandboxFresh.RSS), b(m.RIEEmulator.RSS), mibCell),
		only("per idle instance, host CPU of all its processes (ms per second)", idleCPUCell(m)),
		figure("overhead beyond the function's own, RSS", ovCell(ov.RSS), b(m.RIEEmulator.RSS), mibCell),
		figure("overhead beyond the function's own, PSS", ovCell(ov.PSS), b(m.RIEEmulator.PSS), mibCell),
		figure("overhead beyond the function's own, private (USS)", ovCell(ov.Private), b(m.RIEEmulator.Private), mibCell),
		figure("idle instances per GiB (by PSS)", perGiBIf(haveInst, m.PerInstance.PSS, perGiB), perGiB(rieInst.PSS), countCell),
		figure("idle instances per GiB (by RSS)", perGiBIf(haveInst, m.PerInstance.RSS, perGiB), perGiB(rieInst.RSS), countCell),
	)
	if m.Cgroup > 0 {
		t.rows = append(t.rows, only("instance cgroup memory.current (incl. kernel, page cache)", fmtMiB(m.Cgroup)))
	}
	if m.Processes != "" {
		t.notes = append(t.notes, "one InvokeX instance's processes: "+m.Processes)
	}
	if m.Warm > 0 {
		t.notes = append(t.notes, fmt.Sprintf("beside the instances the driver kept %d sandboxes started ahead of need (warm sandboxes, spare VMs: no function yet; not in the figures above): %s RSS, %s PSS each",
			m.Warm, fmtMiB(m.WarmEach.RSS), fmtMiB(m.WarmEach.PSS)))
	}
	if m.Why != "" {
		t.notes = append(t.notes, "not measured: "+m.Why)
	}
	return t
}

// isVMDriver reports whether a driver runs each instance in a microVM.
func isVMDriver(name string) bool { return name == "qemu" || name == "firecracker" }

func perGiBIf(ok bool, v int64, f func(int64) float64) float64 {
	if !ok {
		return -1
	}
	return f(v)
}

// idleCPUCell is Memory.IdleCPU in ms of CPU per second of wall time.
func idleCPUCell(m MemoryResult) string {
	if m.Instances == 0 || !m.IdleCPUMeasured {
		return none
	}
	return fmt.Sprintf("%.1f ms/s", float64(m.IdleCPU)/float64(time.Millisecond))
}

func cellMiB(v int64) string {
	if v <= 0 {
		return none
	}
	return fmtMiB(v)
}

func (r *Report) controlTable() table {
	c := r.Control
	e := c.Event
	t := table{title: "Control plane (InvokeX only: RIE has none)", header: sharedHeader}
	sum := func(s Summary, pick func(Summary) time.Duration) string {
		if s.N == 0 {
			return none
		}
		return fmtMs(pick(s))
	}
	t.rows = append(t.rows,
		only("CreateFunction → Active p50", sum(c.CreateToActive, p50)),
		only("CreateFunction → Active p99", sum(c.CreateToActive, p99)),
		only("UpdateFunctionCode → first invoke on new code p50", sum(c.UpdateToNewCode, p50)),
		only("UpdateFunctionCode → first invoke on new code p99", sum(c.UpdateToNewCode, p99)),
	)
	if e.Sent > 0 {
		t.rows = append(t.rows,
			only("Event invokes accepted", fmt.Sprintf("%d of %d (%d rejected)", e.Accepted, e.Sent, e.Rejected)),
			only(fmt.Sprintf("Event invokes accepted per second (%d clients)", e.Workers), rateCell(e.AcceptedPerSec)),
			only("Event invokes: all run, from the first sent", fmtMs(e.AllRun)),
			only("Event invokes: all run, from the last accepted", fmtMs(e.AfterAccept)),
			only("Event invokes succeeded / failed / lost", fmt.Sprintf("%d / %d / %d", e.Succeeded, e.Failed, e.Lost)),
		)
	}
	if c.UpdateErrors > 0 {
		t.notes = append(t.notes, fmt.Sprintf("%d code updates failed", c.UpdateErrors))
	}
	if e.FirstError != "" {
		t.notes = append(t.notes, "Event invokes, first error: "+e.FirstError)
	}
	if e.Why != "" {
		t.notes = append(t.notes, "Event invokes not measured: "+e.Why)
	}
	return t
}

func (r *Report) targetTable() table {
	t := table{title: "Targets", header: []string{"target", "goal", "measured", "met", "missed by"}}
	for _, g := range r.Targets() {
		met := "no"
		switch {
		case !g.Measured:
			met = "not measured"
		case g.Met:
			met = "yes"
		}
		miss := g.Miss
		if miss == "" {
			miss = none
		}
		val := g.Value
		if val == "" {
			val = none
		}
		t.rows = append(t.rows, []string{g.Name, g.Goal, val, met, miss})
	}
	return t
}

func (r *Report) tables() []table {
	if isVMDriver(r.Driver) {
		return []table{r.targetTable(), r.warmTable(), r.coldTable(), r.snapStartTable(), r.memoryTable(), r.controlTable()}
	}
	return []table{r.targetTable(), r.warmTable(), r.coldTable(), r.memoryTable(), r.controlTable()}
}

// WriteText writes the report as aligned plain-text tables.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "InvokeX vs AWS Lambda RIE — %s, driver %s, %d cores, kernel %s, %s\n",
		r.Date.Format(time.RFC3339), r.Driver, r.Machine.Cores, r.Machine.Kernel, r.Machine.GoVersion)
	fmt.Fprintf(&b, "runs %d per concurrency level, %d cold starts per series, %d Event invokes\n",
		r.Runs, r.ColdStarts, r.EventCount)
	for _, t := range r.tables() {
		b.WriteString("\n")
		writeTextTable(&b, t)
	}
	if p := r.profileLines(); len(p) > 0 {
		b.WriteString("\nProfile\n")
		for _, l := range p {
			b.WriteString("  " + l + "\n")
		}
	}
	if len(r.Notes) > 0 {
		b.WriteString("\nNotes\n")
		for _, n := range r.Notes {
			b.WriteString("  - " + n + "\n")
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeTextTable(b *strings.Builder, t table) {
	b.WriteString(t.title + "\n")
	widths := make([]int, len(t.header))
	all := append([][]string{t.header}, t.rows...)
	for _, row := range all {
		for i, c := range row {
			if i < len(widths) && runeLen(c) > widths[i] {
				widths[i] = runeLen(c)
			}
		}
	}
	for n, row := range all {
		b.WriteString("  ")
		for i, c := range row {
			if i > 0 {
				b.WriteString("  ")
			}
			b.WriteString(c)
			if i < len(row)-1 {
				b.WriteString(strings.Repeat(" ", widths[i]-runeLen(c)))
			}
		}
		b.WriteString("\n")
		if n == 0 {
			total := 0
			for _, w := range widths {
				total += w + 2
			}
			b.WriteString("  " + strings.Repeat("-", total-2) + "\n")
		}
	}
	for _, n := range t.notes {
		b.WriteString("  * " + n + "\n")
	}
}

func runeLen(s string) int { return len([]rune(s)) }

func writeMarkdownTable(b *strings.Builder, t table) {
	esc := func(s string) string { return strings.ReplaceAll(s, "|", `\|`) }
	b.WriteString("| " + strings.Join(t.header, " | ") + " |\n")
	b.WriteString("|" + strings.Repeat(" --- |", len(t.header)) + "\n")
	for _, row := range t.rows {
		cells := make([]string, len(row))
		for i, c := range row {
			cells[i] = esc(strings.TrimLeft(c, " "))
			if strings.HasPrefix(c, "  ") {
				cells[i] = "&nbsp;&nbsp;" + cells[i]
			}
		}
		b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
	}
	if len(t.notes) > 0 {
		b.WriteString("\n")
		for _, n := range t.notes {
			b.WriteString("- " + n + "\n")
		}
	}
}

// profileLines summarises the profiles for both renderings.
func (r *Report) profileLines() []string {
	var out []string
	for _, p := range []ProfileResult{r.Profile, r.EventProfile} {
		out = append(out, p.lines()...)
	}
	return out
}

func (p ProfileResult) lines() []string {
	if p.Tool == "" {
		if p.Note == "" {
			return nil
		}
		return []string{"no profile of " + orNone(p.Load) + ": " + p.Note}
	}
	out := []string{fmt.Sprintf("%s, %d s of %s; %s", p.Tool, p.Seconds, p.Load, p.Note)}
	add := func(label string, s []Share) {
		if len(s) == 0 {
			return
		}
		parts := make([]string, 0, len(s))
		for _, x := range s {
			parts = append(parts, fmt.Sprintf("%s %.1f%%", x.Name, x.Percent))
		}
		out = append(out, "  "+label+": "+strings.Join(parts, ", "))
	}
	add("CPU by process role (% of all samples)", p.ByRole)
	add("server hot paths (InvokeX functions, inclusive of what they call)", p.ServerPaths)
	add("sandbox hot paths (InvokeX functions, inclusive)", p.SandboxPaths)
	add("hottest symbols in the server (self)", p.Server)
	add("hottest symbols in the sandboxes (self)", p.Sandbox)
	add("hottest symbols in the function processes (self)", p.Function)
	return out
}
