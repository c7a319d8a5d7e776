package server

// Prompts in (text, token ids, chat messages) and response bodies out.

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"sync"

	"llmjax/serving/engine"
)

var chatRoles = map[string]bool{"system": true, "developer": true, "user": true, "assistant": true, "tool": true}

// promptIDs tokenizes text prompts and checks token-id prompts; with echo it
// also gives each prompt's text.
func (s *Server) promptIDs(prompts []prompt, echo bool) ([][]int32, []string, *apiError) {
	ids := make([][]int32, len(prompts))
	texts := make([]string, len(prompts))
	var toTokenize []string
	for _, p := range prompts {
		if !p.isIDs {
			toTokenize = append(toTokenize, p.text)
		}
	}
	if len(toTokenize) > 0 && !s.model.HasText() {
		return nil, nil, badRequest("prompt", "this export has no tokenizer signatures (it was made "+
			"with --notext_signature); send token ids")
	}
	tokenized, err := s.model.Tokenize(toTokenize)
	if err != nil {
		return nil, nil, s.engineError(err)
	}
	for i, p := range prompts {
		if p.isIDs {
			ids[i] = p.ids
			continue
		}
		ids[i], texts[i], tokenized = tokenized[0], p.text, tokenized[1:]
		if len(ids[i]) == 0 {
			if s.cfg.EOSID < 0 {
				return nil, nil, badRequest("prompt", "prompt %d is empty; give at least one token", i)
			}
			ids[i] = []int32{int32(s.cfg.EOSID)} // A document boundary, as llm_jax.generate starts.
		}
	}
	for i, p := range ids {
		if err := s.checkIDs(p, "prompt", i); err != nil {
			return nil, nil, err
		}
	}
	if echo && s.model.HasText() {
		var rows [][]int32
		for i, p := range prompts {
			if p.isIDs {
				rows = append(rows, ids[i])
			}
		}
		got, err := s.model.Detokenize(rows)
		if err != nil {
			return nil, nil, s.engineError(err)
		}
		for i, p := range prompts {
			if p.isIDs {
				texts[i], got = got[0], got[1:]
			}
		}
	}
	return ids, texts, nil
}

func (s *Server) checkIDs(p []int32, param string, i int) *apiError {
	for _, t := range p {
		if t < 0 || int(t) >= s.cfg.VocabSize {
			return badRequest(param, "prompt %d has token id %d outside the vocabulary [0, %d)", i, t, s.cfg.VocabSize)
		}
	}
	if len(p) >= s.cfg.MaxLen {
		return badRequest(param, "prompt %d has %d tokens; the model's context is %d tokens and must "+
			"leave room for a new one", i, len(p), s.cfg.MaxLen)
	}
	return nil
}

// chatIDs renders the messages with the export's chat template.
func (s *Server) chatIDs(messages []chatMessage) ([]int32, *apiError) {
	if !s.model.HasText() {
		return nil, badRequest("messages", "this export has no tokenizer signatures (it was made "+
			"with --notext_signature); use /v1/completions with token ids")
	}
	roles, contents := make([]string, len(messages)), make([]string, len(messages))
	for i, m := range messages {
		if !chatRoles[m.Role] {
			return nil, badRequest(fmt.Sprintf("messages[%d].role", i),
				"messages[%d].role is %q; use system, user or assistant", i, m.Role)
		}
		text, err := messageText(i, m)
		if err != nil {
			return nil, err
		}
		roles[i], contents[i] = m.Role, text
	}
	pieces, ok := chatPieces(s.cfg.ChatTemplate, roles, contents)
	if !ok {
		return nil, badRequest("messages", "the export records no usable chat template "+
			"(%q must contain {content} once); use /v1/completions", s.cfg.ChatTemplate)
	}
	tokenized, err := s.model.Tokenize(pieces)
	if err != nil {
		return nil, s.engineError(err)
	}
	var ids []int32
	for _, t := range tokenized {
		ids = append(ids, t...)
	}
	if err := s.checkIDs(ids, "messages", 0); err != nil {
		err.Message = fmt.Sprintf("the conversation renders to %d tokens; the model's context is %d "+
			"tokens and must leave room for a new one", len(ids), s.cfg.MaxLen)
		return nil, err
	}
	return ids, nil
}

func finite(v float32) float64 {
	if math.IsInf(float64(v), -1) || math.IsNaN(float64(v)) {
		return -9999
	}
	return float64(v)
}

// pieceCache holds each token's text alone (for the alternatives in logprobs).
type pieceCache struct {
	mu   sync.Mutex
	text map[int32]string
}

var pieces = &pieceCache{text: map[int32]string{}}

