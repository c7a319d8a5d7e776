package metrics

import (
	"strings"
	"testing"
)

func TestTheTextFormat(t *testing.T) {
	var r Registry
	c := r.NewCounter("llmjax_requests_total", "Requests.", "route", "code")
	c.Add(1, "/v1/completions", "200")
	c.Add(2, "/v1/completions", "200")
	c.Add(1, "/v1/chat/completions", "429")
	r.NewGaugeFunc("llmjax_queue_depth", "Waiting.", func() float64 { return 3 })
	h := r.NewHistogram("llmjax_latency_seconds", "Latency.", []float64{1, 0.1}, "route")
	for _, v := range []float64{0.05, 0.5, 5} {
		h.Observe(v, "/v1/completions")
	}
	var b strings.Builder
	r.Write(&b)
	want := `# HELP llmjax_requests_total Requests.
# TYPE llmjax_requests_total counter
llmjax_requests_total{route="/v1/chat/completions",code="429"} 1
llmjax_requests_total{route="/v1/completions",code="200"} 3
# HELP llmjax_queue_depth Waiting.
# TYPE llmjax_queue_depth gauge
llmjax_queue_depth 3
# HELP llmjax_latency_seconds Latency.
# TYPE llmjax_latency_seconds histogram
llmjax_latency_seconds_bucket{route="/v1/completions",le="0.1"} 1
llmjax_latency_seconds_bucket{route="/v1/completions",le="1"} 2
llmjax_latency_seconds_bucket{route="/v1/completions",le="+Inf"} 3
llmjax_latency_seconds_sum{route="/v1/completions"} 5.55
llmjax_latency_seconds_count{route="/v1/completions"} 3
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
	if c.Value("/v1/completions", "200") != 3 {
		t.Errorf("Value = %v", c.Value("/v1/completions", "200"))
	}
}

func TestLabelValuesAreEscaped(t *testing.T) {
	if got := labelText([]string{"a"}, []string{"x\"y\\z\n"}); got != `{a="x\"y\\z\n"}` {
		t.Errorf("labelText = %s", got)
	}
}
