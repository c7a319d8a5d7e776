package server

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"llmjax/serving/engine"
)

// A byte-level fake: token = byte + 3, 2 is end-of-text; the "model" writes
// the alphabet from where the sequence stands: position p gives 'a' + p%26.
const eos = 2

type fakeModel struct{ panicOn string }

func (m *fakeModel) Tokenize(texts []string) ([][]int32, error) {
	out := make([][]int32, len(texts))
	for i, t := range texts {
		if m.panicOn != "" && t == m.panicOn {
			panic("tokenizer exploded")
		}
		for _, b := range []byte(t) {
			out[i] = append(out[i], int32(b)+3)
		}
	}
	return out, nil
}

func (m *fakeModel) Detokenize(rows [][]int32) ([]string, error) {
	out := make([]string, len(rows))
	for i, r := range rows {
		b := make([]byte, 0, len(r))
		for _, t := range r {
			if t >= 3 {
				b = append(b, byte(t-3))
			}
		}
		out[i] = string(b)
	}
	return out, nil
}

func (m *fakeModel) Score(seqs [][]int32) ([]engine.Scored, error) {
	out := make([]engine.Scored, len(seqs))
	for i, s := range seqs {
		for range s {
			out[i].Logprobs = append(out[i].Logprobs, -0.5)
			out[i].Top = append(out[i].Top, []engine.TokenLogprob{{Token: 'z' + 3, Logprob: -0.25}})
		}
	}
	return out, nil
}

func (m *fakeModel) HasText() bool { return true }

type fakeCache struct{ n int }

func (c *fakeCache) Rows() int { return c.n }
func (c *fakeCache) Close()    {}

type fakeBackend struct{ gate chan struct{} }

func sampleAt(pos int32) engine.Sample {
	t := int32('a'+pos%26) + 3
	return engine.Sample{TokenLogprob: engine.TokenLogprob{Token: t, Logprob: -1},
		Top: []engine.TokenLogprob{{Token: t, Logprob: -1}, {Token: eos, Logprob: -2}}}
}

func (b *fakeBackend) Prefill(rows []engine.PrefillRow) ([]engine.Sample, engine.Cache, error) {
	out := make([]engine.Sample, len(rows))
	for i, r := range rows {
		out[i] = sampleAt(int32(len(r.Prompt)))
	}
	return out, &fakeCache{len(rows)}, nil
}
func (b *fakeBackend) NewCache(n int) (engine.Cache, error)               { return &fakeCache{n}, nil }
func (b *fakeBackend) CopyRow(engine.Cache, int, engine.Cache, int) error { return nil }
func (b *fakeBackend) Step(c engine.Cache, rows []engine.StepRow) ([]engine.Sample, error) {
	if b.gate != nil {
		<-b.gate
	}
	out := make([]engine.Sample, len(rows))
	for i, r := range rows {
		out[i] = sampleAt(r.Position + 1)
	}
	return out, nil
}

func newServer(t *testing.T, mutate func(*Config), backend *fakeBackend, model *fakeModel) *httptest.Server {
	m := &fakeModel{}
	if model != nil {
		m = model
	}
	if backend == nil {
		backend = &fakeBackend{}
	}
	e, err := engine.New(backend, engine.Config{MaxBatch: 4, QueueLimit: 1, Slots: 64,
		StopIDs: []int32{eos}, Detokenize: m.Detokenize})
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{ModelName: "tiny", MaxTokens: 20, MaxLen: 64, VocabSize: 259, MaxN: 4, TopLogprobs: 5,
		EOSID: eos, ChatTemplate: "<|{role}|>\n{content}\n", MaxBodyBytes: 4096, RequestTimeout: 5 * time.Second,
		Log: log.New(io.Discard, "", 0)}
	if mutate != nil {
		mutate(&cfg)
	}
	srv := httptest.NewServer(New(cfg, m, e))
	t.Cleanup(func() {
		srv.Close()
		_ = e.Close(context.Background())
	})
	return srv
}

func post(t *testing.T, url, body string, header ...string) (int, map[string]any, http.Header) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v map[string]any
	data, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(data, &v); err != nil {
		t.Fatalf("%s: body %q is not JSON", url, data)
	}
	return resp.StatusCode, v, resp.Header
}

