package server

// The two generation endpoints: requests in, engine requests out, events
// gathered into one response or streamed as Server-Sent Events.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"llmjax/serving/engine"
)

// choice is one of a job's choices (prompt i, choice c is index i*n + c).
type choice struct {
	index, prompt, c int
	text             choiceText
	full             string   // the engine's whole text so far (uncut)
	tokens           []int32  // generated tokens (up to a stop string)
	pieces           []string // each token's text: what it added to the text
	samples          []engine.Sample
	finish           string
}

func (c *choice) done() bool { return c.finish != "" }

// job is one HTTP generation request.
type job struct {
	id      string
	created int64
	chat    bool
	p       params
	prompts [][]int32
	echo    []string // each prompt's text, for echo
	reqs    []*engine.Request
	choices []*choice
	start   time.Time
	first   bool // the first token arrived
}

type tagged struct {
	prompt int
	ev     engine.Event
}

func (s *Server) newJob(chat bool, p params, prompts [][]int32) *job {
	prefix := "cmpl-"
	if chat {
		prefix = "chatcmpl-"
	}
	j := &job{id: newID(prefix), created: time.Now().Unix(), chat: chat, p: p, prompts: prompts,
		start: time.Now()}
	for i := range prompts {
		for c := 0; c < p.n; c++ {
			j.choices = append(j.choices, &choice{index: len(j.choices), prompt: i, c: c,
				text: choiceText{stops: p.stops}})
		}
	}
	return j
}

// submit hands every prompt to the engine; on a refusal the ones already
// submitted are cancelled with ctx (the caller's cancel).
func (s *Server) submit(ctx context.Context, j *job) *apiError {
	if !j.p.seeded {
		j.p.sampling.Seed = randomSeed()
	}
	for i, p := range j.prompts {
		if j.p.maxTokens == 0 {
			j.reqs = append(j.reqs, nil)
			continue
		}
		r, err := s.gen.Submit(ctx, p, j.p.n, j.p.maxTokens, j.p.sampling)
		switch {
		case errors.Is(err, engine.ErrQueueFull):
			return &apiError{Status: http.StatusTooManyRequests, Type: "rate_limit_error", Code: "queue_full",
				Message: "the server's queue is full; retry after a second"}
		case errors.Is(err, engine.ErrClosed):
			return &apiError{Status: http.StatusServiceUnavailable, Type: "server_error", Message: err.Error()}
		case err != nil:
			return badRequest("prompt", "prompt %d: %v", i, err)
		}
		j.reqs = append(j.reqs, r)
	}
	for i, r := range j.reqs {
		if r == nil {
			for _, c := range j.choices[i*j.p.n : (i+1)*j.p.n] {
				c.finish = "length"
			}
		}
	}
	s.tokens.Add(float64(j.promptTokens()), "prompt")
	return nil
}

func (j *job) promptTokens() int {
	n := 0
	for _, p := range j.prompts {
		n += len(p)
	}
	return n
}

func (j *job) completionTokens() int {
	n := 0
	for _, c := range j.choices {
		n += len(c.tokens)
	}
	return n
}

// events merges the engine requests' events; the forwarding stops when done
// closes (the handler returned), and the engine never waits on them.
func (j *job) events(done <-chan struct{}) <-chan tagged {
	out := make(chan tagged)
	var wg sync.WaitGroup
	for i, r := range j.reqs {
		if r == nil {
			continue
		}
		wg.Add(1)
		go func(i int, r *engine.Request) {
			defer wg.Done()
			for ev := range r.Events() {
				select {
				case out <- tagged{i, ev}:
				case <-done:
				}
			}
		}(i, r)
	}
	go func() {
		wg.Wait()
		close(out)
	}()
	return out
}

