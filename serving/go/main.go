// Command llmjax-generate runs an llm_jax SavedModel through the TensorFlow C
// API: it loads the model the way TF Serving does (TF_LoadSessionFromSavedModel
// with the "serve" tag), reads the signatures from the MetaGraphDef, and
// generates from prompts given on the command line.
//
//	./llmjax-generate -model RUN/export/1 -ids 5,17,9 -ids 12 -max_new_tokens 16
//	./llmjax-generate -model RUN/export/1 -text 'def main(' -temperature 0.8 -seed 1
//
// Token-id prompts run the "serving_default" signature (left-padded to the
// export's prompt bucket, as llm_jax.generate pads them); text prompts run
// "generate_text", whose SentencePiece ops live in tensorflow-text's
// _sentencepiece_tokenizer.so (loaded with TF_LoadLibrary; build.sh bakes in
// its path). One JSON object per prompt is printed on stdout.
package main

/*
#include <stdlib.h>
#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"
*/
import "C"

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"unsafe"
)

// Set by build.sh (-ldflags -X) to the wheel's tensorflow-text op library.
var defaultSentencepieceLib = ""

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, " ") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// A signature: its input and output keys mapped to graph tensors "op:index".
type signature struct {
	inputs, outputs map[string]string
}

type result struct {
	Signature string `json:"signature"`
	Row       int    `json:"row"`
	Prompt    any    `json:"prompt"`
	Tokens    []int  `json:"tokens"`
	Count     int    `json:"count"`
	Text      string `json:"text,omitempty"`
}

