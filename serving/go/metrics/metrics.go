// Package metrics keeps counters, gauges and histograms and writes them in
// the Prometheus text exposition format (version 0.0.4), with the standard
// library only.
package metrics

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strings"
	"sync"
)

// Registry holds metrics in the order they were made.
type Registry struct {
	mu      sync.Mutex
	metrics []metric
}

type metric interface {
	write(w io.Writer)
}

func (r *Registry) add(m metric) {
	r.mu.Lock()
	r.metrics = append(r.metrics, m)
	r.mu.Unlock()
}

// Write writes every metric.
func (r *Registry) Write(w io.Writer) {
	r.mu.Lock()
	ms := append([]metric(nil), r.metrics...)
	r.mu.Unlock()
	for _, m := range ms {
		m.write(w)
	}
}

// ContentType is the exposition format's content type.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

func header(w io.Writer, name, help, kind string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
}

// labelText renders names and values as {a="x",b="y"} (empty without labels).
func labelText(names, values []string) string {
	if len(names) == 0 {
		return ""
	}
	parts := make([]string, len(names))
	for i, n := range names {
		v := strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(values[i])
		parts[i] = n + `="` + v + `"`
	}
	return "{" + strings.Join(parts, ",") + "}"
}

func number(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	}
	return fmt.Sprintf("%g", v)
}

// Counter is a monotonically increasing value per label set.
type Counter struct {
	name, help string
	labels     []string
	mu         sync.Mutex
	values     map[string]float64
	keys       map[string][]string
}

// NewCounter registers a counter with the given label names.
func (r *Registry) NewCounter(name, help string, labels ...string) *Counter {
	c := &Counter{name: name, help: help, labels: labels, values: map[string]float64{},
		keys: map[string][]string{}}
	r.add(c)
	return c
}

// Add adds v to the counter of the label values (given in label order).
func (c *Counter) Add(v float64, labelValues ...string) {
	key := strings.Join(labelValues, "\xff")
	c.mu.Lock()
	c.values[key] += v
	c.keys[key] = labelValues
	c.mu.Unlock()
}

// Value is the counter of the label values.
func (c *Counter) Value(labelValues ...string) float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.values[strings.Join(labelValues, "\xff")]
}

func (c *Counter) write(w io.Writer) {
	header(w, c.name, c.help, "counter")
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]string, 0, len(c.values))
	for k := range c.values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) == 0 && len(c.labels) == 0 {
		fmt.Fprintf(w, "%s 0\n", c.name)
	}
	for _, k := range keys {
		fmt.Fprintf(w, "%s%s %s\n", c.name, labelText(c.labels, c.keys[k]), number(c.values[k]))
	}
}

// GaugeFunc reports a value read when metrics are written.
type GaugeFunc struct {
	name, help string
	f          func() float64
}

// NewGaugeFunc registers a gauge whose value f gives.
func (r *Registry) NewGaugeFunc(name, help string, f func() float64) *GaugeFunc {
	g := &GaugeFunc{name: name, help: help, f: f}
	r.add(g)
	return g
}

func (g *GaugeFunc) write(w io.Writer) {
	header(w, g.name, g.help, "gauge")
	fmt.Fprintf(w, "%s %s\n", g.name, number(g.f()))
}

// Histogram counts observations in cumulative buckets per label set.
type Histogram struct {
	name, help string
	labels     []string
	bounds     []float64
	mu         sync.Mutex
	series     map[string]*series
}

type series struct {
	labelValues []string
	counts      []uint64 // per bound, not cumulative
	count       uint64
	sum         float64
}

// NewHistogram registers a histogram with upper bounds (sorted) and labels.
func (r *Registry) NewHistogram(name, help string, bounds []float64, labels ...string) *Histogram {
	h := &Histogram{name: name, help: help, labels: labels,
		bounds: append([]float64(nil), bounds...), series: map[string]*series{}}
	sort.Float64s(h.bounds)
	r.add(h)
	return h
}

// Observe records v for the label values.
func (h *Histogram) Observe(v float64, labelValues ...string) {
	key := strings.Join(labelValues, "\xff")
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.series[key]
	if s == nil {
		s = &series{labelValues: labelValues, counts: make([]uint64, len(h.bounds))}
		h.series[key] = s
	}
	for i, b := range h.bounds {
		if v <= b {
			s.counts[i]++
			break
		}
	}
	s.count++
	s.sum += v
}

func (h *Histogram) write(w io.Writer) {
	header(w, h.name, h.help, "histogram")
	h.mu.Lock()
	defer h.mu.Unlock()
	keys := make([]string, 0, len(h.series))
	for k := range h.series {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s := h.series[k]
		names := append(append([]string(nil), h.labels...), "le")
		var cum uint64
		for i, b := range h.bounds {
			cum += s.counts[i]
			values := append(append([]string(nil), s.labelValues...), number(b))
			fmt.Fprintf(w, "%s_bucket%s %d\n", h.name, labelText(names, values), cum)
		}
		values := append(append([]string(nil), s.labelValues...), "+Inf")
		fmt.Fprintf(w, "%s_bucket%s %d\n", h.name, labelText(names, values), s.count)
		lt := labelText(h.labels, s.labelValues)
		fmt.Fprintf(w, "%s_sum%s %s\n%s_count%s %d\n", h.name, lt, number(s.sum), h.name, lt, s.count)
	}
}
