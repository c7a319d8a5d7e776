// Command llmjax-generate runs an llm_jax SavedModel through the TensorFlow C
// API: it loads the model the way TF Serving does (tag "serve"), finds the
// signatures' tensors in the export's assets.extra/llm_jax_export.json, and
// generates from prompts given on the command line.
//
//	bin/llmjax-generate -model RUN/export/1 -ids 5,17,9 -ids 12 -max_new_tokens 16
//	bin/llmjax-generate -model RUN/export/1 -text 'def main(' -temperature 0.8 -seed 1
//
// Token-id prompts run the "serving_default" signature (left-padded to the
// export's prompt bucket, as llm_jax.generate pads them); text prompts run
// "generate_text", whose SentencePiece ops live in tensorflow-text's
// _sentencepiece_tokenizer.so (loaded with TF_LoadLibrary; build.sh bakes in
// its path). One JSON object per prompt is printed on stdout.
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
}

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
	var ids, texts multiFlag
	flag.StringVar(&o.model, "model", "", "SavedModel directory (an llm_jax export)")
	flag.Var(&ids, "ids", "a prompt as comma-separated token ids (repeatable)")
	flag.Var(&texts, "text", "a text prompt (repeatable)")
	flag.IntVar(&o.maxNew, "max_new_tokens", 16, "new tokens per prompt at most")
	flag.Float64Var(&o.temperature, "temperature", 0, "sampling temperature; 0 is greedy")
	flag.IntVar(&o.topK, "top_k", 0, "sample among the k likeliest; 0: all")
	flag.Float64Var(&o.topP, "top_p", 1, "nucleus probability; 1: all")
	flag.IntVar(&o.seed, "seed", 0, "sampling seed")
	flag.StringVar(&o.spLib, "sentencepiece_lib", defaultSentencepieceLib,
		"tensorflow-text's _sentencepiece_tokenizer.so (empty: not loaded; only "+
			"exports made with --notext_signature load without it)")
	flag.Parse()
	o.ids, o.texts = ids, texts
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