func main() {
	var ids, texts multiFlag
	model := flag.String("model", "", "SavedModel directory (an llm_jax export)")
	flag.Var(&ids, "ids", "a prompt as comma-separated token ids (repeatable)")
	flag.Var(&texts, "text", "a text prompt (repeatable)")
	maxNew := flag.Int("max_new_tokens", 16, "new tokens per prompt at most")
	temperature := flag.Float64("temperature", 0, "sampling temperature; 0 is greedy")
	topK := flag.Int("top_k", 0, "sample among the k likeliest; 0: all")
	topP := flag.Float64("top_p", 1, "nucleus probability; 1: all")
	seed := flag.Int("seed", 0, "sampling seed")
	spLib := flag.String("sentencepiece_lib", defaultSentencepieceLib,
		"tensorflow-text's _sentencepiece_tokenizer.so (empty: not loaded; only "+
			"exports made with --notext_signature load without it)")
	flag.Parse()
	if *model == "" || (len(ids) == 0 && len(texts) == 0) {
		fail("pass -model DIR and at least one -ids or -text prompt")
	}
	// An export with the text signature has SentencePiece ops in its graph:
	// the session cannot even load without them, ids-only requests included.
	if *spLib != "" {
		loadLibrary(*spLib)
	} else if len(texts) > 0 {
		fail("-text needs -sentencepiece_lib (tensorflow-text's _sentencepiece_tokenizer.so)")
	}
	m := load(*model)
	defer m.close()
	scalars := map[string]*C.TF_Tensor{
		"max_new_tokens": int32Tensor([]int32{int32(*maxNew)}, nil),
		"temperature":    float32Tensor(float32(*temperature)),
		"top_k":          int32Tensor([]int32{int32(*topK)}, nil),
		"top_p":          float32Tensor(float32(*topP)),
		"seed":           int32Tensor([]int32{int32(*seed)}, nil),
	}
	enc := json.NewEncoder(os.Stdout)
	if len(ids) > 0 {
		prompts := parseIDs(ids)
		tokens, lengths := leftPad(prompts, m.promptWidth(prompts))
		in := map[string]*C.TF_Tensor{"tokens": tokens, "lengths": lengths}
		for k, v := range scalars {
			in[k] = v
		}
		out := m.run("serving_default", in, []string{"tokens", "counts"})
		rows, counts := int32Matrix(out[0]), int32Vector(out[1])
		for r, p := range prompts {
			check(enc.Encode(result{"serving_default", r, p, ints(rows[r][:counts[r]]), int(counts[r]), ""}))
		}
	}
	if len(texts) > 0 {
		in := map[string]*C.TF_Tensor{"text": stringTensor(texts)}
		for k, v := range scalars {
			in[k] = v
		}
		out := m.run("generate_text", in, []string{"text", "tokens", "counts"})
		strs, rows, counts := stringVector(out[0]), int32Matrix(out[1]), int32Vector(out[2])
		for r, p := range texts {
			check(enc.Encode(result{"generate_text", r, p, ints(rows[r][:counts[r]]), int(counts[r]), strs[r]}))
		}
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "error: "+msg)
	os.Exit(2)
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func checkStatus(s *C.TF_Status, what string) {
	if C.TF_GetCode(s) != C.TF_OK {
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", what, C.GoString(C.TF_Message(s)))
		os.Exit(1)
	}
}

func loadLibrary(path string) {
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	// The handle stays loaded for the life of the process (its ops are registered).
	C.TF_LoadLibrary(cpath, s)
	checkStatus(s, "loading "+path)
}

// ---- The model: session, graph, signatures.

type model struct {
	dir        string
	graph      *C.TF_Graph
	session    *C.TF_Session
	signatures map[string]signature
	buckets    []int
}

func load(dir string) *model {
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	opts := C.TF_NewSessionOptions()
	defer C.TF_DeleteSessionOptions(opts)
	meta := C.TF_NewBuffer()
	defer C.TF_DeleteBuffer(meta)
	cdir, ctag := C.CString(dir), C.CString("serve")
	defer C.free(unsafe.Pointer(cdir))
	defer C.free(unsafe.Pointer(ctag))
	tags := []*C.char{ctag}
	graph := C.TF_NewGraph()
	session := C.TF_LoadSessionFromSavedModel(opts, nil, cdir, &tags[0], 1, graph, meta, s)
	checkStatus(s, "loading the SavedModel "+dir)
	sigs, err := parseSignatures(C.GoBytes(meta.data, C.int(meta.length)))
	check(err)
	m := &model{dir: dir, graph: graph, session: session, signatures: sigs}
	// The export's prompt buckets, so prompts pad as llm_jax.generate pads them.
	if data, err := os.ReadFile(filepath.Join(dir, "assets.extra", "llm_jax_export.json")); err == nil {
		var info struct {
			PromptBuckets []int `json:"prompt_buckets"`
		}
		if json.Unmarshal(data, &info) == nil {
			m.buckets = info.PromptBuckets
			sort.Ints(m.buckets)
		}
	}
	return m
}

func (m *model) close() {
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	C.TF_CloseSession(m.session, s)
	C.TF_DeleteSession(m.session, s)
	C.TF_DeleteGraph(m.graph)
}

func (m *model) promptWidth(prompts [][]int32) int {
	longest := 1
	for _, p := range prompts {
		if len(p) > longest {
			longest = len(p)
		}
	}
	for _, b := range m.buckets {
		if b >= longest {
			return b
		}
	}
	return longest
}

// output resolves a tensor name "op:index" of the graph.
func (m *model) output(name string) C.TF_Output {
	op, index := name, 0
	if i := strings.LastIndex(name, ":"); i >= 0 {
		op = name[:i]
		n, err := strconv.Atoi(name[i+1:])
		check(err)
		index = n
	}
	cop := C.CString(op)
	defer C.free(unsafe.Pointer(cop))
	oper := C.TF_GraphOperationByName(m.graph, cop)
	if oper == nil {
		fail("the graph has no operation " + op)
	}
	return C.TF_Output{oper: oper, index: C.int(index)}
}

// run feeds the signature's inputs by key and fetches the named outputs.
func (m *model) run(sigName string, feeds map[string]*C.TF_Tensor, fetch []string) []*C.TF_Tensor {
	sig, ok := m.signatures[sigName]
	if !ok {
		fail(fmt.Sprintf("the SavedModel has no signature %q", sigName))
	}
	var inputs []C.TF_Output
	var values []*C.TF_Tensor
	for key, name := range sig.inputs {
		t, ok := feeds[key]
		if !ok {
			fail(fmt.Sprintf("signature %q wants input %q", sigName, key))
		}
		inputs = append(inputs, m.output(name))
		values = append(values, t)
	}
	outputs := make([]C.TF_Output, len(fetch))
	for i, key := range fetch {
		name, ok := sig.outputs[key]
		if !ok {
			fail(fmt.Sprintf("signature %q has no output %q", sigName, key))
		}
		outputs[i] = m.output(name)
	}
	results := make([]*C.TF_Tensor, len(fetch))
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	C.TF_SessionRun(m.session, nil, &inputs[0], &values[0], C.int(len(inputs)),
		&outputs[0], &results[0], C.int(len(outputs)), nil, 0, nil, s)
	checkStatus(s, "running "+sigName)
	return results
}

// ---- Tensors.

func int32Tensor(values []int32, dims []int64) *C.TF_Tensor {
	var dimsPtr *C.int64_t
	if len(dims) > 0 {
		dimsPtr = (*C.int64_t)(unsafe.Pointer(&dims[0]))
	}
	t := C.TF_AllocateTensor(C.TF_INT32, dimsPtr, C.int(len(dims)), C.size_t(4*len(values)))
	copy(unsafe.Slice((*int32)(C.TF_TensorData(t)), len(values)), values)
	return t
}

func float32Tensor(v float32) *C.TF_Tensor {
	t := C.TF_AllocateTensor(C.TF_FLOAT, nil, 0, 4)
	*(*float32)(C.TF_TensorData(t)) = v
	return t
}

func stringTensor(values []string) *C.TF_Tensor {
	dims := []int64{int64(len(values))}
	size := C.size_t(len(values)) * C.size_t(unsafe.Sizeof(C.TF_TString{}))
	t := C.TF_AllocateTensor(C.TF_STRING, (*C.int64_t)(unsafe.Pointer(&dims[0])), 1, size)
	elems := unsafe.Slice((*C.TF_TString)(C.TF_TensorData(t)), len(values))
	for i, v := range values {
		cs := C.CString(v)
		C.TF_StringInit(&elems[i])
		C.TF_StringCopy(&elems[i], cs, C.size_t(len(v)))
		C.free(unsafe.Pointer(cs))
	}
	return t
}

func int32Vector(t *C.TF_Tensor) []int32 {
	n := int(C.TF_Dim(t, 0))
	return append([]int32(nil), unsafe.Slice((*int32)(C.TF_TensorData(t)), n)...)
}

func int32Matrix(t *C.TF_Tensor) [][]int32 {
	rows, cols := int(C.TF_Dim(t, 0)), int(C.TF_Dim(t, 1))
	flat := unsafe.Slice((*int32)(C.TF_TensorData(t)), rows*cols)
	out := make([][]int32, rows)
	for r := range out {
		out[r] = append([]int32(nil), flat[r*cols:(r+1)*cols]...)
	}
	return out
}

func stringVector(t *C.TF_Tensor) []string {
	n := int(C.TF_Dim(t, 0))
	elems := unsafe.Slice((*C.TF_TString)(C.TF_TensorData(t)), n)
	out := make([]string, n)
	for i := range elems {
		out[i] = C.GoStringN(C.TF_StringGetDataPointer(&elems[i]), C.int(C.TF_StringGetSize(&elems[i])))
	}
	return out
}

func ints(v []int32) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func parseIDs(specs []string) [][]int32 {
	var prompts [][]int32
	for _, spec := range specs {
		var p []int32
		for _, f := range strings.Split(spec, ",") {
			if f = strings.TrimSpace(f); f == "" {
				continue
			}
			n, err := strconv.Atoi(f)
			if err != nil {
				fail(fmt.Sprintf("-ids %q is not a comma-separated list of integers", spec))
			}
			p = append(p, int32(n))
		}
		prompts = append(prompts, p)
	}
	return prompts
}

// leftPad right-aligns each prompt in a [batch, width] int32 tensor (pad 0).
func leftPad(prompts [][]int32, width int) (*C.TF_Tensor, *C.TF_Tensor) {
	flat := make([]int32, len(prompts)*width)
	lengths := make([]int32, len(prompts))
	for r, p := range prompts {
		copy(flat[r*width+width-len(p):(r+1)*width], p)
		lengths[r] = int32(len(p))
	}
	return int32Tensor(flat, []int64{int64(len(prompts)), int64(width)}),
		int32Tensor(lengths, []int64{int64(len(prompts))})
}