func (s *Server) pieceTexts(samples []engine.Sample, k int) map[int32]string {
	pieces.mu.Lock()
	defer pieces.mu.Unlock()
	var missing []int32
	for _, x := range samples {
		for j := 0; j < k && j < len(x.Top); j++ {
			if _, ok := pieces.text[x.Top[j].Token]; !ok {
				missing = append(missing, x.Top[j].Token)
				pieces.text[x.Top[j].Token] = ""
			}
		}
	}
	if len(missing) > 0 && s.model.HasText() {
		rows := make([][]int32, len(missing))
		for i, t := range missing {
			rows[i] = []int32{t}
		}
		if got, err := s.model.Detokenize(rows); err == nil {
			for i, t := range missing {
				pieces.text[t] = got[i]
			}
		}
	}
	out := map[int32]string{}
	for _, x := range samples {
		for j := 0; j < k && j < len(x.Top); j++ {
			out[x.Top[j].Token] = pieces.text[x.Top[j].Token]
		}
	}
	return out
}

type completionLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float64           `json:"token_logprobs"`
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// add appends tokens with their pieces and samples; offset is where the
// first piece starts in the choice's text.
func (l *completionLogprobs) add(pieces []string, samples []engine.Sample, k int, alt map[int32]string, offset int) {
	for i, x := range samples {
		lp := finite(x.Logprob)
		top := map[string]float64{}
		for j := 0; j < k && j < len(x.Top); j++ {
			top[alt[x.Top[j].Token]] = finite(x.Top[j].Logprob)
		}
		l.Tokens = append(l.Tokens, pieces[i])
		l.TokenLogprobs = append(l.TokenLogprobs, &lp)
		l.TopLogprobs = append(l.TopLogprobs, top)
		l.TextOffset = append(l.TextOffset, offset)
		offset += len(pieces[i])
	}
}

type chatTokenLogprob struct {
	Token       string           `json:"token"`
	Logprob     float64          `json:"logprob"`
	Bytes       []int            `json:"bytes"`
	TopLogprobs []chatTopLogprob `json:"top_logprobs"`
}

type chatTopLogprob struct {
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"`
	Bytes   []int   `json:"bytes"`
}

func byteList(s string) []int {
	out := make([]int, len(s))
	for i := range s {
		out[i] = int(s[i])
	}
	return out
}

func chatLogprobs(pieces []string, samples []engine.Sample, k int, alt map[int32]string) []chatTokenLogprob {
	out := make([]chatTokenLogprob, len(samples))
	for i, x := range samples {
		out[i] = chatTokenLogprob{Token: pieces[i], Logprob: finite(x.Logprob), Bytes: byteList(pieces[i]),
			TopLogprobs: []chatTopLogprob{}}
		for j := 0; j < k && j < len(x.Top); j++ {
			t := alt[x.Top[j].Token]
			out[i].TopLogprobs = append(out[i].TopLogprobs, chatTopLogprob{t, finite(x.Top[j].Logprob), byteList(t)})
		}
	}
	return out
}

