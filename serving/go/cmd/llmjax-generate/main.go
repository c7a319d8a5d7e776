// Command llmjax-generate runs an llm_jax SavedModel through the TensorFlow C
// API: it loads the model the way TF Serving does (tag "serve"), finds the
// signatures' tensors in the export's assets.extra/llm_jax_export.json, and
// generates from prompts given on the command line.
//
//	bin/llmjax-generate -model RUN/export/1 -ids 5,17,9 -ids 12 -max_new_tokens 16
//	bin/llmjax-generate -model RUN/export/1 -text 'def main(' -temperature 0.8 -seed 1
//	bin/llmjax-generate -model QA_RUN/export/1 -task qa -question 'Who?' -context 'Ann did.'
//	bin/llmjax-generate -model CLS_RUN/export/1 -task classify -text 'a fine film'
//
// Token-id prompts run the "serving_default" signature (left-padded to the
// export's prompt bucket, as llm_jax.generate pads them); text prompts run
// "generate_text", whose SentencePiece ops live in tensorflow-text's
// _sentencepiece_tokenizer.so (loaded with TF_LoadLibrary; build.sh bakes in
// its path). An encoder's task export (-task) runs "answer" (question and
// context -> answer text, score and character offsets) or "classify" (text,
// and -text_pair for a pair task -> label and probabilities); its WordPiece
// ops come from the tensorflow-text libraries beside the SentencePiece one.
// One JSON object per prompt is printed on stdout.
//
// Exit status: 0 on success, 2 for bad flags, 1 when loading or running the
// model fails (a request the model refuses included), with one line on stderr.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"llmjax/serving/export"
	"llmjax/serving/tfmodel"
)

// Set by build.sh (-ldflags -X) to the wheel's tensorflow-text op library.
var defaultSentencepieceLib = ""

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

type options struct {
	model       string
	ids, texts  []string
	maxNew      int
	temperature float64
	topK        int
	topP        float64
	seed        int
	spLib       string
	task        string
	questions   []string
	contexts    []string
	textPairs   []string
}

// The op libraries of tensorflow-text a task export's tokenizer may need
// (BERT WordPiece), looked for beside -sentencepiece_lib.
var wordpieceLibs = []string{"_fast_bert_normalizer.so", "_fast_wordpiece_tokenizer.so"}

// usageError is bad flags (exit 2); every other error exits 1.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

type result struct {
	Signature string `json:"signature"`
	Row       int    `json:"row"`
	Prompt    any    `json:"prompt"`
	Tokens    []int  `json:"tokens"`
	Count     int    `json:"count"`
	Text      string `json:"text,omitempty"`
}

