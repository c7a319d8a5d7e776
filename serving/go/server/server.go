// Package server is an OpenAI-compatible HTTP API over the batching engine:
// POST /v1/completions, POST /v1/chat/completions (both streamed as
// Server-Sent Events on request), GET /v1/models, GET /health, GET /metrics.
//
// Every error is OpenAI-style JSON, {"error": {"message", "type", "param",
// "code"}}: 400 for bad input, 401 for a wrong API key, 404 for an unknown
// path or model, 405 for a wrong method, 413 for a body over the limit, 429
// when the queue is full (with Retry-After), 504 when a request runs out of
// time; a panic in a handler is logged and answered 500, never sent as a
// trace.
package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log"
	"math"
	"net/http"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"time"

	"llmjax/serving/engine"
	"llmjax/serving/metrics"
)

// Model is what the handlers need of the model besides generation.
type Model interface {
	Tokenize(texts []string) ([][]int32, error)
	Detokenize(rows [][]int32) ([]string, error)
	Score(seqs [][]int32) ([]engine.Scored, error)
	HasText() bool
}

// Generator is the batching engine.
type Generator interface {
	Submit(ctx context.Context, prompt []int32, n, maxTokens int, s engine.Sampling) (*engine.Request, error)
	QueueDepth() int
	ActiveRows() int
}

// Config sets the server's name, limits and options.
type Config struct {
	ModelName      string
	MaxTokens      int // the export's output width W
	MaxLen         int // the model's context
	VocabSize      int
	MaxN           int // rows the engine decodes together
	TopLogprobs    int
	EOSID          int // an empty prompt starts from it (-1: none)
	ChatTemplate   string
	APIKey         string // "" : no key needed
	MaxBodyBytes   int64
	RequestTimeout time.Duration
	Log            *log.Logger
}

// Server is the HTTP handler.
type Server struct {
	cfg     Config
	model   Model
	gen     Generator
	mux     *http.ServeMux
	keyHash [32]byte
	created int64
	closing atomic.Bool

	Metrics   *metrics.Registry
	requests  *metrics.Counter
	tokens    *metrics.Counter
	latency   *metrics.Histogram
	firstByte *metrics.Histogram
	stepRows  *metrics.Histogram
	stepTime  *metrics.Histogram
}

// New builds the server.
func New(cfg Config, model Model, gen Generator) *Server {
	if cfg.Log == nil {
		cfg.Log = log.Default()
	}
	s := &Server{cfg: cfg, model: model, gen: gen, mux: http.NewServeMux(),
		created: time.Now().Unix(), Metrics: &metrics.Registry{}}
	s.keyHash = sha256.Sum256([]byte(cfg.APIKey))
	s.initMetrics()
	s.route("/health", http.MethodGet, s.health)
	s.route("/metrics", http.MethodGet, s.metrics)
	s.route("/v1/models", http.MethodGet, s.models)
	s.route("/v1/completions", http.MethodPost, s.completions)
	s.route("/v1/chat/completions", http.MethodPost, s.chat)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.writeError(w, &apiError{Status: http.StatusNotFound, Type: "invalid_request_error",
			Message: fmt.Sprintf("no such path %s; this server has /v1/completions, "+
				"/v1/chat/completions, /v1/models, /health and /metrics", r.URL.Path)})
	})
	return s
}

func (s *Server) initMetrics() {
	m := s.Metrics
	s.requests = m.NewCounter("llmjax_requests_total", "HTTP requests by path and status code.", "path", "code")
	s.tokens = m.NewCounter("llmjax_tokens_total", "Tokens by kind: prompt or completion.", "kind")
	m.NewGaugeFunc("llmjax_queue_depth", "Requests waiting for a batch row.",
		func() float64 { return float64(s.gen.QueueDepth()) })
	m.NewGaugeFunc("llmjax_active_rows", "Rows (choices) being decoded.",
		func() float64 { return float64(s.gen.ActiveRows()) })
	seconds := []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60}
	s.latency = m.NewHistogram("llmjax_request_duration_seconds", "Request latency by path.", seconds, "path")
	s.firstByte = m.NewHistogram("llmjax_time_to_first_token_seconds",
		"Time from a generation request to its first token.", seconds)
	s.stepRows = m.NewHistogram("llmjax_decode_step_rows", "Live rows per decode step.",
		[]float64{1, 2, 4, 8, 16, 32, 64})
	s.stepTime = m.NewHistogram("llmjax_decode_step_seconds", "Time of one decode step.",
		[]float64{0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5})
}

