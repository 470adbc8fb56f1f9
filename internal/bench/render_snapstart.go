package bench

import "fmt"

// snapStartTable shows SnapStart on a VM driver: restores against the
// cold boots of the same server, in the RIE column's place.
func (r *Report) snapStartTable() table {
	s := r.SnapStart
	t := table{title: "SnapStart (environments restored from a published version's snapshot)",
		header: []string{"figure", "restored", "cold boot", "restored / cold boot"}}
	cold := r.ColdAfterScaleZero
	t.rows = append(t.rows,
		figure("to first byte p50", durOr(s.Restore.TTFB, p50), durOr(cold.TTFB, p50), msCell),
		figure("to first byte p99", durOr(s.Restore.TTFB, p99), durOr(cold.TTFB, p99), msCell),
		[]string{"samples", fmt.Sprint(s.Restore.TTFB.N), fmt.Sprint(cold.TTFB.N), none},
		only("PublishVersion → Active (boot, INIT, snapshot)", fmtMs(s.PublishToActive)),
		only("host memory of a restored 128 MB VM, RSS", cellMiB(s.RestoredVM.RSS)),
		only("host memory of a restored 128 MB VM, PSS", cellMiB(s.RestoredVM.PSS)),
		figure("python3.11: to first byte p50", durOr(s.PythonRestore.TTFB, p50), durOr(s.PythonCold.TTFB, p50), msCell),
		figure("python3.11: to first byte p99", durOr(s.PythonRestore.TTFB, p99), durOr(s.PythonCold.TTFB, p99), msCell),
	)
	for _, c := range []struct {
		label string
		s     ColdSeries
	}{{"python3.11 cold boots", s.PythonCold}, {"python3.11 restores", s.PythonRestore}} {
		if c.s.Why != "" {
			t.notes = append(t.notes, c.label+": not measured: "+c.s.Why)
		}
		if c.s.Errors > 0 {
			t.notes = append(t.notes, fmt.Sprintf("%s: %d failed; first: %s", c.label, c.s.Errors, c.s.FirstError))
		}
	}
	if s.Why != "" {
		t.notes = append(t.notes, "not measured: "+s.Why)
	}
	if s.Restore.Errors > 0 {
		t.notes = append(t.notes, fmt.Sprintf("%d failed restores; first: %s", s.Restore.Errors, s.Restore.FirstError))
	}
	return t
}

// snapStartTargets are the SnapStart issue's targets: a restored
// environment's first response ≤ 80 ms p50 and ≤ 0.15× the cold boot of
// the same function, and ≤ 56 MiB of host memory per restored VM.
func (r *Report) snapStartTargets() []Target {
	s, cold := r.SnapStart, r.ColdAfterScaleZero
	t := restoreTarget("SnapStart restore to first response", s.Restore.TTFB, cold.TTFB)
	py := restoreTarget("SnapStart restore to first response, python3.11", s.PythonRestore.TTFB, s.PythonCold.TTFB)
	m := Target{Name: "host memory per restored 128 MB VM", Goal: "≤ 56 MiB RSS"}
	if s.RestoredVM.RSS > 0 {
		m.Measured = true
		m.Value = fmt.Sprintf("%s RSS (PSS %s)", fmtMiB(s.RestoredVM.RSS), fmtMiB(s.RestoredVM.PSS))
		m.Met = s.RestoredVM.RSS <= 56<<20
		if !m.Met {
			m.Miss = fmt.Sprintf("%s over (%s)", fmtMiB(s.RestoredVM.RSS-56<<20), pctOver(float64(s.RestoredVM.RSS), 56<<20))
		}
	}
	return []Target{t, py, m}
}

// restoreTarget is "p50 ≤ 80 ms and ≤ 0.15× the cold boot of the same
// function" for one function's restores and cold boots.
func restoreTarget(name string, restore, cold Summary) Target {
	t := Target{Name: name, Goal: "p50 ≤ 80 ms and ≤ 0.15× cold boot"}
	if restore.N == 0 || cold.N == 0 {
		return t
	}
	p, c := restore.P50, cold.P50
	ratio := float64(p) / float64(c)
	t.Measured = true
	t.Value = fmt.Sprintf("%s = %.2f× cold boot %s", fmtMs(p), ratio, fmtMs(c))
	t.Met = ms(p) <= 80 && ratio <= 0.15
	if !t.Met {
		var miss []string
		if ms(p) > 80 {
			miss = append(miss, fmt.Sprintf("%.1f ms over", ms(p)-80))
		}
		if ratio > 0.15 {
			miss = append(miss, fmt.Sprintf("%.2f× instead of ≤ 0.15×", ratio))
		}
		t.Miss = joinComma(miss)
	}
	return t
}
