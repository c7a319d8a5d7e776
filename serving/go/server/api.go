package server

// The OpenAI request bodies, their checks, and OpenAI-style errors.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"

	"llmjax/serving/engine"
)

// apiError is an error the client sees as {"error": {...}} with Status.
type apiError struct {
	Status  int
	Message string
	Type    string
	Param   string
	Code    string
}

func (e *apiError) Error() string { return e.Message }

func badRequest(param, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Type: "invalid_request_error",
		Param: param, Message: fmt.Sprintf(format, args...)}
}

type errorJSON struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    *string `json:"code"`
	} `json:"error"`
}

func (e *apiError) body() errorJSON {
	var b errorJSON
	b.Error.Message, b.Error.Type = e.Message, e.Type
	if e.Param != "" {
		b.Error.Param = &e.Param
	}
	if e.Code != "" {
		b.Error.Code = &e.Code
	}
	return b
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// sampling fields both endpoints take.
type commonRequest struct {
	Model            *string            `json:"model"`
	Temperature      *float64           `json:"temperature"`
	TopP             *float64           `json:"top_p"`
	TopK             *int               `json:"top_k"` // not OpenAI's: llm_jax's top-k cut
	N                *int               `json:"n"`
	Stream           bool               `json:"stream"`
	StreamOptions    *streamOptions     `json:"stream_options"`
	Stop             json.RawMessage    `json:"stop"`
	Seed             *int64             `json:"seed"`
	PresencePenalty  *float64           `json:"presence_penalty"`
	FrequencyPenalty *float64           `json:"frequency_penalty"`
	LogitBias        map[string]float64 `json:"logit_bias"`
	User             string             `json:"user"`
}

type completionRequest struct {
	commonRequest
	Prompt    json.RawMessage `json:"prompt"`
	MaxTokens *int            `json:"max_tokens"`
	Logprobs  *int            `json:"logprobs"`
	Echo      bool            `json:"echo"`
	BestOf    *int            `json:"best_of"`
	Suffix    *string         `json:"suffix"`
}

type chatMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"`
	Name    string          `json:"name"`
}

