// Package export reads what an llm_jax SavedModel export records about itself
// (assets.extra/llm_jax_export.json, written by llm_jax/deploy/saved_model.py)
// and holds the request layout its signatures expect. It needs no TensorFlow.
package export

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// InfoFile is where an export records itself, relative to the SavedModel.
const InfoFile = "assets.extra/llm_jax_export.json"

// Signature names of an llm_jax export.
const (
	Generate     = "serving_default"
	GenerateText = "generate_text"
	Prefill      = "prefill"
	DecodeStep   = "decode_step"
	Score        = "score"
	Tokenize     = "tokenize"
	Detokenize   = "detokenize"
)

// Cache describes decode_step's KV cache: [rows, Layers, 2, Slots, KVHeads,
// HeadDim] of DType.
type Cache struct {
	Layers  int    `json:"layers"`
	KVHeads int    `json:"kv_heads"`
	HeadDim int    `json:"head_dim"`
	Slots   int    `json:"slots"`
	DType   string `json:"dtype"`
}

// Signature maps a signature's input and output keys to graph tensors.
type Signature struct {
	Inputs  map[string]string `json:"inputs"`
	Outputs map[string]string `json:"outputs"`
}

// Info is the export's record of itself (the fields the Go runtime reads).
type Info struct {
	Step          int                  `json:"step"`
	MaxNewTokens  int                  `json:"max_new_tokens"`
	MaxLen        int                  `json:"max_len"`
	VocabSize     int                  `json:"vocab_size"`
	StopIDs       []int                `json:"stop_ids"`
	BatchBuckets  []int                `json:"batch_buckets"`
	PromptBuckets []int                `json:"prompt_buckets"`
	Signatures    map[string]Signature `json:"signature_tensors"`
	Cache         Cache                `json:"cache"`
	TopLogprobs   int                  `json:"top_logprobs"`
	EOSID         int                  `json:"eos_id"`
	ChatTemplate  string               `json:"chat_template"`
	Head          string               `json:"head"`   // An encoder task export: "qa" or "classification".
	Labels        []string             `json:"labels"` // A classifier's label names, in id order.
}

// CheckStepwise says what is missing for step-by-step generation (the HTTP
// server's needs): the prefill, decode_step and score signatures and the
// cache layout, which exports before them lack.
func (i *Info) CheckStepwise() error {
	for _, name := range []string{Prefill, DecodeStep, Score} {
		if !i.Has(name) {
			return fmt.Errorf("the export has no %s signature: it was made by an older "+
				"llm_jax; export the run again (python -m llm_jax.export --workdir=RUN "+
				"--out=DIR --overwrite)", name)
		}
	}
	c := i.Cache
	if c.Layers < 1 || c.KVHeads < 1 || c.HeadDim < 1 || c.Slots < 2 {
		return fmt.Errorf("the export's record has no valid cache layout (%+v); export the run again", c)
	}
	return nil
}

// Read loads dir's export record. An export without signature_tensors was
// made by an older llm_jax and must be exported again.
func Read(dir string) (*Info, error) {
	path := filepath.Join(dir, InfoFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s has no %s: it is not an llm_jax export "+
			"(python -m llm_jax.export --workdir=RUN --out=DIR writes one)", dir, InfoFile)
	}
	if err != nil {
		return nil, err
	}
	return Parse(data, path)
}

// Parse reads an export record; where names it in errors.
func Parse(data []byte, where string) (*Info, error) {
	var info Info
	if err := json.Unmarshal(data, &info); err != nil {
		return nil, fmt.Errorf("%s is not a valid export record: %v", where, err)
	}
	if len(info.Signatures) == 0 {
		return nil, fmt.Errorf("%s has no signature_tensors: the export was made by an "+
			"older llm_jax; export the run again (python -m llm_jax.export --workdir=RUN "+
			"--out=DIR --overwrite)", where)
	}
	for name, sig := range info.Signatures {
		if len(sig.Inputs) == 0 || len(sig.Outputs) == 0 {
			return nil, fmt.Errorf("%s: signature %q lists no inputs or no outputs", where, name)
		}
	}
	// A decoder's export generates; an encoder's task export (Head set) does not.
	if info.Head == "" && (info.MaxNewTokens < 1 || info.MaxLen < 2) {
		return nil, fmt.Errorf("%s: max_new_tokens (%d) and max_len (%d) must be positive",
			where, info.MaxNewTokens, info.MaxLen)
	}
	sort.Ints(info.BatchBuckets)
	sort.Ints(info.PromptBuckets)
	return &info, nil
}

// SignatureNames lists the export's signatures, sorted.
func (i *Info) SignatureNames() []string {
	names := make([]string, 0, len(i.Signatures))
	for name := range i.Signatures {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// Has reports whether the export has the named signature.
func (i *Info) Has(signature string) bool {
	_, ok := i.Signatures[signature]
	return ok
}

// PromptWidth is the prompt bucket a batch whose longest prompt has n tokens
// pads to (as llm_jax.generate pads): the smallest bucket >= n, else n.
func (i *Info) PromptWidth(n int) int {
	return Bucket(n, i.PromptBuckets)
}

// Bucket is the smallest of the sorted buckets >= n, else n.
func Bucket(n int, buckets []int) int {
	for _, b := range buckets {
		if b >= n {
			return b
		}
	}
	return n
}

// LeftPad right-aligns each prompt in a row of width columns (pad 0), the
// layout serving_default expects: (tokens row-major [len(prompts), width],
// lengths).
func LeftPad(prompts [][]int32, width int) ([]int32, []int32) {
	flat := make([]int32, len(prompts)*width)
	lengths := make([]int32, len(prompts))
	for r, p := range prompts {
		copy(flat[r*width+width-len(p):(r+1)*width], p)
		lengths[r] = int32(len(p))
	}
	return flat, lengths
}

// ParseIDs reads "5, 17,9" as token ids.
func ParseIDs(spec string) ([]int32, error) {
	var ids []int32
	for _, f := range strings.Split(spec, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.ParseInt(f, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("%q is not a comma-separated list of integers", spec)
		}
		ids = append(ids, int32(n))
	}
	return ids, nil
}
