// Package tfmodel runs a TensorFlow SavedModel through the TensorFlow C API.
//
// It loads a model the way TF Serving does (TF_LoadSessionFromSavedModel with
// the "serve" tag) and runs its signatures by name: the caller names each
// signature's inputs and outputs and the graph tensors behind them (an
// llm_jax export records them in assets.extra/llm_jax_export.json; see the
// export package), so nothing here parses protocol buffers.
//
// Every failure is returned as an error; tensors returned to the caller are
// the caller's to Close (a finalizer frees any that are forgotten). Run is
// safe to call from several goroutines at once (TF_SessionRun is); Close is
// not, and must come after the last Run.
package tfmodel

/*
#include <stdlib.h>
#include "tensorflow/c/c_api.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"unsafe"
)

// Signature maps a signature's input and output keys to graph tensors
// ("operation:index").
type Signature struct {
	Inputs  map[string]string `json:"inputs"`
	Outputs map[string]string `json:"outputs"`
}

type resolved struct {
	inputs, outputs map[string]C.TF_Output
}

// Model is a loaded SavedModel session with its signatures resolved.
type Model struct {
	dir     string
	graph   *C.TF_Graph
	session *C.TF_Session
	sigs    map[string]resolved
}

// LoadLibrary registers the ops of a custom-op library (for example
// tensorflow-text's _sentencepiece_tokenizer.so). The library stays loaded
// for the life of the process.
func LoadLibrary(path string) error {
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	C.TF_LoadLibrary(cpath, s)
	return statusError(s, "loading the op library "+path)
}

// Load opens the SavedModel in dir (tag "serve") and resolves every tensor
// the signatures name; a name the graph does not hold is an error.
func Load(dir string, signatures map[string]Signature) (*Model, error) {
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	opts := C.TF_NewSessionOptions()
	defer C.TF_DeleteSessionOptions(opts)
	cdir, ctag := C.CString(dir), C.CString("serve")
	defer C.free(unsafe.Pointer(cdir))
	defer C.free(unsafe.Pointer(ctag))
	tags := []*C.char{ctag}
	graph := C.TF_NewGraph()
	session := C.TF_LoadSessionFromSavedModel(opts, nil, cdir, &tags[0], 1, graph, nil, s)
	if err := statusError(s, "loading the SavedModel "+dir); err != nil {
		C.TF_DeleteGraph(graph)
		return nil, err
	}
	m := &Model{dir: dir, graph: graph, session: session, sigs: map[string]resolved{}}
	for name, sig := range signatures {
		r, err := m.resolve(name, sig)
		if err != nil {
			m.Close()
			return nil, err
		}
		m.sigs[name] = r
	}
	return m, nil
}

func (m *Model) resolve(name string, sig Signature) (resolved, error) {
	r := resolved{inputs: map[string]C.TF_Output{}, outputs: map[string]C.TF_Output{}}
	for _, side := range []struct {
		names map[string]string
		into  map[string]C.TF_Output
	}{{sig.Inputs, r.inputs}, {sig.Outputs, r.outputs}} {
		for key, tensor := range side.names {
			out, err := m.output(tensor)
			if err != nil {
				return r, fmt.Errorf("signature %q, %q: %w", name, key, err)
			}
			side.into[key] = out
		}
	}
	return r, nil
}

// output resolves a graph tensor name "op:index" ("op" means index 0).
func (m *Model) output(name string) (C.TF_Output, error) {
	op, index := name, 0
	if i := strings.LastIndex(name, ":"); i >= 0 {
		n, err := strconv.Atoi(name[i+1:])
		if err != nil {
			return C.TF_Output{}, fmt.Errorf("tensor name %q is not \"operation:index\"", name)
		}
		op, index = name[:i], n
	}
	cop := C.CString(op)
	defer C.free(unsafe.Pointer(cop))
	oper := C.TF_GraphOperationByName(m.graph, cop)
	if oper == nil {
		return C.TF_Output{}, fmt.Errorf("the graph of %s has no operation %q", m.dir, op)
	}
	if index < 0 || index >= int(C.TF_OperationNumOutputs(oper)) {
		return C.TF_Output{}, fmt.Errorf("operation %q has no output %d", op, index)
	}
	return C.TF_Output{oper: oper, index: C.int(index)}, nil
}

// Has reports whether the model was loaded with the named signature.
func (m *Model) Has(signature string) bool {
	_, ok := m.sigs[signature]
	return ok
}

// Run feeds a signature's inputs by key and fetches the named outputs. The
// feeds must be exactly the signature's inputs. The returned tensors belong
// to the caller.
func (m *Model) Run(signature string, feeds map[string]*Tensor, fetch []string) ([]*Tensor, error) {
	sig, ok := m.sigs[signature]
	if !ok {
		return nil, fmt.Errorf("the model has no signature %q", signature)
	}
	inputs, values, err := feedList(signature, sig, feeds)
	if err != nil {
		return nil, err
	}
	outputs := make([]C.TF_Output, len(fetch))
	for i, key := range fetch {
		out, ok := sig.outputs[key]
		if !ok {
			return nil, fmt.Errorf("signature %q has no output %q", signature, key)
		}
		outputs[i] = out
	}
	if len(outputs) == 0 {
		return nil, fmt.Errorf("running %s: fetch at least one output", signature)
	}
	results := make([]*C.TF_Tensor, len(fetch))
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	// The slices hold C pointers only (operations, tensors), as cgo requires.
	var in0 *C.TF_Output
	var val0 **C.TF_Tensor
	if len(inputs) > 0 {
		in0, val0 = &inputs[0], &values[0]
	}
	C.TF_SessionRun(m.session, nil, in0, val0, C.int(len(inputs)),
		&outputs[0], &results[0], C.int(len(outputs)), nil, 0, nil, s)
	runtime.KeepAlive(feeds)
	out := make([]*Tensor, len(fetch))
	for i, r := range results {
		if r != nil {
			out[i] = wrap(r)
		}
	}
	if err := statusError(s, "running "+signature); err != nil {
		for _, t := range out {
			t.Close()
		}
		return nil, err
	}
	return out, nil
}

// feedList orders the feeds as the signature's inputs (sorted by key); the
// feeds must be exactly those inputs.
func feedList(signature string, sig resolved, feeds map[string]*Tensor) ([]C.TF_Output, []*C.TF_Tensor, error) {
	keys := make([]string, 0, len(sig.inputs))
	for key := range sig.inputs {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	inputs := make([]C.TF_Output, 0, len(keys))
	values := make([]*C.TF_Tensor, 0, len(keys))
	for _, key := range keys {
		t, ok := feeds[key]
		if !ok || t == nil || t.t == nil {
			return nil, nil, fmt.Errorf("signature %q needs input %q", signature, key)
		}
		inputs = append(inputs, sig.inputs[key])
		values = append(values, t.t)
	}
	for key := range feeds {
		if _, ok := sig.inputs[key]; !ok {
			return nil, nil, fmt.Errorf("signature %q has no input %q", signature, key)
		}
	}
	return inputs, values, nil
}

// Close ends the session and frees the graph.
func (m *Model) Close() {
	if m.session == nil {
		return
	}
	s := C.TF_NewStatus()
	defer C.TF_DeleteStatus(s)
	C.TF_CloseSession(m.session, s)
	C.TF_DeleteSession(m.session, s)
	C.TF_DeleteGraph(m.graph)
	m.session, m.graph = nil, nil
}

func statusError(s *C.TF_Status, what string) error {
	if C.TF_GetCode(s) == C.TF_OK {
		return nil
	}
	return &Error{Code: int(C.TF_GetCode(s)), What: what, Message: C.GoString(C.TF_Message(s))}
}

// Error is a failed TensorFlow call; Code is the TF_Code (3: INVALID_ARGUMENT,
// the graph's asserts on a bad request).
type Error struct {
	Code    int
	What    string
	Message string
}

func (e *Error) Error() string { return e.What + ": " + e.Message }

// InvalidArgument reports whether the model refused the request (a graph
// assert), rather than failing.
func (e *Error) InvalidArgument() bool { return e.Code == InvalidArgument }

// InvalidArgument is TF_INVALID_ARGUMENT: the request, not the model, was wrong.
const InvalidArgument = 3
