package bench

import (
	"math"
	"sort"
	"time"
)

// Summary describes a sample of durations. Percentiles are nearest-rank:
// P99 of 50 values is the 50th smallest, never an interpolation between
// two observations, so every figure is a latency that really happened.
type Summary struct {
	N    int
	Min  time.Duration
	P50  time.Duration
	P90  time.Duration
	P99  time.Duration
	Max  time.Duration
	Mean time.Duration
}

// Summarize returns the summary of d (which it does not modify). The zero
// Summary describes an empty sample.
func Summarize(d []time.Duration) Summary {
	if len(d) == 0 {
		return Summary{}
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	var sum time.Duration
	for _, v := range s {
		sum += v
	}
	return Summary{
		N:    len(s),
		Min:  s[0],
		P50:  Percentile(s, 50),
		P90:  Percentile(s, 90),
		P99:  Percentile(s, 99),
		Max:  s[len(s)-1],
		Mean: sum / time.Duration(len(s)),
	}
}

// Percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// sorted, which must be in ascending order: the smallest value such that at
// least p% of the sample is at or below it. p <= 0 gives the minimum; an
// empty sample gives 0.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	if p <= 0 {
		return sorted[0]
	}
	if p >= 100 {
		return sorted[n-1]
	}
	// The small epsilon keeps p*n that is an integer in exact arithmetic
	// (e.g. 0.9*50 = 45) from rounding up to the next rank in floating point.
	rank := int(math.Ceil(p/100*float64(n) - 1e-9))
	if rank < 1 {
		rank = 1
	}
	return sorted[rank-1]
}

// Ratio returns a/b and whether it is defined (b > 0 and neither value is
// missing). Missing values are negative: the report uses -1 for "not
// measured".
func Ratio(a, b float64) (float64, bool) {
	if b <= 0 || a < 0 || math.IsNaN(a) || math.IsNaN(b) || math.IsInf(a, 0) || math.IsInf(b, 0) {
		return 0, false
	}
	return a / b, true
}

// ms converts a duration to fractional milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// msToDuration converts fractional milliseconds to a duration.
func msToDuration(v float64) time.Duration { return time.Duration(v * float64(time.Millisecond)) }