func main() {
	var o options
	var ids, texts, questions, contexts, pairs multiFlag
	flag.StringVar(&o.model, "model", "", "SavedModel directory (an llm_jax export)")
	flag.Var(&ids, "ids", "a prompt as comma-separated token ids (repeatable)")
	flag.Var(&texts, "text", "a text prompt, or with -task classify a text to label (repeatable)")
	flag.StringVar(&o.task, "task", "", "an encoder task export's signature: qa or classify (empty: generate)")
	flag.Var(&questions, "question", "-task qa: a question (repeatable, one per -context)")
	flag.Var(&contexts, "context", "-task qa: the text the answer is in (repeatable)")
	flag.Var(&pairs, "text_pair", "-task classify: the second text of a pair task (one per -text)")
	flag.IntVar(&o.maxNew, "max_new_tokens", 16, "new tokens per prompt at most")
	flag.Float64Var(&o.temperature, "temperature", 0, "sampling temperature; 0 is greedy")
	flag.IntVar(&o.topK, "top_k", 0, "sample among the k likeliest; 0: all")
	flag.Float64Var(&o.topP, "top_p", 1, "nucleus probability; 1: all")
	flag.IntVar(&o.seed, "seed", 0, "sampling seed")
	flag.StringVar(&o.spLib, "sentencepiece_lib", defaultSentencepieceLib,
		"tensorflow-text's _sentencepiece_tokenizer.so (empty: not loaded; only "+
			"exports made with --notext_signature load without it)")
	flag.Parse()
	o.ids, o.texts, o.questions, o.contexts, o.textPairs = ids, texts, questions, contexts, pairs
	if err := run(o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "error: "+err.Error())
		var u usageError
		if errors.As(err, &u) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run(o options, stdout io.Writer) error {
	if o.task != "" {
		return runTask(o, stdout)
	}
	if o.model == "" || (len(o.ids) == 0 && len(o.texts) == 0) {
		return usageError{"pass -model DIR and at least one -ids or -text prompt"}
	}
	prompts := make([][]int32, len(o.ids))
	for i, spec := range o.ids {
		p, err := export.ParseIDs(spec)
		if err != nil {
			return usageError{"-ids " + err.Error()}
		}
		prompts[i] = p
	}
	// An export with the text signature has SentencePiece ops in its graph:
	// the session cannot even load without them, ids-only requests included.
	if o.spLib != "" {
		if err := tfmodel.LoadLibrary(o.spLib); err != nil {
			return err
		}
	} else if len(o.texts) > 0 {
		return usageError{"-text needs -sentencepiece_lib (tensorflow-text's _sentencepiece_tokenizer.so)"}
	}
	info, err := export.Read(o.model)
	if err != nil {
		return err
	}
	m, err := load(o.model, info)
	if err != nil {
		return err
	}
	defer m.Close()
	enc := json.NewEncoder(stdout)
	if len(prompts) > 0 {
		if err := generateIDs(m, info, o, prompts, enc); err != nil {
			return err
		}
	}
	if len(o.texts) > 0 {
		return generateText(m, o, enc)
	}
	return nil
}

func load(dir string, info *export.Info) (*tfmodel.Model, error) {
	sigs := map[string]tfmodel.Signature{}
	for name, sig := range info.Signatures {
		sigs[name] = tfmodel.Signature(sig)
	}
	return tfmodel.Load(dir, sigs)
}

// scalars are the sampling inputs both signatures take; the caller closes them.
func scalars(o options) map[string]*tfmodel.Tensor {
	return map[string]*tfmodel.Tensor{
		"max_new_tokens": tfmodel.Int32Scalar(int32(o.maxNew)),
		"temperature":    tfmodel.Float32Scalar(float32(o.temperature)),
		"top_k":          tfmodel.Int32Scalar(int32(o.topK)),
		"top_p":          tfmodel.Float32Scalar(float32(o.topP)),
		"seed":           tfmodel.Int32Scalar(int32(o.seed)),
	}
}

func closeAll(ts map[string]*tfmodel.Tensor) {
	for _, t := range ts {
		t.Close()
	}
}

func generateIDs(m *tfmodel.Model, info *export.Info, o options, prompts [][]int32, enc *json.Encoder) error {
	longest := 1
	for _, p := range prompts {
		if len(p) > longest {
			longest = len(p)
		}
	}
	width := info.PromptWidth(longest)
	flat, lengths := export.LeftPad(prompts, width)
	feeds := scalars(o)
	defer closeAll(feeds)
	var err error
	if feeds["tokens"], err = tfmodel.NewInt32(flat, int64(len(prompts)), int64(width)); err != nil {
		return err
	}
	if feeds["lengths"], err = tfmodel.NewInt32(lengths, int64(len(prompts))); err != nil {
		return err
	}
	out, err := m.Run(export.Generate, feeds, []string{"tokens", "counts"})
	if err != nil {
		return err
	}
	defer out[0].Close()
	defer out[1].Close()
	rows, counts, cols := out[0].Int32s(), out[1].Int32s(), int(out[0].Shape()[1])
	for r, p := range prompts {
		n := int(counts[r])
		res := result{export.Generate, r, ints(p), ints(rows[r*cols : r*cols+n]), n, ""}
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return nil
}

func generateText(m *tfmodel.Model, o options, enc *json.Encoder) error {
	feeds := scalars(o)
	defer closeAll(feeds)
	feeds["text"] = tfmodel.NewStrings(o.texts)
	out, err := m.Run(export.GenerateText, feeds, []string{"text", "tokens", "counts"})
	if err != nil {
		return err
	}
	for _, t := range out {
		defer t.Close()
	}
	strs, rows, counts := out[0].Strings(), out[1].Int32s(), out[2].Int32s()
	cols := int(out[1].Shape()[1])
	for r, p := range o.texts {
		n := int(counts[r])
		res := result{export.GenerateText, r, p, ints(rows[r*cols : r*cols+n]), n, strs[r]}
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	return nil
}

func ints(v []int32) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

type answerResult struct {
	Question string  `json:"question"`
	Answer   string  `json:"answer"`
	Score    float32 `json:"score"`
	Start    int     `json:"start"`
	End      int     `json:"end"`
}

type classifyResult struct {
	Text          string    `json:"text"`
	TextPair      string    `json:"text_pair,omitempty"`
	Label         string    `json:"label"`
	LabelID       int       `json:"label_id"`
	Probabilities []float32 `json:"probabilities"`
}

// runTask answers questions (-task qa) or labels texts (-task classify).
func runTask(o options, stdout io.Writer) error {
	switch {
	case o.model == "":
		return usageError{"pass -model DIR (an encoder task export)"}
	case o.task == "qa" && (len(o.questions) == 0 || len(o.questions) != len(o.contexts)):
		return usageError{"-task qa needs -question and -context, one -context per -question"}
	case o.task == "classify" && (len(o.texts) == 0 || (len(o.textPairs) > 0 && len(o.textPairs) != len(o.texts))):
		return usageError{"-task classify needs -text (and one -text_pair per -text for a pair task)"}
	case o.task != "qa" && o.task != "classify":
		return usageError{fmt.Sprintf("-task %q: use qa or classify", o.task)}
	}
	if o.spLib == "" {
		return usageError{"-task needs -sentencepiece_lib (tensorflow-text's _sentencepiece_tokenizer.so; its WordPiece libraries are found beside it)"}
	}
	libs := []string{o.spLib}
	for _, name := range wordpieceLibs {
		if p := filepath.Join(filepath.Dir(o.spLib), name); fileExists(p) {
			libs = append(libs, p)
		}
	}
	for _, lib := range libs {
		if err := tfmodel.LoadLibrary(lib); err != nil {
			return err
		}
	}
	info, err := export.Read(o.model)
	if err != nil {
		return err
	}
	sig := map[string]string{"qa": "answer", "classify": "classify"}[o.task]
	if _, ok := info.Signatures[sig]; !ok {
		return fmt.Errorf("%s has no %q signature (it has %s): -task %s needs an export of a "+
			"model.head=%s run whose tokenizer runs in the graph (a byte-level BPE export has "+
			"only %s_ids)", o.model, sig, strings.Join(info.SignatureNames(), ", "), o.task,
			map[string]string{"qa": "qa", "classify": "classification"}[o.task], sig)
	}
	m, err := load(o.model, info)
	if err != nil {
		return err
	}
	defer m.Close()
	enc := json.NewEncoder(stdout)
	if o.task == "qa" {
		return answer(m, o, enc)
	}
	return classify(m, o, enc)
}

func answer(m *tfmodel.Model, o options, enc *json.Encoder) error {
	feeds := map[string]*tfmodel.Tensor{"question": tfmodel.NewStrings(o.questions),
		"context": tfmodel.NewStrings(o.contexts)}
	defer closeAll(feeds)
	out, err := m.Run("answer", feeds, []string{"answer", "score", "start", "end"})
	if err != nil {
		return err
	}
	for _, t := range out {
		defer t.Close()
	}
	texts, scores, starts, ends := out[0].Strings(), out[1].Float32s(), out[2].Int32s(), out[3].Int32s()
	for i, q := range o.questions {
		if err := enc.Encode(answerResult{q, texts[i], scores[i], int(starts[i]), int(ends[i])}); err != nil {
			return err
		}
	}
	return nil
}

func classify(m *tfmodel.Model, o options, enc *json.Encoder) error {
	feeds := map[string]*tfmodel.Tensor{"text": tfmodel.NewStrings(o.texts)}
	if len(o.textPairs) > 0 {
		feeds["text_pair"] = tfmodel.NewStrings(o.textPairs)
	}
	defer closeAll(feeds)
	out, err := m.Run("classify", feeds, []string{"label", "label_id", "probabilities"})
	if err != nil {
		return err
	}
	for _, t := range out {
		defer t.Close()
	}
	labels, ids, probs := out[0].Strings(), out[1].Int32s(), out[2].Float32s()
	n := len(probs) / len(o.texts)
	for i, text := range o.texts {
		r := classifyResult{Text: text, Label: labels[i], LabelID: int(ids[i]),
			Probabilities: probs[i*n : (i+1)*n]}
		if len(o.textPairs) > 0 {
			r.TextPair = o.textPairs[i]
		}
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