// apply records an event; it returns the choice it changed (nil for none)
// and whether a token was added to it.
func (s *Server) apply(j *job, t tagged) (*choice, bool, *apiError) {
	ev := t.ev
	if ev.Err != nil {
		return nil, false, s.engineError(ev.Err)
	}
	c := j.choices[t.prompt*j.p.n+ev.Choice]
	if c.done() {
		return nil, false, nil // Cut by a stop string already.
	}
	if ev.Done {
		c.finish = ev.Finish
		return c, false, nil
	}
	if !j.first {
		j.first = true
		s.firstByte.Observe(time.Since(j.start).Seconds())
	}
	piece := ""
	if len(ev.Text) >= len(c.full) && ev.Text[:len(c.full)] == c.full {
		piece = ev.Text[len(c.full):]
	}
	c.full = ev.Text
	c.tokens = append(c.tokens, ev.Sample.Token)
	c.pieces = append(c.pieces, piece)
	c.samples = append(c.samples, ev.Sample)
	s.tokens.Add(1, "completion")
	if c.text.update(ev.Text) {
		j.reqs[t.prompt].StopChoice(ev.Choice)
		c.finish = "stop"
	}
	return c, true, nil
}

func (s *Server) engineError(err error) *apiError {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return &apiError{Status: http.StatusGatewayTimeout, Type: "timeout",
			Message: fmt.Sprintf("the request took longer than %v", s.cfg.RequestTimeout)}
	case errors.Is(err, context.Canceled):
		return &apiError{Status: 499, Type: "invalid_request_error", Message: "the client went away"}
	}
	var bad interface{ InvalidArgument() bool }
	if errors.As(err, &bad) && bad.InvalidArgument() {
		return badRequest("", "the model refused the request: %v", err)
	}
	s.cfg.Log.Printf("generation failed: %v", err)
	return &apiError{Status: http.StatusInternalServerError, Type: "server_error",
		Message: "generation failed (logged by the server)"}
}

// collect runs a job to its end.
func (s *Server) collect(ctx context.Context, j *job) *apiError {
	done := make(chan struct{})
	defer close(done)
	for t := range j.events(done) {
		if _, _, err := s.apply(j, t); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return s.engineError(err)
	}
	return nil
}

func (s *Server) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, err)
		return
	}
	p, err := req.check(s.limits(), s.cfg.ModelName)
	if err != nil {
		s.writeError(w, err)
		return
	}
	prompts, err := parsePrompt(req.Prompt)
	if err == nil && len(prompts)*p.n > s.cfg.MaxN {
		err = badRequest("n", "%d prompts with n %d make %d choices; this server gives at most %d per request",
			len(prompts), p.n, len(prompts)*p.n, s.cfg.MaxN)
	}
	var ids [][]int32
	var texts []string
	if err == nil {
		ids, texts, err = s.promptIDs(prompts, p.echo)
	}
	if err != nil {
		s.writeError(w, err)
		return
	}
	j := s.newJob(false, p, ids)
	j.echo = texts
	s.run(w, r, j)
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if err := decodeBody(r, &req); err != nil {
		s.writeError(w, err)
		return
	}
	p, err := req.check(s.limits(), s.cfg.ModelName)
	var ids []int32
	if err == nil {
		ids, err = s.chatIDs(req.Messages)
	}
	if err != nil {
		s.writeError(w, err)
		return
	}
	s.run(w, r, s.newJob(true, p, [][]int32{ids}))
}

// run submits a job and answers it, streamed or whole.
func (s *Server) run(w http.ResponseWriter, r *http.Request, j *job) {
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout)
	defer cancel()
	if err := s.submit(ctx, j); err != nil {
		if err.Status == http.StatusTooManyRequests {
			w.Header().Set("Retry-After", "1")
		}
		s.writeError(w, err)
		return
	}
	if j.p.stream {
		s.stream(ctx, w, j)
		return
	}
	if err := s.collect(ctx, j); err != nil {
		if err.Status != 499 {
			s.writeError(w, err)
		}
		return
	}
	body, err := s.response(j)
	if err != nil {
		s.writeError(w, err)
		return
	}
	s.writeJSON(w, http.StatusOK, body)
}