func TestCompletionsGeneratesUntilTheLimitOrAStopString(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	code, v, _ := post(t, srv.URL+"/v1/completions", `{"model": "tiny", "prompt": ["ab", "abcd"], "max_tokens": 5, "n": 2}`)
	if code != 200 {
		t.Fatalf("status %d: %v", code, v)
	}
	choices := v["choices"].([]any)
	want := []string{"cdefg", "cdefg", "efghi", "efghi"}
	for i, c := range choices {
		c := c.(map[string]any)
		if c["text"] != want[i] || c["finish_reason"] != "length" || int(c["index"].(float64)) != i {
			t.Errorf("choice %d: %v", i, c)
		}
	}
	usage := v["usage"].(map[string]any)
	if usage["prompt_tokens"].(float64) != 6 || usage["completion_tokens"].(float64) != 20 {
		t.Errorf("usage %v", usage)
	}
	_, v, _ = post(t, srv.URL+"/v1/completions", `{"model": "tiny", "prompt": "ab", "max_tokens": 10, "stop": ["fg", "x"], "echo": true}`)
	c := v["choices"].([]any)[0].(map[string]any)
	if c["text"] != "abcde" || c["finish_reason"] != "stop" {
		t.Errorf("stop string: %v", c)
	}
}

func TestLogprobsAndEcho(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	_, v, _ := post(t, srv.URL+"/v1/completions", `{"model": "tiny", "prompt": "ab", "max_tokens": 2, "logprobs": 1, "echo": true}`)
	lp := v["choices"].([]any)[0].(map[string]any)["logprobs"].(map[string]any)
	tokens := fmt.Sprint(lp["tokens"])
	if tokens != "[a b c d]" || fmt.Sprint(lp["token_logprobs"]) != "[<nil> -0.5 -1 -1]" ||
		fmt.Sprint(lp["text_offset"]) != "[0 1 2 3]" {
		t.Errorf("logprobs %v", lp)
	}
	if fmt.Sprint(lp["top_logprobs"]) != "[<nil> map[z:-0.25] map[c:-1] map[d:-1]]" {
		t.Errorf("top_logprobs %v", lp["top_logprobs"])
	}
	_, v, _ = post(t, srv.URL+"/v1/chat/completions", `{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "logprobs": true, "top_logprobs": 2}`)
	content := v["choices"].([]any)[0].(map[string]any)["logprobs"].(map[string]any)["content"].([]any)
	first := content[0].(map[string]any)
	if len(content) != 1 || len(first["top_logprobs"].([]any)) != 2 || first["logprob"].(float64) != -1 {
		t.Errorf("chat logprobs %v", content)
	}
}

func TestChatRendersTheTemplate(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	_, v, _ := post(t, srv.URL+"/v1/chat/completions", `{"model": "tiny", "max_tokens": 3,
		"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}`)
	// "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n" is 39 bytes: the model writes from 'a'+39%26.
	c := v["choices"].([]any)[0].(map[string]any)
	if v["usage"].(map[string]any)["prompt_tokens"].(float64) != 39 || c["message"].(map[string]any)["content"] != "nop" {
		t.Errorf("chat: %v", v)
	}
}

// events reads an SSE stream: the data lines, [DONE] included.
func events(t *testing.T, resp *http.Response) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if line := sc.Text(); strings.HasPrefix(line, "data: ") {
			out = append(out, strings.TrimPrefix(line, "data: "))
		}
	}
	return out
}

