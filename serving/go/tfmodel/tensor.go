package tfmodel

/*
#include <stdlib.h>
#include <string.h>
#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// DataType is a TF_DataType.
type DataType int

// The data types llm_jax's signatures use.
const (
	Float    DataType = C.TF_FLOAT
	Int32    DataType = C.TF_INT32
	String   DataType = C.TF_STRING
	BFloat16 DataType = C.TF_BFLOAT16
)

// Tensor is a TF_Tensor owned by Go: Close frees it (a finalizer does if
// Close is forgotten).
type Tensor struct {
	t *C.TF_Tensor
}

func wrap(t *C.TF_Tensor) *Tensor {
	w := &Tensor{t: t}
	runtime.SetFinalizer(w, (*Tensor).Close)
	return w
}

// Close frees the tensor; a closed (or nil) tensor may be closed again.
func (t *Tensor) Close() {
	if t == nil || t.t == nil {
		return
	}
	C.TF_DeleteTensor(t.t)
	t.t = nil
	runtime.SetFinalizer(t, nil)
}

func elements(dims []int64) int {
	n := 1
	for _, d := range dims {
		n *= int(d)
	}
	return n
}

// Alloc returns a zeroed tensor of the given type and shape (not for strings).
func Alloc(dtype DataType, dims ...int64) *Tensor {
	size := C.size_t(elements(dims)) * C.TF_DataTypeSize(C.TF_DataType(dtype))
	var dimsPtr *C.int64_t
	if len(dims) > 0 {
		dimsPtr = (*C.int64_t)(unsafe.Pointer(&dims[0]))
	}
	t := C.TF_AllocateTensor(C.TF_DataType(dtype), dimsPtr, C.int(len(dims)), size)
	if size > 0 {
		C.memset(C.TF_TensorData(t), 0, size)
	}
	return wrap(t)
}

// NewInt32 is an int32 tensor of shape dims holding values (row-major).
func NewInt32(values []int32, dims ...int64) (*Tensor, error) {
	if elements(dims) != len(values) {
		return nil, fmt.Errorf("int32 tensor of shape %v cannot hold %d values", dims, len(values))
	}
	t := Alloc(Int32, dims...)
	copy(t.Int32s(), values)
	return t, nil
}

// NewFloat32 is a float32 tensor of shape dims holding values (row-major).
func NewFloat32(values []float32, dims ...int64) (*Tensor, error) {
	if elements(dims) != len(values) {
		return nil, fmt.Errorf("float32 tensor of shape %v cannot hold %d values", dims, len(values))
	}
	t := Alloc(Float, dims...)
	copy(t.Float32s(), values)
	return t, nil
}

// Int32Scalar is a scalar int32 tensor.
func Int32Scalar(v int32) *Tensor {
	t := Alloc(Int32)
	t.Int32s()[0] = v
	return t
}

// Float32Scalar is a scalar float32 tensor.
func Float32Scalar(v float32) *Tensor {
	t := Alloc(Float)
	t.Float32s()[0] = v
	return t
}

// NewStrings is a string tensor of shape [len(values)].
func NewStrings(values []string) *Tensor {
	dims := []int64{int64(len(values))}
	size := C.size_t(len(values)) * C.size_t(unsafe.Sizeof(C.TF_TString{}))
	t := C.TF_AllocateTensor(C.TF_STRING, (*C.int64_t)(unsafe.Pointer(&dims[0])), 1, size)
	elems := unsafe.Slice((*C.TF_TString)(C.TF_TensorData(t)), len(values))
	for i, v := range values {
		C.TF_StringInit(&elems[i])
		if len(v) > 0 {
			cs := C.CBytes([]byte(v))
			C.TF_StringCopy(&elems[i], (*C.char)(cs), C.size_t(len(v)))
			C.free(cs)
		}
	}
	return wrap(t)
}

// Type is the tensor's data type.
func (t *Tensor) Type() DataType { return DataType(C.TF_TensorType(t.t)) }

// Shape is the tensor's dimensions.
func (t *Tensor) Shape() []int64 {
	dims := make([]int64, int(C.TF_NumDims(t.t)))
	for i := range dims {
		dims[i] = int64(C.TF_Dim(t.t, C.int(i)))
	}
	return dims
}

// Bytes is the tensor's memory (not for strings); it is valid until Close.
func (t *Tensor) Bytes() []byte {
	n := int(C.TF_TensorByteSize(t.t))
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(C.TF_TensorData(t.t)), n)
}

// Int32s is the tensor's memory as int32 values (nil unless the type is
// Int32); it is valid until Close.
func (t *Tensor) Int32s() []int32 {
	if t.Type() != Int32 || C.TF_TensorByteSize(t.t) == 0 {
		return nil
	}
	return unsafe.Slice((*int32)(C.TF_TensorData(t.t)), elements(t.Shape()))
}

// Float32s is the tensor's memory as float32 values (nil unless the type is
// Float); it is valid until Close.
func (t *Tensor) Float32s() []float32 {
	if t.Type() != Float || C.TF_TensorByteSize(t.t) == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(C.TF_TensorData(t.t)), elements(t.Shape()))
}

// Strings copies a string tensor's values out (nil unless the type is String).
func (t *Tensor) Strings() []string {
	if t.Type() != String {
		return nil
	}
	n := elements(t.Shape())
	if n == 0 {
		return []string{}
	}
	elems := unsafe.Slice((*C.TF_TString)(C.TF_TensorData(t.t)), n)
	out := make([]string, n)
	for i := range elems {
		out[i] = C.GoStringN(C.TF_StringGetDataPointer(&elems[i]), C.int(C.TF_StringGetSize(&elems[i])))
	}
	return out
}
