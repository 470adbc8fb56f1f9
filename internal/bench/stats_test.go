package bench

import (
	"reflect"
	"testing"
	"time"
)

func durs(ms ...int) []time.Duration {
	out := make([]time.Duration, len(ms))
	for i, v := range ms {
		out[i] = time.Duration(v) * time.Millisecond
	}
	return out
}

func seq(n int) []time.Duration {
	out := make([]time.Duration, n)
	for i := range out {
		out[i] = time.Duration(i+1) * time.Millisecond
	}
	return out
}

func TestPercentileNearestRank(t *testing.T) {
	cases := []struct {
		name   string
		sorted []time.Duration
		p      float64
		want   time.Duration
	}{
		{"empty", nil, 50, 0},
		{"single p50", durs(7), 50, 7 * time.Millisecond},
		{"single p99", durs(7), 99, 7 * time.Millisecond},
		{"10 p50", seq(10), 50, 5 * time.Millisecond},
		{"10 p90", seq(10), 90, 9 * time.Millisecond},
		{"10 p99", seq(10), 99, 10 * time.Millisecond},
		{"100 p99", seq(100), 99, 99 * time.Millisecond},
		{"100 p90", seq(100), 90, 90 * time.Millisecond},
		{"50 p90 is the 45th", seq(50), 90, 45 * time.Millisecond},
		{"50 p99 is the 50th", seq(50), 99, 50 * time.Millisecond},
		{"p0 is the minimum", seq(10), 0, 1 * time.Millisecond},
		{"p100 is the maximum", seq(10), 100, 10 * time.Millisecond},
		{"2 p50 is the lower", durs(1, 3), 50, 1 * time.Millisecond},
		{"2 p51 is the upper", durs(1, 3), 51, 3 * time.Millisecond},
	}
	for _, c := range cases {
		if got := Percentile(c.sorted, c.p); got != c.want {
			t.Errorf("%s: Percentile(p=%v) = %v, want %v", c.name, c.p, got, c.want)
		}
	}
}

func TestSummarizeSortsACopy(t *testing.T) {
	in := durs(9, 1, 5, 3, 7)
	orig := append([]time.Duration(nil), in...)
	s := Summarize(in)
	if !reflect.DeepEqual(in, orig) {
		t.Errorf("Summarize modified its input: %v", in)
	}
	want := Summary{N: 5, Min: 1 * time.Millisecond, P50: 5 * time.Millisecond, P90: 9 * time.Millisecond,
		P99: 9 * time.Millisecond, Max: 9 * time.Millisecond, Mean: 5 * time.Millisecond}
	if s != want {
		t.Errorf("Summarize = %+v, want %+v", s, want)
	}
	if (Summarize(nil) != Summary{}) {
		t.Errorf("Summarize(nil) = %+v, want zero", Summarize(nil))
	}
}

func TestRatio(t *testing.T) {
	if r, ok := Ratio(3, 2); !ok || r != 1.5 {
		t.Errorf("Ratio(3, 2) = %v, %v; want 1.5, true", r, ok)
	}
	if r, ok := Ratio(0, 2); !ok || r != 0 {
		t.Errorf("Ratio(0, 2) = %v, %v; want 0, true", r, ok)
	}
	for _, c := range [][2]float64{{1, 0}, {-1, 2}, {2, -1}} {
		if _, ok := Ratio(c[0], c[1]); ok {
			t.Errorf("Ratio(%v, %v) is defined, want undefined", c[0], c[1])
		}
	}
}

func TestSummarizeCold(t *testing.T) {
	s := summarizeCold([]coldSample{
		{ttfb: 10 * time.Millisecond, total: 11 * time.Millisecond, init: 4 * time.Millisecond, haveInit: true, cold: true},
		{ttfb: 20 * time.Millisecond, total: 21 * time.Millisecond, init: 5 * time.Millisecond, haveInit: true, cold: true},
		{ttfb: 2 * time.Millisecond, total: 3 * time.Millisecond},
	}, 1, "boom")
	if s.TTFB.N != 3 || s.Init.N != 2 || s.Net.N != 2 || s.Cold != 2 || s.Errors != 1 || s.FirstError != "boom" {
		t.Fatalf("summarizeCold = %+v", s)
	}
	// Net is per sample (10-4, 20-5), not p50(ttfb)-p50(init).
	if s.Net.Min != 6*time.Millisecond || s.Net.Max != 15*time.Millisecond {
		t.Errorf("Net min/max = %v/%v, want 6ms/15ms", s.Net.Min, s.Net.Max)
	}
}
