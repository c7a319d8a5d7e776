// Command llmjax-load sends concurrent completion requests to an
// OpenAI-compatible server and prints one JSON summary: status codes,
// completion tokens per second, requests per second and latency percentiles.
//
//	bin/llmjax-load -url http://127.0.0.1:8000/v1/completions -clients 16 -requests 8 \
//	    -body '{"model": "llm_jax", "prompt": "def main(", "max_tokens": 32, "temperature": 0}'
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"llmjax/serving/load"
)

func main() {
	var cfg load.Config
	var body string
	flag.StringVar(&cfg.URL, "url", "http://127.0.0.1:8000/v1/completions", "endpoint to POST to")
	flag.StringVar(&body, "body", `{"model": "llm_jax", "prompt": "def main(", "max_tokens": 16}`, "request body (JSON)")
	flag.IntVar(&cfg.Clients, "clients", 16, "concurrent clients")
	flag.IntVar(&cfg.Requests, "requests", 8, "requests per client, one after another")
	flag.StringVar(&cfg.APIKey, "api_key", os.Getenv("LLMJAX_API_KEY"), "bearer key to send")
	flag.DurationVar(&cfg.Timeout, "timeout", 120*time.Second, "one request's time limit")
	flag.Parse()
	if !json.Valid([]byte(body)) || cfg.Clients < 1 || cfg.Requests < 1 {
		fmt.Fprintln(os.Stderr, "error: -body must be JSON and -clients, -requests at least 1")
		os.Exit(2)
	}
	cfg.Body = []byte(body)
	out, _ := json.Marshal(load.Run(context.Background(), cfg))
	fmt.Println(string(out))
}
