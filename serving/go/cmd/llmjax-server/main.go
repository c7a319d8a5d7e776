// Command llmjax-server serves an llm_jax SavedModel over an OpenAI-compatible
// HTTP API: POST /v1/completions and /v1/chat/completions (streamed as
// Server-Sent Events with "stream": true), GET /v1/models, /health, /metrics.
//
//	bin/llmjax-server -model RUN/export/1 -addr 127.0.0.1:8000 -max_batch 16
//
// Concurrent requests share decode steps (continuous batching over the
// export's prefill and decode_step signatures, see package engine); requests
// beyond -max_batch rows wait in a queue of -queue, beyond which the answer
// is 429 with Retry-After. SIGTERM or Ctrl-C stops accepting connections,
// lets the requests in flight finish (up to -shutdown_timeout) and exits 0.
// The line "listening on ADDR" on stdout says where it listens (useful with
// -addr 127.0.0.1:0, a free port).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"llmjax/serving/backend"
	"llmjax/serving/engine"
	"llmjax/serving/server"
)

// Set by build.sh (-ldflags -X) to the wheel's tensorflow-text op library.
var defaultSentencepieceLib = ""

type options struct {
	model, addr, name, spLib, apiKey string
	maxBatch, queue                  int
	maxBody                          int64
	timeout, shutdown                time.Duration
	warmup                           bool
}

func main() {
	var o options
	flag.StringVar(&o.model, "model", "", "SavedModel directory (an llm_jax export)")
	flag.StringVar(&o.addr, "addr", "127.0.0.1:8000", "address to listen on (port 0: a free one)")
	flag.StringVar(&o.name, "model_name", "llm_jax", "the model's name in the API")
	flag.IntVar(&o.maxBatch, "max_batch", 0, "rows decoded together at most (0: the export's largest batch bucket)")
	flag.IntVar(&o.queue, "queue", 64, "requests waiting for rows at most; more are answered 429")
	flag.Int64Var(&o.maxBody, "max_body_bytes", 1<<20, "largest request body; larger ones are answered 413")
	flag.DurationVar(&o.timeout, "request_timeout", 120*time.Second, "a request's time limit (504 after it)")
	flag.DurationVar(&o.shutdown, "shutdown_timeout", 60*time.Second, "how long SIGTERM waits for requests in flight")
	flag.BoolVar(&o.warmup, "warmup", true, "compile the batch shapes before listening")
	flag.StringVar(&o.apiKey, "api_key", os.Getenv("LLMJAX_API_KEY"),
		"require Authorization: Bearer KEY on /v1/ (default $LLMJAX_API_KEY; empty: open)")
	flag.StringVar(&o.spLib, "sentencepiece_lib", defaultSentencepieceLib,
		"tensorflow-text's _sentencepiece_tokenizer.so (empty: not loaded)")
	flag.Parse()
	if o.model == "" {
		fmt.Fprintln(os.Stderr, "error: pass -model DIR (an llm_jax export)")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		os.Exit(1)
	}
}

// batchSizes are the export's batch buckets up to maxBatch, then doublings
// up to maxBatch.
func batchSizes(buckets []int, maxBatch int) []int {
	var sizes []int
	top := 0
	for _, b := range buckets {
		if b <= maxBatch {
			sizes, top = append(sizes, b), b
		}
	}
	for s := 1; s < maxBatch; s *= 2 {
		if s > top {
			sizes = append(sizes, s)
		}
	}
	sizes = append(sizes, maxBatch)
	sort.Ints(sizes)
	out := sizes[:0]
	for i, s := range sizes {
		if i == 0 || s != sizes[i-1] {
			out = append(out, s)
		}
	}
	return out
}

func run(o options) error {
	logger := log.New(os.Stderr, "llmjax-server: ", log.LstdFlags)
	model, err := backend.Load(o.model, o.spLib)
	if err != nil {
		return err
	}
	defer model.Close()
	info := model.Info
	if o.maxBatch == 0 && len(info.BatchBuckets) > 0 {
		o.maxBatch = info.BatchBuckets[len(info.BatchBuckets)-1]
	}
	if o.maxBatch < 1 {
		o.maxBatch = 1
	}
	sizes := batchSizes(info.BatchBuckets, o.maxBatch)
	if o.warmup {
		t0 := time.Now()
		if err := model.Warmup(sizes); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
		logger.Printf("warmed up batch sizes %v in %.1fs", sizes, time.Since(t0).Seconds())
	}
	var stops []int32
	for _, id := range info.StopIDs {
		stops = append(stops, int32(id))
	}
	cfg := server.Config{ModelName: o.name, MaxTokens: info.MaxNewTokens, MaxLen: info.MaxLen,
		VocabSize: info.VocabSize, MaxN: o.maxBatch, TopLogprobs: info.TopLogprobs, EOSID: info.EOSID,
		ChatTemplate: info.ChatTemplate, APIKey: o.apiKey, MaxBodyBytes: o.maxBody,
		RequestTimeout: o.timeout, Log: logger}
	var srv *server.Server
	ecfg := engine.Config{MaxBatch: o.maxBatch, BatchSizes: sizes, QueueLimit: o.queue,
		Slots: info.Cache.Slots, StopIDs: stops,
		Observe: func(rows, batch int, took time.Duration) { srv.ObserveStep(rows, batch, took) }}
	if model.HasText() {
		ecfg.Detokenize = model.Detokenize
	}
	eng, err := engine.New(model, ecfg)
	if err != nil {
		return err
	}
	srv = server.New(cfg, model, eng)
	return serve(o, srv, eng, logger)
}

func serve(o options, srv *server.Server, eng *engine.Engine, logger *log.Logger) error {
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	// No WriteTimeout: a stream lasts as long as its request (the request
	// timeout ends it). A read deadline expiring while a handler runs would
	// cancel its context, so ReadTimeout outlives the request timeout.
	hs := &http.Server{Handler: srv, ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout: o.timeout + 10*time.Second, IdleTimeout: 120 * time.Second, ErrorLog: logger}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	failed := make(chan error, 1)
	go func() { failed <- hs.Serve(ln) }()
	fmt.Printf("listening on %s\n", ln.Addr())
	logger.Printf("serving %s on http://%s (max batch %d, queue %d)", o.model, ln.Addr(), o.maxBatch, o.queue)
	select {
	case err := <-failed:
		return err
	case <-ctx.Done():
	}
	logger.Printf("stopping: finishing the requests in flight (at most %v)", o.shutdown)
	srv.SetClosing()
	sctx, cancel := context.WithTimeout(context.Background(), o.shutdown)
	defer cancel()
	if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := eng.Close(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Printf("stopped")
	return nil
}