type chatRequest struct {
	commonRequest
	Messages            []chatMessage   `json:"messages"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Logprobs            *bool           `json:"logprobs"`
	TopLogprobs         *int            `json:"top_logprobs"`
	Tools               json.RawMessage `json:"tools"`
}

// decodeBody reads one JSON object into v, with errors a client can act on.
func decodeBody(r *http.Request, v any) *apiError {
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(v)
	if err == nil && dec.More() {
		err = errors.New("data after the JSON object")
	}
	var tooBig *http.MaxBytesError
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &tooBig):
		return &apiError{Status: http.StatusRequestEntityTooLarge, Type: "invalid_request_error",
			Message: fmt.Sprintf("the request body is over %d bytes", tooBig.Limit)}
	case errors.As(err, &typeErr):
		field := typeErr.Field
		if field == "" {
			return badRequest("", "the request body must be a JSON object, not %s", typeErr.Value)
		}
		return badRequest(field, "%s must be %s, not %s", field, typeName(typeErr), article(typeErr.Value))
	case errors.As(err, &syntaxErr), errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("", "the request body is not valid JSON: %v", err)
	case errors.Is(err, io.EOF):
		return badRequest("", "the request body is empty; send a JSON object")
	}
	return badRequest("", "the request body could not be read: %v", err)
}

func article(jsonType string) string {
	switch jsonType {
	case "array", "object":
		return "an " + jsonType
	case "number", "string", "bool":
		return "a " + jsonType
	}
	return jsonType
}

func typeName(e *json.UnmarshalTypeError) string {
	switch e.Type.Kind().String() {
	case "int", "int64", "int32":
		return "an integer"
	case "float64", "float32":
		return "a number"
	case "bool":
		return "a boolean"
	case "string":
		return "a string"
	case "slice":
		return "an array"
	case "map", "struct":
		return "an object"
	}
	return "of type " + e.Type.String()
}

// params are the checked generation settings of a request.
type params struct {
	maxTokens    int
	n            int
	sampling     engine.Sampling
	seeded       bool
	stops        []string
	stream       bool
	includeUsage bool
	logprobs     int // -1: off
	echo         bool
}

// limits are what the export allows.
type limits struct {
	maxTokens   int // the export's output width W
	maxLen      int // the context
	vocab       int
	maxN        int // rows the engine decodes together
	topLogprobs int
}

func (c *commonRequest) check(p *params, lim limits, model string) *apiError {
	if c.Model == nil || *c.Model == "" {
		return badRequest("model", "you must give a model (this server has %q; GET /v1/models)", model)
	}
	if *c.Model != model {
		return &apiError{Status: http.StatusNotFound, Type: "invalid_request_error", Param: "model",
			Code: "model_not_found", Message: fmt.Sprintf("the model %q does not exist; this server has %q", *c.Model, model)}
	}
	p.sampling = engine.Sampling{Temperature: 1, TopP: 1}
	if c.Temperature != nil {
		if *c.Temperature < 0 || *c.Temperature > 2 || math.IsNaN(*c.Temperature) {
			return badRequest("temperature", "temperature is %v; it must be between 0 and 2", *c.Temperature)
		}
		p.sampling.Temperature = float32(*c.Temperature)
	}
	if c.TopP != nil {
		if !(*c.TopP > 0 && *c.TopP <= 1) {
			return badRequest("top_p", "top_p is %v; it must be above 0 and at most 1", *c.TopP)
		}
		p.sampling.TopP = float32(*c.TopP)
	}
	if c.TopK != nil {
		if *c.TopK < 0 || *c.TopK > lim.vocab {
			return badRequest("top_k", "top_k is %d; it must be 0 (off) to %d", *c.TopK, lim.vocab)
		}
		p.sampling.TopK = int32(*c.TopK)
	}
	p.n = 1
	if c.N != nil {
		if *c.N < 1 || *c.N > lim.maxN {
			return badRequest("n", "n is %d; this server gives 1 to %d choices", *c.N, lim.maxN)
		}
		p.n = *c.N
	}
	if c.Seed != nil {
		if *c.Seed < math.MinInt32 || *c.Seed > math.MaxInt32 {
			return badRequest("seed", "seed is %d; it must fit 32 bits", *c.Seed)
		}
		p.sampling.Seed, p.seeded = int32(*c.Seed), true
	}
	for name, v := range map[string]*float64{"presence_penalty": c.PresencePenalty, "frequency_penalty": c.FrequencyPenalty} {
		if v != nil && *v != 0 {
			return badRequest(name, "%s is not supported; leave it at 0", name)
		}
	}
	if len(c.LogitBias) > 0 {
		return badRequest("logit_bias", "logit_bias is not supported")
	}
	stops, err := parseStop(c.Stop)
	if err != nil {
		return err
	}
	p.stops, p.stream = stops, c.Stream
	p.includeUsage = c.StreamOptions != nil && c.StreamOptions.IncludeUsage
	return nil
}

func isNull(raw json.RawMessage) bool {
	s := strings.TrimSpace(string(raw))
	return s == "" || s == "null"
}

func parseStop(raw json.RawMessage) ([]string, *apiError) {
	if isNull(raw) {
		return nil, nil
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		if one == "" {
			return nil, nil
		}
		return []string{one}, nil
	}
	var many []string
	if err := json.Unmarshal(raw, &many); err != nil {
		return nil, badRequest("stop", "stop must be a string or an array of strings")
	}
	if len(many) > 4 {
		return nil, badRequest("stop", "stop has %d strings; give at most 4", len(many))
	}
	var out []string
	for _, s := range many {
		if s != "" {
			out = append(out, s)
		}
	}
	return out, nil
}

func (c *completionRequest) check(lim limits, model string) (params, *apiError) {
	p := params{logprobs: -1}
	if err := c.commonRequest.check(&p, lim, model); err != nil {
		return p, err
	}
	p.maxTokens = 16
	if lim.maxTokens < p.maxTokens {
		p.maxTokens = lim.maxTokens
	}
	if c.MaxTokens != nil {
		if *c.MaxTokens < 0 || *c.MaxTokens > lim.maxTokens {
			return p, badRequest("max_tokens", "max_tokens is %d; this export generates 0 to %d tokens "+
				"(its --max_new_tokens)", *c.MaxTokens, lim.maxTokens)
		}
		p.maxTokens = *c.MaxTokens
	}
	if c.Logprobs != nil {
		if *c.Logprobs < 0 || *c.Logprobs > lim.topLogprobs {
			return p, badRequest("logprobs", "logprobs is %d; it must be 0 to %d", *c.Logprobs, lim.topLogprobs)
		}
		p.logprobs = *c.Logprobs
	}
	if c.BestOf != nil && *c.BestOf != p.n {
		return p, badRequest("best_of", "best_of is not supported (leave it out or equal to n)")
	}
	if c.Suffix != nil && *c.Suffix != "" {
		return p, badRequest("suffix", "suffix is not supported")
	}
	p.echo = c.Echo
	return p, nil
}

// prompt is one prompt of a completion request: text, or token ids.
type prompt struct {
	text  string
	ids   []int32
	isIDs bool
}

// parsePrompt reads a string, an array of strings, an array of token ids or
// an array of arrays of token ids.
func parsePrompt(raw json.RawMessage) ([]prompt, *apiError) {
	if isNull(raw) {
		return nil, badRequest("prompt", "prompt is required: a string, an array of strings, "+
			"an array of token ids or an array of such arrays")
	}
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []prompt{{text: one}}, nil
	}
	var strs []string
	if json.Unmarshal(raw, &strs) == nil && len(strs) > 0 {
		out := make([]prompt, len(strs))
		for i, s := range strs {
			out[i] = prompt{text: s}
		}
		return out, nil
	}
	var ids []int32
	if json.Unmarshal(raw, &ids) == nil && len(ids) > 0 {
		return []prompt{{ids: ids, isIDs: true}}, nil
	}
	var many [][]int32
	if json.Unmarshal(raw, &many) == nil && len(many) > 0 {
		out := make([]prompt, len(many))
		for i, p := range many {
			if len(p) == 0 {
				return nil, badRequest("prompt", "prompt %d is an empty array of token ids", i)
			}
			out[i] = prompt{ids: p, isIDs: true}
		}
		return out, nil
	}
	return nil, badRequest("prompt", "prompt must be a non-empty string array, token-id array "+
		"(32-bit integers) or array of such arrays, or a string")
}

func (c *chatRequest) check(lim limits, model string) (params, *apiError) {
	p := params{logprobs: -1}
	if err := c.commonRequest.check(&p, lim, model); err != nil {
		return p, err
	}
	if len(c.Messages) == 0 {
		return p, badRequest("messages", "messages is empty; give at least one {\"role\", \"content\"}")
	}
	if !isNull(c.Tools) {
		return p, badRequest("tools", "tools are not supported")
	}
	p.maxTokens = lim.maxTokens
	for name, v := range map[string]*int{"max_tokens": c.MaxTokens, "max_completion_tokens": c.MaxCompletionTokens} {
		if v == nil {
			continue
		}
		if *v < 1 || *v > lim.maxTokens {
			return p, badRequest(name, "%s is %d; this export generates 1 to %d tokens "+
				"(its --max_new_tokens)", name, *v, lim.maxTokens)
		}
		p.maxTokens = *v
	}
	if c.Logprobs != nil && *c.Logprobs {
		p.logprobs = 0
		if c.TopLogprobs != nil {
			if *c.TopLogprobs < 0 || *c.TopLogprobs > lim.topLogprobs {
				return p, badRequest("top_logprobs", "top_logprobs is %d; it must be 0 to %d",
					*c.TopLogprobs, lim.topLogprobs)
			}
			p.logprobs = *c.TopLogprobs
		}
	} else if c.TopLogprobs != nil {
		return p, badRequest("top_logprobs", "top_logprobs needs logprobs: true")
	}
	return p, nil
}

// messageText is a message's content: a string, or an array of text parts.
func messageText(i int, m chatMessage) (string, *apiError) {
	param := fmt.Sprintf("messages[%d].content", i)
	var s string
	if json.Unmarshal(m.Content, &s) == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(m.Content, &parts); err != nil {
		return "", badRequest(param, "%s must be a string or an array of text parts", param)
	}
	var b strings.Builder
	for _, part := range parts {
		if part.Type != "text" {
			return "", badRequest(param, "%s has a %q part; only text is supported", param, part.Type)
		}
		b.WriteString(part.Text)
	}
	return b.String(), nil
}
