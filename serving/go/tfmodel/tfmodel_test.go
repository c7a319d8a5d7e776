package tfmodel

import (
	"reflect"
	"strings"
	"testing"
)

// These need the TensorFlow libraries (linked by build.sh) but no model.

func TestTensorsHoldWhatTheyWereGiven(t *testing.T) {
	a, err := NewInt32([]int32{1, 2, 3, 4, 5, 6}, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if !reflect.DeepEqual(a.Shape(), []int64{2, 3}) || !reflect.DeepEqual(a.Int32s(), []int32{1, 2, 3, 4, 5, 6}) ||
		a.Type() != Int32 || a.Float32s() != nil {
		t.Errorf("int32 tensor: %v %v", a.Shape(), a.Int32s())
	}
	if _, err := NewInt32([]int32{1, 2}, 3); err == nil {
		t.Error("a shape that does not fit the values was accepted")
	}
	s := NewStrings([]string{"héllo", "", strings.Repeat("x", 100)})
	defer s.Close()
	if got := s.Strings(); !reflect.DeepEqual(got, []string{"héllo", "", strings.Repeat("x", 100)}) {
		t.Errorf("strings: %q", got)
	}
	z := Alloc(Float, 2, 2)
	if !reflect.DeepEqual(z.Float32s(), []float32{0, 0, 0, 0}) || len(z.Bytes()) != 16 {
		t.Errorf("Alloc: %v", z.Float32s())
	}
	z.Close()
	z.Close() // Closing twice is harmless.
	if Float32Scalar(2.5).Float32s()[0] != 2.5 || Int32Scalar(-3).Int32s()[0] != -3 {
		t.Error("scalars")
	}
}

func TestLoadFailuresAreErrors(t *testing.T) {
	if _, err := Load(t.TempDir(), nil); err == nil || !strings.Contains(err.Error(), "loading the SavedModel") {
		t.Errorf("an empty directory: %v", err)
	}
	if err := LoadLibrary("/nonexistent/lib.so"); err == nil {
		t.Error("a missing op library loaded")
	}
}