// ObserveStep records a decode step (engine.Config.Observe).
func (s *Server) ObserveStep(rows, batch int, took time.Duration) {
	s.stepRows.Observe(float64(rows))
	s.stepTime.Observe(took.Seconds())
}

// SetClosing makes /health answer 503 (the server is draining).
func (s *Server) SetClosing() { s.closing.Store(true) }

// ServeHTTP serves a request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// statusWriter remembers the status code for the metrics.
type statusWriter struct {
	http.ResponseWriter
	code int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.code == 0 {
		w.code = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.code == 0 {
		w.code = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// route registers a handler behind the method check, the API key (for
// /v1/), the body limit, panic recovery and the metrics.
func (s *Server) route(path, method string, h func(http.ResponseWriter, *http.Request)) {
	s.mux.HandleFunc(path, func(rw http.ResponseWriter, r *http.Request) {
		start := time.Now()
		w := &statusWriter{ResponseWriter: rw}
		defer func() {
			if p := recover(); p != nil {
				s.cfg.Log.Printf("panic serving %s: %v\n%s", r.URL.Path, p, debug.Stack())
				if w.code == 0 {
					s.writeError(w, &apiError{Status: http.StatusInternalServerError,
						Type: "server_error", Message: "internal error (logged by the server)"})
				}
			}
			code := w.code
			if code == 0 {
				code = http.StatusOK
			}
			s.requests.Add(1, path, fmt.Sprint(code))
			s.latency.Observe(time.Since(start).Seconds(), path)
		}()
		if r.Method != method {
			w.Header().Set("Allow", method)
			s.writeError(w, &apiError{Status: http.StatusMethodNotAllowed, Type: "invalid_request_error",
				Message: fmt.Sprintf("%s %s is not allowed; use %s", r.Method, path, method)})
			return
		}
		if strings.HasPrefix(path, "/v1/") && !s.authorized(r) {
			s.writeError(w, &apiError{Status: http.StatusUnauthorized, Type: "invalid_request_error",
				Code: "invalid_api_key", Message: "missing or wrong API key; send Authorization: Bearer KEY"})
			return
		}
		if method == http.MethodPost {
			if r.ContentLength > s.cfg.MaxBodyBytes {
				s.writeError(w, &apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
					Message: fmt.Sprintf("the request body is %d bytes; the limit is %d", r.ContentLength, s.cfg.MaxBodyBytes)})
				return
			}
			r.Body = http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes)
		}
		h(w, r)
	})
}

// authorized compares the bearer key in constant time (hashes first, so the
// key's length does not show either).
func (s *Server) authorized(r *http.Request) bool {
	if s.cfg.APIKey == "" {
		return true
	}
	header := r.Header.Get("Authorization")
	ok := strings.HasPrefix(header, "Bearer ")
	sum := sha256.Sum256([]byte(strings.TrimSpace(strings.TrimPrefix(header, "Bearer "))))
	return subtle.ConstantTimeCompare(sum[:], s.keyHash[:]) == 1 && ok
}

func (s *Server) writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		s.cfg.Log.Printf("writing a response: %v", err)
	}
}

func (s *Server) writeError(w http.ResponseWriter, e *apiError) {
	if e.Status == http.StatusRequestEntityTooLarge {
		// The rest of the body is not read: the connection cannot be reused.
		w.Header().Set("Connection", "close")
	}
	s.writeJSON(w, e.Status, e.body())
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	if s.closing.Load() {
		s.writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "shutting down"})
		return
	}
	s.writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "model": s.cfg.ModelName,
		"queue_depth": s.gen.QueueDepth(), "active_rows": s.gen.ActiveRows()})
}

func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", metrics.ContentType)
	s.Metrics.Write(w)
}

func (s *Server) models(w http.ResponseWriter, r *http.Request) {
	s.writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []map[string]any{{
		"id": s.cfg.ModelName, "object": "model", "created": s.created, "owned_by": "llm_jax"}}})
}

// randomSeed seeds a request that gives none (as OpenAI's sampling varies).
func randomSeed() int32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return int32(uint32(b[0])<<24|uint32(b[1])<<16|uint32(b[2])<<8|uint32(b[3])) & math.MaxInt32
}

func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func (s *Server) limits() limits {
	return limits{maxTokens: s.cfg.MaxTokens, maxLen: s.cfg.MaxLen, vocab: s.cfg.VocabSize,
		maxN: s.cfg.MaxN, topLogprobs: s.cfg.TopLogprobs}
}
