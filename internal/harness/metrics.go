package harness

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics exports the harness to Prometheus. A nil *metrics records
// nothing, so the harness calls it unconditionally.
type metrics struct {
	driverStart prometheus.Histogram
	init        prometheus.Histogram
	invokeTime  prometheus.Histogram
	stats       *statsCollector
}

// driverMetrics is implemented by a Driver with metrics of its own (the
// firecracker driver's, from Firecracker's metrics system): the harness
// registers them with its own.
type driverMetrics interface {
	Collector() prometheus.Collector
}

func newMetrics(reg prometheus.Registerer, drv any) (*metrics, error) {
	if reg == nil {
		return nil, nil
	}
	buckets := prometheus.ExponentialBuckets(0.001, 2, 16) // 1 ms .. ~33 s
	m := &metrics{
		driverStart: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "invokex", Subsystem: "harness", Name: "driver_start_seconds",
			Help: "Time Driver.Start took on cold starts.", Buckets: buckets,
		}),
		init: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "invokex", Subsystem: "harness", Name: "init_seconds",
			Help: "Time from Init to InitDone on cold starts.", Buckets: buckets,
		}),
		invokeTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "invokex", Subsystem: "harness", Name: "invoke_seconds",
			Help: "Time from Invoke to Result as the harness sees it.", Buckets: buckets,
		}),
		stats: &statsCollector{},
	}
	cs := []prometheus.Collector{m.driverStart, m.init, m.invokeTime, m.stats}
	if dm, ok := drv.(driverMetrics); ok {
		cs = append(cs, dm.Collector())
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// bind lets the collector read h's Stats at scrape time.
func (m *metrics) bind(h *Harness) { m.stats.h = h }

func (m *metrics) coldStart(driverStart, init time.Duration) {
	if m == nil {
		return
	}
	m.driverStart.Observe(driverStart.Seconds())
	m.init.Observe(init.Seconds())
}

func (m *metrics) invoke(d time.Duration) {
	if m == nil {
		return
	}
	m.invokeTime.Observe(d.Seconds())
}

var (
	descInstances = prometheus.NewDesc("invokex_harness_instances",
		"Instances by function and state.", []string{"function", "state"}, nil)
	descMemory = prometheus.NewDesc("invokex_harness_reserved_memory_megabytes",
		"Memory reserved by the host's instances.", nil, nil)
	descEvents = prometheus.NewDesc("invokex_harness_events_total",
		"Harness events by kind.", []string{"event"}, nil)
)

// statsCollector turns Stats into metrics when scraped.
type statsCollector struct{ h *Harness }

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descInstances
	ch <- descMemory
	ch <- descEvents
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	if c.h == nil {
		return
	}
	s := c.h.Stats()
	for name, f := range s.Functions {
		for _, kv := range []struct {
			state string
			n     int
		}{{"starting", f.Starting}, {"idle", f.Idle}, {"busy", f.Busy}, {"stopping", f.Stopping}} {
			ch <- prometheus.MustNewConstMetric(descInstances, prometheus.GaugeValue, float64(kv.n), name, kv.state)
		}
	}
	ch <- prometheus.MustNewConstMetric(descMemory, prometheus.GaugeValue, float64(s.MemoryMB))
	for _, kv := range []struct {
		event string
		n     uint64
	}{
		{"invocation", s.Invocations}, {"cold_start", s.ColdStarts}, {"throttle", s.Throttles},
		{"init_error", s.InitErrors}, {"reset", s.Resets}, {"timeout", s.Timeouts},
		{"exit", s.Exits}, {"eviction", s.Evictions}, {"stop", s.Stops},
	} {
		ch <- prometheus.MustNewConstMetric(descEvents, prometheus.CounterValue, float64(kv.n), kv.event)
	}
}