func TestStreamsChunksThenDone(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	resp, err := http.Post(srv.URL+"/v1/completions", "application/json",
		strings.NewReader(`{"model": "tiny", "prompt": "ab", "max_tokens": 8, "stream": true, "stop": "gh", "stream_options": {"include_usage": true}}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("content type %q", resp.Header.Get("Content-Type"))
	}
	data := events(t, resp)
	if data[len(data)-1] != "[DONE]" {
		t.Fatalf("no [DONE]: %v", data)
	}
	var text, finish string
	var usage map[string]any
	for _, d := range data[:len(data)-1] {
		var chunk map[string]any
		if err := json.Unmarshal([]byte(d), &chunk); err != nil {
			t.Fatal(err)
		}
		if chunk["object"] != "text_completion" {
			t.Errorf("object %v", chunk["object"])
		}
		if u, ok := chunk["usage"]; ok {
			usage = u.(map[string]any)
			continue
		}
		c := chunk["choices"].([]any)[0].(map[string]any)
		text += c["text"].(string)
		if f, ok := c["finish_reason"].(string); ok {
			finish = f
		}
	}
	// The "g" of "gh" is held back until the stop string is known.
	if text != "cdef" || finish != "stop" || usage["completion_tokens"].(float64) != 6 {
		t.Errorf("text %q finish %q usage %v", text, finish, usage)
	}
}

func TestChatStreamStartsWithTheRole(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	resp, err := http.Post(srv.URL+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": true}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data := events(t, resp)
	var first, last map[string]any
	_ = json.Unmarshal([]byte(data[0]), &first)
	_ = json.Unmarshal([]byte(data[len(data)-2]), &last)
	delta := first["choices"].([]any)[0].(map[string]any)["delta"].(map[string]any)
	end := last["choices"].([]any)[0].(map[string]any)
	if first["object"] != "chat.completion.chunk" || delta["role"] != "assistant" || end["finish_reason"] != "length" {
		t.Errorf("first %v last %v", first, last)
	}
}

func TestBadRequestsGetOpenAIErrors(t *testing.T) {
	srv := newServer(t, nil, nil, &fakeModel{panicOn: "boom"})
	cases := []struct {
		path, body string
		code       int
		param      string
	}{
		{"/v1/completions", `{`, 400, ""},
		{"/v1/completions", `[1]`, 400, ""},
		{"/v1/completions", ``, 400, ""},
		{"/v1/completions", `{"model": "tiny", "prompt": "x"} {}`, 400, ""},
		{"/v1/completions", `{"model": "tiny", "prompt": 5}`, 400, "prompt"},
		{"/v1/completions", `{"model": "tiny", "prompt": []}`, 400, "prompt"},
		{"/v1/completions", `{"model": "tiny", "prompt": [[]]}`, 400, "prompt"},
		{"/v1/completions", `{"model": "tiny", "prompt": [1, 9999]}`, 400, "prompt"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "max_tokens": "3"}`, 400, "max_tokens"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "max_tokens": -1}`, 400, "max_tokens"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "max_tokens": 21}`, 400, "max_tokens"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "temperature": 3}`, 400, "temperature"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "top_p": 0}`, 400, "top_p"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "n": 5}`, 400, "n"},
		{"/v1/completions", `{"model": "tiny", "prompt": ["x", "y", "z"], "n": 2}`, 400, "n"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "logprobs": 6}`, 400, "logprobs"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "stop": 3}`, 400, "stop"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "seed": 99999999999}`, 400, "seed"},
		{"/v1/completions", `{"model": "tiny", "prompt": "x", "stream": "yes"}`, 400, "stream"},
		{"/v1/completions", `{"model": "tiny", "prompt": "` + strings.Repeat("x", 64) + `"}`, 400, "prompt"},
		{"/v1/completions", `{"prompt": "x"}`, 400, "model"},
		{"/v1/completions", `{"model": "gpt-4", "prompt": "x"}`, 404, "model"},
		{"/v1/completions", `{"model": "tiny", "prompt": "boom"}`, 500, ""},
		{"/v1/chat/completions", `{"model": "tiny", "messages": []}`, 400, "messages"},
		{"/v1/chat/completions", `{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}`, 400, "messages[0].role"},
		{"/v1/chat/completions", `{"model": "tiny", "messages": [{"role": "user", "content": 5}]}`, 400, "messages[0].content"},
		{"/v1/chat/completions", `{"model": "tiny", "messages": "hi"}`, 400, "messages"},
		{"/v1/chat/completions", `{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}`, 400, "top_logprobs"},
		{"/v1/completions", `{"model": "tiny", "prompt": "` + strings.Repeat("x", 5000) + `"}`, 413, ""},
		{"/v1/nothing", `{}`, 404, ""},
	}
	for _, c := range cases {
		code, v, _ := post(t, srv.URL+c.path, c.body)
		e, ok := v["error"].(map[string]any)
		if code != c.code || !ok || e["message"] == "" || e["type"] == "" {
			t.Errorf("%s %.60s: status %d, body %v; want %d and an error", c.path, c.body, code, v, c.code)
			continue
		}
		if param, _ := e["param"].(string); param != c.param {
			t.Errorf("%s %.60s: param %q, want %q", c.path, c.body, param, c.param)
		}
		if strings.Contains(fmt.Sprint(e["message"]), "goroutine") {
			t.Errorf("a stack trace reached the client: %v", e)
		}
	}
	resp, err := http.Get(srv.URL + "/v1/completions")
	if err != nil || resp.StatusCode != 405 || resp.Header.Get("Allow") != "POST" {
		t.Errorf("GET /v1/completions: %v %v", resp, err)
	}
	// The server still serves.
	if code, _, _ := post(t, srv.URL+"/v1/completions", `{"model": "tiny", "prompt": "x", "max_tokens": 1}`); code != 200 {
		t.Errorf("after the battery: %d", code)
	}
}

