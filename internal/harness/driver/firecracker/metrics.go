package firecracker

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// hostMetrics sums the metrics records of every VM a driver ran (see
// observe.go), for Prometheus (Driver.Collector). Safe for concurrent
// use; a nil *hostMetrics records nothing.
type hostMetrics struct {
	mu     sync.Mutex
	sums   fcMetrics
	alarms map[string]int // VMs that raised each alarm
}

// add sums one VM's record f and the alarms it raised for that VM.
func (h *hostMetrics) add(f *fcFlush, raised []alarm) {
	if h == nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sums.add(f)
	for _, a := range raised {
		if h.alarms == nil {
			h.alarms = map[string]int{}
		}
		h.alarms[a.name]++
	}
}

var (
	descRecords = prometheus.NewDesc("invokex_firecracker_metrics_records_total",
		"Metrics records Firecracker wrote, all VMs.", nil, nil)
	descVCPUFailures = prometheus.NewDesc("invokex_firecracker_vcpu_failures_total",
		"vCPU exits Firecracker counted as failures, all VMs.", nil, nil)
	descDeviceBytes = prometheus.NewDesc("invokex_firecracker_device_bytes_total",
		"Bytes moved by the VMs' block, net and vsock devices.", []string{"device", "direction"}, nil)
	descMissed = prometheus.NewDesc("invokex_firecracker_missed_total",
		"Log lines and metrics records Firecracker could not write (a full pipe).", []string{"what"}, nil)
	descAlarms = prometheus.NewDesc("invokex_firecracker_alarms_total",
		"VMs whose Firecracker reported a seccomp fault or caught a deadly signal.", []string{"alarm"}, nil)
)

// Collector returns the driver's metrics, sums over every VM it ran (from
// their metrics records so far); the harness registers it.
func (d *Driver) Collector() prometheus.Collector { return &d.stats }

// Describe implements prometheus.Collector.
func (h *hostMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, desc := range []*prometheus.Desc{descRecords, descVCPUFailures, descDeviceBytes, descMissed, descAlarms} {
		ch <- desc
	}
}

// Collect implements prometheus.Collector.
func (h *hostMetrics) Collect(ch chan<- prometheus.Metric) {
	h.mu.Lock()
	s := h.sums
	alarms := make(map[string]int, len(h.alarms))
	for k, v := range h.alarms {
		alarms[k] = v
	}
	h.mu.Unlock()
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), labels...)
	}
	counter(descRecords, uint64(s.Flushes))
	counter(descVCPUFailures, s.VCPUFailures)
	counter(descDeviceBytes, s.BlockReadBytes, "block", "read")
	counter(descDeviceBytes, s.BlockWriteBytes, "block", "write")
	counter(descDeviceBytes, s.NetRxBytes, "net", "rx")
	counter(descDeviceBytes, s.NetTxBytes, "net", "tx")
	counter(descDeviceBytes, s.VsockRxBytes, "vsock", "rx")
	counter(descDeviceBytes, s.VsockTxBytes, "vsock", "tx")
	counter(descMissed, s.MissedLogs, "log_lines")
	counter(descMissed, s.MissedMetrics, "metrics_records")
	for _, name := range append([]string{"seccomp_faults"}, deadlySignals...) {
		counter(descAlarms, uint64(alarms[name]), name)
	}
}
