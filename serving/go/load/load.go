// Package load drives an OpenAI-compatible completions endpoint with
// concurrent clients and sums up what came back: status codes, completion
// tokens (from each response's usage), latency percentiles and throughput.
package load

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"sync"
	"time"
)

// Config is one load run: Clients each send Requests requests, one at a
// time, of Body (a JSON request) to URL.
type Config struct {
	URL      string
	Body     []byte
	Clients  int
	Requests int // per client
	APIKey   string
	Timeout  time.Duration
}

// Result sums a run up.
type Result struct {
	Clients      int            `json:"clients"`
	Requests     int            `json:"requests"`
	Codes        map[string]int `json:"codes"` // status code (or "error") -> count
	Tokens       int            `json:"completion_tokens"`
	Seconds      float64        `json:"seconds"`
	TokensPerSec float64        `json:"tokens_per_second"`
	RequestsPerS float64        `json:"requests_per_second"`
	// Latency of the 200s: p50, p90, p99, max (0 when none succeeded).
	Latency map[string]float64 `json:"latency_seconds"`
}

type outcome struct {
	code    string
	tokens  int
	latency time.Duration
}

// Run sends the requests and waits for all of them.
func Run(ctx context.Context, cfg Config) Result {
	client := &http.Client{Timeout: cfg.Timeout, Transport: &http.Transport{MaxIdleConnsPerHost: cfg.Clients}}
	outcomes := make(chan outcome, cfg.Clients*cfg.Requests)
	start := time.Now()
	var wg sync.WaitGroup
	for c := 0; c < cfg.Clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < cfg.Requests && ctx.Err() == nil; i++ {
				outcomes <- one(ctx, client, cfg)
			}
		}()
	}
	wg.Wait()
	close(outcomes)
	return summarize(cfg.Clients, outcomes, time.Since(start))
}

func one(ctx context.Context, client *http.Client, cfg Config) outcome {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, cfg.URL, bytes.NewReader(cfg.Body))
	if err != nil {
		return outcome{code: "error"}
	}
	req.Header.Set("Content-Type", "application/json")
	if cfg.APIKey != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.APIKey)
	}
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return outcome{code: "error"}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	o := outcome{code: fmt.Sprint(resp.StatusCode), latency: time.Since(t0)}
	if err != nil {
		o.code = "error"
		return o
	}
	if resp.StatusCode == http.StatusOK {
		var r struct {
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if json.Unmarshal(body, &r) != nil {
			o.code = "bad-body"
		}
		o.tokens = r.Usage.CompletionTokens
	}
	return o
}

func summarize(clients int, outcomes <-chan outcome, took time.Duration) Result {
	r := Result{Clients: clients, Codes: map[string]int{}, Seconds: took.Seconds()}
	var lat []float64
	for o := range outcomes {
		r.Requests++
		r.Codes[o.code]++
		r.Tokens += o.tokens
		if o.code == "200" {
			lat = append(lat, o.latency.Seconds())
		}
	}
	sort.Float64s(lat)
	r.Latency = map[string]float64{}
	for name, p := range map[string]float64{"p50": 50, "p90": 90, "p99": 99, "max": 100} {
		if v := Percentile(lat, p); !math.IsNaN(v) {
			r.Latency[name] = v
		} else {
			r.Latency[name] = 0
		}
	}
	if r.Seconds > 0 {
		r.TokensPerSec = float64(r.Tokens) / r.Seconds
		r.RequestsPerS = float64(r.Requests) / r.Seconds
	}
	return r
}

// Percentile is the nearest-rank percentile p (0-100) of sorted values (NaN
// for none).
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	return sorted[rank-1]
}