func TestAPIKey(t *testing.T) {
	srv := newServer(t, func(c *Config) { c.APIKey = "secret" }, nil, nil)
	body := `{"model": "tiny", "prompt": "x", "max_tokens": 1}`
	for header, want := range map[string]int{"": 401, "Bearer nope": 401, "secret": 401, "Bearer secret": 200} {
		code, _, _ := post(t, srv.URL+"/v1/completions", body, "Authorization", header)
		if code != want {
			t.Errorf("Authorization %q: %d, want %d", header, code, want)
		}
	}
	if resp, err := http.Get(srv.URL + "/health"); err != nil || resp.StatusCode != 200 {
		t.Errorf("/health needs no key: %v %v", resp, err)
	}
}

func TestAFullQueueAnswers429WithRetryAfter(t *testing.T) {
	gate := make(chan struct{})
	srv := newServer(t, nil, &fakeBackend{gate: gate}, nil)
	body := `{"model": "tiny", "prompt": "x", "max_tokens": 3, "n": 4}`
	done := make(chan int, 2)
	for i := 0; i < 2; i++ { // One runs (4 rows), one waits (queue 1).
		go func() { code, _, _ := post(t, srv.URL+"/v1/completions", body); done <- code }()
		time.Sleep(100 * time.Millisecond)
	}
	code, v, h := post(t, srv.URL+"/v1/completions", body)
	if code != 429 || h.Get("Retry-After") == "" || v["error"].(map[string]any)["type"] != "rate_limit_error" {
		t.Errorf("third request: %d %v %v", code, v, h)
	}
	close(gate)
	for i := 0; i < 2; i++ {
		if c := <-done; c != 200 {
			t.Errorf("queued request: %d", c)
		}
	}
}

func TestMetricsAndModels(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	post(t, srv.URL+"/v1/completions", `{"model": "tiny", "prompt": "x", "max_tokens": 2}`)
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := io.ReadAll(resp.Body)
	text := string(data)
	for _, want := range []string{`llmjax_requests_total{path="/v1/completions",code="200"} 1`,
		`llmjax_tokens_total{kind="completion"} 2`, "llmjax_queue_depth 0",
		`llmjax_request_duration_seconds_count{path="/v1/completions"} 1`} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, text)
		}
	}
	resp, err = http.Get(srv.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var models struct {
		Data []struct{ ID string } `json:"data"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&models)
	if len(models.Data) != 1 || models.Data[0].ID != "tiny" {
		t.Errorf("models %+v", models)
	}
}

func TestStopStringTailIsHeldBack(t *testing.T) {
	c := choiceText{stops: []string{"END"}}
	c.update("abc E")
	if d := c.delta(false); d != "abc " {
		t.Errorf("delta %q", d)
	}
	c.update("abc EN\uFFFD")
	if d := c.delta(false); d != "" {
		t.Errorf("delta %q", d)
	}
	if !c.update("abc ENDx") || c.text != "abc " || c.delta(true) != "" {
		t.Errorf("stop: %+v", c)
	}
}

func TestABodyOverTheLimitWithoutLengthIs413(t *testing.T) {
	srv := newServer(t, nil, nil, nil)
	body := io.MultiReader(strings.NewReader(`{"model": "tiny", "prompt": "`), strings.NewReader(strings.Repeat("x", 8000)),
		strings.NewReader(`"}`)) // No Content-Length: the limit is met while reading.
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/completions", body)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 413 || req.ContentLength != 0 {
		t.Errorf("status %d (content length %d)", resp.StatusCode, req.ContentLength)
	}
}
