package export

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const record = `{"step": 20, "max_new_tokens": 12, "max_len": 64, "vocab_size": 1024,
 "stop_ids": [2], "batch_buckets": [3, 1], "prompt_buckets": [64, 16, 32],
 "signature_tensors": {"serving_default": {
   "inputs": {"tokens": "serving_default_tokens:0", "lengths": "serving_default_lengths:0"},
   "outputs": {"tokens": "StatefulPartitionedCall:1", "counts": "StatefulPartitionedCall:0"}}}}`

func writeRecord(t *testing.T, text string) string {
	dir := t.TempDir()
	path := filepath.Join(dir, InfoFile)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestReadGivesSignaturesAndSortedBuckets(t *testing.T) {
	info, err := Read(writeRecord(t, record))
	if err != nil {
		t.Fatal(err)
	}
	if got := info.Signatures[Generate].Inputs["lengths"]; got != "serving_default_lengths:0" {
		t.Errorf("lengths tensor = %q", got)
	}
	if !reflect.DeepEqual(info.PromptBuckets, []int{16, 32, 64}) || !reflect.DeepEqual(info.BatchBuckets, []int{1, 3}) {
		t.Errorf("buckets not sorted: %v %v", info.PromptBuckets, info.BatchBuckets)
	}
	if !info.Has(Generate) || info.Has(GenerateText) {
		t.Errorf("Has is wrong")
	}
	for n, want := range map[int]int{1: 16, 16: 16, 17: 32, 64: 64, 70: 70} {
		if got := info.PromptWidth(n); got != want {
			t.Errorf("PromptWidth(%d) = %d, want %d", n, got, want)
		}
	}
}

func TestReadRefusesOldAndForeignExports(t *testing.T) {
	old := strings.Replace(record, `"signature_tensors"`, `"other"`, 1)
	cases := map[string]struct{ dir, want string }{
		"old export":   {writeRecord(t, old), "re-export"},
		"bad json":     {writeRecord(t, "{"), "not a valid export record"},
		"no record":    {t.TempDir(), "not an llm_jax export"},
		"no max_len":   {writeRecord(t, strings.Replace(record, `"max_len": 64`, `"max_len": 0`, 1)), "max_len"},
		"empty inputs": {writeRecord(t, strings.Replace(record, `"inputs": {"tokens": "serving_default_tokens:0", "lengths": "serving_default_lengths:0"}`, `"inputs": {}`, 1)), "no inputs"},
	}
	cases["old export"] = struct{ dir, want string }{cases["old export"].dir, "export the run again"}
	for name, c := range cases {
		_, err := Read(c.dir)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want it to mention %q", name, err, c.want)
		}
	}
}

func TestLeftPadRightAlignsPrompts(t *testing.T) {
	flat, lengths := LeftPad([][]int32{{5, 6, 7}, {9}}, 4)
	if !reflect.DeepEqual(flat, []int32{0, 5, 6, 7, 0, 0, 0, 9}) || !reflect.DeepEqual(lengths, []int32{3, 1}) {
		t.Errorf("LeftPad = %v %v", flat, lengths)
	}
}

func TestParseIDs(t *testing.T) {
	got, err := ParseIDs(" 5, 17,9,")
	if err != nil || !reflect.DeepEqual(got, []int32{5, 17, 9}) {
		t.Errorf("ParseIDs = %v, %v", got, err)
	}
	for _, bad := range []string{"5,x", "1.5", "99999999999"} {
		if _, err := ParseIDs(bad); err == nil {
			t.Errorf("ParseIDs(%q) accepted", bad)
		}
	}
}

func TestCheckStepwiseAsksForAReExport(t *testing.T) {
	info, err := Parse([]byte(record), "x")
	if err != nil {
		t.Fatal(err)
	}
	if err := info.CheckStepwise(); err == nil || !strings.Contains(err.Error(), "export the run again") {
		t.Errorf("an export without prefill: %v", err)
	}
	for _, name := range []string{Prefill, DecodeStep, Score} {
		info.Signatures[name] = info.Signatures[Generate]
	}
	if err := info.CheckStepwise(); err == nil || !strings.Contains(err.Error(), "cache layout") {
		t.Errorf("an export without a cache layout: %v", err)
	}
	info.Cache = Cache{Layers: 2, KVHeads: 2, HeadDim: 16, Slots: 64, DType: "float32"}
	if err := info.CheckStepwise(); err != nil {
		t.Error(err)
	}
}
