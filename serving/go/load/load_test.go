package load

import (
	"context"
	"math"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func TestPercentileIsTheNearestRank(t *testing.T) {
	v := []float64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}
	for p, want := range map[float64]float64{50: 5, 90: 9, 99: 10, 100: 10, 0: 1} {
		if got := Percentile(v, p); got != want {
			t.Errorf("p%v = %v, want %v", p, got, want)
		}
	}
	if !math.IsNaN(Percentile(nil, 50)) {
		t.Error("no values should give NaN")
	}
}

func TestRunCountsCodesAndTokens(t *testing.T) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1)%4 == 0 {
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		if r.Header.Get("Authorization") != "Bearer k" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		_, _ = w.Write([]byte(`{"usage": {"completion_tokens": 7}}`))
	}))
	defer srv.Close()
	r := Run(context.Background(), Config{URL: srv.URL, Body: []byte(`{}`), Clients: 4, Requests: 5,
		APIKey: "k", Timeout: 5 * time.Second})
	if r.Requests != 20 || r.Codes["200"] != 15 || r.Codes["429"] != 5 || r.Tokens != 15*7 {
		t.Errorf("result %+v", r)
	}
	if r.Latency["p50"] <= 0 || r.Latency["p99"] < r.Latency["p50"] || r.TokensPerSec <= 0 {
		t.Errorf("latency %v, tokens/s %v", r.Latency, r.TokensPerSec)
	}
}