// echoLogprobs scores a prompt: its tokens' pieces and log-probabilities
// (the first token has none).
func (s *Server) echoLogprobs(ids []int32, k int) (*completionLogprobs, *apiError) {
	scored, err := s.model.Score([][]int32{ids})
	if err != nil {
		return nil, s.engineError(err)
	}
	prefixes := make([][]int32, len(ids))
	for i := range ids {
		prefixes[i] = ids[:i+1]
	}
	texts, err := s.model.Detokenize(prefixes)
	if err != nil {
		return nil, s.engineError(err)
	}
	samples := make([]engine.Sample, len(ids))
	piecesOf := make([]string, len(ids))
	prev := ""
	for i, t := range ids {
		samples[i] = engine.Sample{TokenLogprob: engine.TokenLogprob{Token: t, Logprob: scored[0].Logprobs[i]},
			Top: scored[0].Top[i]}
		if len(texts[i]) >= len(prev) && texts[i][:len(prev)] == prev {
			piecesOf[i] = texts[i][len(prev):]
		}
		prev = texts[i]
	}
	l := &completionLogprobs{}
	l.add(piecesOf, samples, k, s.pieceTexts(samples, k), 0)
	l.TokenLogprobs[0], l.TopLogprobs[0] = nil, nil // Nothing predicts the first token.
	return l, nil
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

func (j *job) usage() usage {
	p, c := j.promptTokens(), j.completionTokens()
	return usage{p, c, p + c}
}

// response is the whole (not streamed) body of a finished job.
func (s *Server) response(j *job) (map[string]any, *apiError) {
	choices := make([]map[string]any, len(j.choices))
	k := j.p.logprobs
	for i, c := range j.choices {
		n := len(c.pieces)
		if j.chat {
			var lp any
			if k >= 0 {
				lp = map[string]any{"content": chatLogprobs(c.pieces[:n], c.samples[:n], k, s.pieceTexts(c.samples, k))}
			}
			choices[i] = map[string]any{"index": i, "finish_reason": c.finish, "logprobs": lp,
				"message": map[string]any{"role": "assistant", "content": c.text.text}}
			continue
		}
		text := c.text.text
		var lp *completionLogprobs
		if k >= 0 {
			lp = &completionLogprobs{Tokens: []string{}, TokenLogprobs: []*float64{},
				TopLogprobs: []map[string]float64{}, TextOffset: []int{}}
			if j.p.echo {
				var err *apiError
				if lp, err = s.echoLogprobs(j.prompts[c.prompt], k); err != nil {
					return nil, err
				}
			}
			offset := 0
			if j.p.echo {
				offset = len(j.echo[c.prompt])
			}
			lp.add(c.pieces, c.samples, k, s.pieceTexts(c.samples, k), offset)
		}
		if j.p.echo {
			text = j.echo[c.prompt] + text
		}
		var lpAny any
		if lp != nil {
			lpAny = lp
		}
		choices[i] = map[string]any{"index": i, "text": text, "logprobs": lpAny, "finish_reason": c.finish}
	}
	object := "text_completion"
	if j.chat {
		object = "chat.completion"
	}
	return map[string]any{"id": j.id, "object": object, "created": j.created, "model": s.cfg.ModelName,
		"choices": choices, "usage": j.usage()}, nil
}

// ---- Streaming.

type sse struct {
	w       http.ResponseWriter
	flusher http.Flusher
}

func (e *sse) send(v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(e.w, "data: %s\n\n", data); err != nil {
		return err
	}
	e.flusher.Flush()
	return nil
}

// stream sends the job's tokens as they come: one chunk per token (or text
// piece) per choice, a last chunk with each choice's finish_reason, the
// usage when asked, then [DONE].
func (s *Server) stream(ctx context.Context, w http.ResponseWriter, j *job) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		s.writeError(w, &apiError{Status: http.StatusInternalServerError, Type: "server_error",
			Message: "streaming is not possible on this connection"})
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("Connection", "keep-alive")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	out := &sse{w: w, flusher: flusher}
	if err := s.streamStart(out, j); err != nil {
		return
	}
	done := make(chan struct{})
	defer close(done)
	for t := range j.events(done) {
		c, added, apiErr := s.apply(j, t)
		if apiErr != nil {
			if apiErr.Status != 499 {
				_ = out.send(apiErr.body())
			}
			return
		}
		if c != nil && s.streamChoice(out, j, c, added) != nil {
			return // The client went away; ctx ends the engine's work.
		}
	}
	if err := ctx.Err(); err != nil {
		if e := s.engineError(err); e.Status != 499 {
			_ = out.send(e.body())
		}
		return
	}
	for _, c := range j.choices {
		if c.finish == "length" && j.reqs[c.prompt] == nil {
			_ = s.streamChoice(out, j, c, false) // max_tokens 0
		}
	}
	if j.p.includeUsage {
		_ = out.send(map[string]any{"id": j.id, "object": s.chunkObject(j), "created": j.created,
			"model": s.cfg.ModelName, "choices": []any{}, "usage": j.usage()})
	}
	_, _ = fmt.Fprint(w, "data: [DONE]\n\n")
	flusher.Flush()
}

func (s *Server) chunkObject(j *job) string {
	if j.chat {
		return "chat.completion.chunk"
	}
	return "text_completion"
}

func (s *Server) chunk(j *job, choice map[string]any) map[string]any {
	return map[string]any{"id": j.id, "object": s.chunkObject(j), "created": j.created,
		"model": s.cfg.ModelName, "choices": []any{choice}}
}

// streamStart sends the chat role (or the echoed prompt) of every choice.
func (s *Server) streamStart(out *sse, j *job) error {
	for _, c := range j.choices {
		var ch map[string]any
		switch {
		case j.chat:
			ch = map[string]any{"index": c.index, "delta": map[string]any{"role": "assistant", "content": ""},
				"logprobs": nil, "finish_reason": nil}
		case j.p.echo:
			var lp any
			if j.p.logprobs >= 0 {
				l, err := s.echoLogprobs(j.prompts[c.prompt], j.p.logprobs)
				if err != nil {
					return out.send(err.body())
				}
				lp = l
			}
			ch = map[string]any{"index": c.index, "text": j.echo[c.prompt], "logprobs": lp, "finish_reason": nil}
		default:
			continue
		}
		if err := out.send(s.chunk(j, ch)); err != nil {
			return err
		}
	}
	return nil
}

// streamChoice sends what an event added to a choice (added: a token).
func (s *Server) streamChoice(out *sse, j *job, c *choice, added bool) error {
	final := c.done()
	text := c.text.delta(final)
	var finish any
	if final {
		finish = c.finish
	}
	var lp any
	k := j.p.logprobs
	if k >= 0 && added {
		n := len(c.samples)
		last, piece := c.samples[n-1:], c.pieces[n-1:]
		alt := s.pieceTexts(last, k)
		if j.chat {
			lp = map[string]any{"content": chatLogprobs(piece, last, k, alt)}
		} else {
			l := &completionLogprobs{}
			l.add(piece, last, k, alt, len(c.text.sent)-len(text))
			lp = l
		}
	}
	if text == "" && lp == nil && !final {
		return nil
	}
	var ch map[string]any
	if j.chat {
		delta := map[string]any{}
		if text != "" {
			delta["content"] = text
		}
		ch = map[string]any{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
	} else {
		ch = map[string]any{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish}
	}
	return out.send(s.chunk(j, ch))
}
