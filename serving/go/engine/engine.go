// Package engine batches generation requests over a model that decodes one
// step at a time (continuous batching).
//
// One goroutine owns the model's batch. Each turn it drops the rows whose
// request was cancelled, admits waiting requests into free rows (one prefill
// call for all of them), then runs one decode step for every row at once and
// hands each request its new tokens as they come. A request that finishes
// frees its rows at once, so a newcomer waits for a row, not for a whole
// batch. Requests beyond the rows wait in a bounded queue; beyond that,
// Submit says ErrQueueFull.
//
// The model is a Backend (the TensorFlow one is package backend); the
// engine itself needs no TensorFlow, and its tests run on a fake.
package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Sampling settings of one request (as the export's signatures take them).
type Sampling struct {
	Temperature float32 // <= 0: greedy
	TopK        int32   // <= 0: off
	TopP        float32 // >= 1: off
	Seed        int32
}

// TokenLogprob is a token and its log-probability.
type TokenLogprob struct {
	Token   int32
	Logprob float32
}

// Sample is one drawn token, its log-probability under the model and the
// likeliest tokens at that step.
type Sample struct {
	TokenLogprob
	Top []TokenLogprob
}

// Scored is the log-probability of each token of a sequence given those
// before it (the first has none: 0) and the likeliest tokens at each place.
type Scored struct {
	Logprobs []float32
	Top      [][]TokenLogprob
}

// PrefillRow is a prompt to start; Index is the row's place among its
// request's choices (it keys the sampling, as a row of a batch does).
type PrefillRow struct {
	Prompt []int32
	Sampling
	Index int32
}

// StepRow feeds one row's last token at its position (= its cache slot) and
// draws the row's token number Step.
type StepRow struct {
	Token, Position, Step int32
	Sampling
	Index int32
}

// Cache is the backend's KV cache of a batch, one row per sequence.
type Cache interface {
	Rows() int
	Close()
}

// Backend runs the model. Its methods are called from one goroutine.
type Backend interface {
	// Prefill runs prompts and draws each one's first token; the cache it
	// returns has (at least) one row per prompt.
	Prefill(rows []PrefillRow) ([]Sample, Cache, error)
	// NewCache is an empty cache of rows rows and every slot of the context.
	NewCache(rows int) (Cache, error)
	// CopyRow copies a row of src (a batch or a prefill cache) into dst.
	CopyRow(dst Cache, dstRow int, src Cache, srcRow int) error
	// Step runs one decode step for every row of c (len(rows) == c.Rows())
	// and updates c.
	Step(c Cache, rows []StepRow) ([]Sample, error)
}

// Config sets the engine's limits.
type Config struct {
	MaxBatch   int   // rows decoded together at most
	BatchSizes []int // cache sizes to use (each compiles once); MaxBatch is added
	QueueLimit int   // requests waiting for rows at most
	Slots      int   // the context: a row stops when its sequence fills it
	StopIDs    []int32
	// Detokenize turns each row of tokens into text (nil: events carry no text).
	Detokenize func([][]int32) ([]string, error)
	// Observe, if set, is told the rows of each decode step and its duration.
	Observe func(rows, batch int, took time.Duration)
}

// Errors of Submit.
var (
	ErrQueueFull = errors.New("the queue of waiting requests is full")
	ErrClosed    = errors.New("the server is shutting down")
)

// Event is what a request receives: a new token of one choice (Done false)
// or the end of the choice (Done true, Finish "stop" or "length"). Text is
// the choice's whole text so far. Err ends the request.
type Event struct {
	Choice int
	Sample Sample
	Text   string
	Done   bool
	Finish string
	Err    error
}

// Request is one submitted generation (N choices of one prompt).
type Request struct {
	Prompt    []int32
	N         int
	MaxTokens int
	Sampling  Sampling
	ctx       context.Context
	events    chan Event
	stopped   []atomic.Bool
	open      int // choices not finished (engine goroutine only)
}

// Events delivers the request's events; it is closed after the last one.
func (r *Request) Events() <-chan Event { return r.events }

// StopChoice asks the engine to end a choice (e.g. a stop string appeared);
// it finishes with Finish "stop" at the next turn.
func (r *Request) StopChoice(i int) {
	if i >= 0 && i < len(r.stopped) {
		r.stopped[i].Store(true)
	}
}

// seq is one row of the batch: a choice of a request.
type seq struct {
	req    *Request
	choice int
	tokens []int32
	last   Sample
}

// Engine is the batching loop.
type Engine struct {
	b   Backend
	cfg Config

	mu      sync.Mutex
	waiting []*Request
	closed  bool
	wake    chan struct{}
	done    chan struct{}

	// Owned by the loop goroutine.
	cache Cache
	rows  []*seq // one per cache row; nil is a free row

	queued, active atomic.Int64
}

// New starts the loop.
func New(b Backend, cfg Config) (*Engine, error) {
	if cfg.MaxBatch < 1 || cfg.Slots < 2 || cfg.QueueLimit < 0 {
		return nil, fmt.Errorf("engine: MaxBatch %d, Slots %d, QueueLimit %d out of range",
			cfg.MaxBatch, cfg.Slots, cfg.QueueLimit)
	}
	sizes := []int{cfg.MaxBatch}
	for _, s := range cfg.BatchSizes {
		if s >= 1 && s < cfg.MaxBatch {
			sizes = append(sizes, s)
		}
	}
	sort.Ints(sizes)
	cfg.BatchSizes = sizes
	e := &Engine{b: b, cfg: cfg, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go e.loop()
	return e, nil
}

// Submit queues a request; its events arrive on r.Events(). ctx ends it
// early (a client gone, a timeout): its rows are freed at the next turn.
func (e *Engine) Submit(ctx context.Context, prompt []int32, n, maxTokens int, s Sampling) (*Request, error) {
	if n < 1 || n > e.cfg.MaxBatch {
		return nil, fmt.Errorf("n is %d; this server decodes at most %d rows together", n, e.cfg.MaxBatch)
	}
	if len(prompt) < 1 || len(prompt) >= e.cfg.Slots {
		return nil, fmt.Errorf("the prompt has %d tokens; it must have 1 to %d", len(prompt), e.cfg.Slots-1)
	}
	r := &Request{Prompt: prompt, N: n, MaxTokens: maxTokens, Sampling: s, ctx: ctx,
		events: make(chan Event, n*(maxTokens+2)+1), stopped: make([]atomic.Bool, n), open: n}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return nil, ErrClosed
	}
	if len(e.waiting) >= e.cfg.QueueLimit+e.freeRowsHint() {
		return nil, ErrQueueFull
	}
	e.waiting = append(e.waiting, r)
	e.queued.Store(int64(len(e.waiting)))
	select {
	case e.wake <- struct{}{}:
	default:
	}
	return r, nil
}

// freeRowsHint lets requests that will be admitted at the next turn in beyond
// the queue limit (an idle server with QueueLimit 0 still serves).
func (e *Engine) freeRowsHint() int {
	return e.cfg.MaxBatch - int(e.active.Load())
}

// QueueDepth is the number of requests waiting for rows.
func (e *Engine) QueueDepth() int { return int(e.queued.Load()) }

// ActiveRows is the number of rows being decoded.
func (e *Engine) ActiveRows() int { return int(e.active.Load()) }

// Close stops taking requests, lets the admitted and waiting ones finish,
// and returns when the loop has ended (or ctx is done first).
func (e *Engine) Close(ctx context.Context) error {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
	select {
	case e.wake <- struct{}{}:
	default:
	}
	select {
	case <-e.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *Engine) loop() {
	defer close(e.done)
	for {
		e.dropStopped()
		e.admit()
		if e.active.Load() == 0 {
			e.mu.Lock()
			idle, closed := len(e.waiting) == 0, e.closed
			e.mu.Unlock()
			if idle && closed {
				e.release()
				return
			}
			if idle {
				<-e.wake
			}
			continue
		}
		e.step()
	}
}

func (e *Engine) release() {
	if e.cache != nil {
		e.cache.Close()
		e.cache, e.rows = nil, nil
	}
}
