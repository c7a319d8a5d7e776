// Package backend runs an llm_jax export's step signatures (prefill,
// decode_step, score) and its tokenizer (tokenize, detokenize) through
// tfmodel: it is the engine's Backend and the HTTP server's model.
//
// The KV cache is a TensorFlow tensor the engine's batch owns, [rows, layers,
// 2, slots, kv heads, head dim] (the layout export.Cache describes):
// decode_step only reads it and returns each row's new keys and values,
// which Step writes into the row's slot, so a step moves one slot per row;
// CopyRow moves one sequence between caches when the batch changes.
package backend

import (
	"fmt"
	"sort"

	"llmjax/serving/engine"
	"llmjax/serving/export"
	"llmjax/serving/tfmodel"
)

// Model is a loaded export.
type Model struct {
	m          *tfmodel.Model
	Info       *export.Info
	dtype      tfmodel.DataType
	elem       int   // bytes of one cache element
	batchSizes []int // prefill calls are padded to these
}

// Load opens the export in dir; spLib (tensorflow-text's op library) is
// needed when the export has its text signatures.
func Load(dir, spLib string) (*Model, error) {
	info, err := export.Read(dir)
	if err != nil {
		return nil, err
	}
	if err := info.CheckStepwise(); err != nil {
		return nil, err
	}
	if spLib != "" {
		if err := tfmodel.LoadLibrary(spLib); err != nil {
			return nil, err
		}
	}
	sigs := map[string]tfmodel.Signature{}
	for name, sig := range info.Signatures {
		sigs[name] = tfmodel.Signature(sig)
	}
	m, err := tfmodel.Load(dir, sigs)
	if err != nil {
		return nil, err
	}
	b := &Model{m: m, Info: info, batchSizes: info.BatchBuckets}
	switch info.Cache.DType {
	case "float32":
		b.dtype, b.elem = tfmodel.Float, 4
	case "bfloat16":
		b.dtype, b.elem = tfmodel.BFloat16, 2
	default:
		m.Close()
		return nil, fmt.Errorf("%s: cache dtype %q is not float32 or bfloat16", dir, info.Cache.DType)
	}
	return b, nil
}

// Close frees the session.
func (b *Model) Close() { b.m.Close() }

// HasText reports whether the export has its tokenizer signatures.
func (b *Model) HasText() bool {
	return b.m.Has(export.Tokenize) && b.m.Has(export.Detokenize)
}

// cache is a batch (or prefill) cache tensor.
type cache struct {
	t     *tfmodel.Tensor
	rows  int // rows in use (a prefill pads to a batch size)
	slots int
}

func (c *cache) Rows() int { return c.rows }
func (c *cache) Close()    { c.t.Close() }

// NewCache is a zero cache of rows rows over the whole context.
func (b *Model) NewCache(rows int) (engine.Cache, error) {
	ci := b.Info.Cache
	t := tfmodel.Alloc(b.dtype, int64(rows), int64(ci.Layers), 2, int64(ci.Slots),
		int64(ci.KVHeads), int64(ci.HeadDim))
	return &cache{t: t, rows: rows, slots: ci.Slots}, nil
}

// CopyRow copies row s of src into row d of dst; a prefill's cache has fewer
// slots than a batch's and fills the first ones.
func (b *Model) CopyRow(dst engine.Cache, d int, src engine.Cache, s int) error {
	dc, sc := dst.(*cache), src.(*cache)
	if sc.slots > dc.slots || d >= dc.rows || s >= sc.rows {
		return fmt.Errorf("cache row copy out of range (%d of %d slots, row %d of %d, row %d of %d)",
			sc.slots, dc.slots, s, sc.rows, d, dc.rows)
	}
	ci := b.Info.Cache
	block := ci.KVHeads * ci.HeadDim * b.elem // one slot
	db, sb := dc.t.Bytes(), sc.t.Bytes()
	for lc := 0; lc < ci.Layers*2; lc++ {
		do := ((d*ci.Layers*2 + lc) * dc.slots) * block
		so := ((s*ci.Layers*2 + lc) * sc.slots) * block
		copy(db[do:do+sc.slots*block], sb[so:so+sc.slots*block])
	}
	return nil
}

// rowFeeds are the per-row sampling inputs of prefill and decode_step.
func rowFeeds(n int, get func(i int) (engine.Sampling, int32)) map[string]*tfmodel.Tensor {
	seed, index, topK := make([]int32, n), make([]int32, n), make([]int32, n)
	temp, topP := make([]float32, n), make([]float32, n)
	for i := 0; i < n; i++ {
		s, idx := get(i)
		seed[i], index[i], topK[i], temp[i], topP[i] = s.Seed, idx, s.TopK, s.Temperature, s.TopP
	}
	return map[string]*tfmodel.Tensor{
		"seed": mustInt32(seed, n), "index": mustInt32(index, n), "top_k": mustInt32(topK, n),
		"temperature": mustFloat32(temp, n), "top_p": mustFloat32(topP, n),
	}
}

func mustInt32(v []int32, dims ...int) *tfmodel.Tensor {
	t, err := tfmodel.NewInt32(v, int64s(dims)...)
	if err != nil {
		panic(err) // The shapes here are built to fit.
	}
	return t
}

func mustFloat32(v []float32, dims ...int) *tfmodel.Tensor {
	t, err := tfmodel.NewFloat32(v, int64s(dims)...)
	if err != nil {
		panic(err)
	}
	return t
}

func int64s(v []int) []int64 {
	out := make([]int64, len(v))
	for i, x := range v {
		out[i] = int64(x)
	}
	return out
}

func closeAll(ts map[string]*tfmodel.Tensor) {
	for _, t := range ts {
		t.Close()
	}
}

var sampled = []string{"token", "logprob", "top_tokens", "top_logprobs"}

// samples reads the first n rows of the sampled outputs and closes them.
func samples(out []*tfmodel.Tensor, n int) []engine.Sample {
	defer func() {
		for _, t := range out {
			t.Close()
		}
	}()
	tok, lp, topT, topL := out[0].Int32s(), out[1].Float32s(), out[2].Int32s(), out[3].Float32s()
	k := int(out[2].Shape()[1])
	res := make([]engine.Sample, n)
	for i := range res {
		res[i].Token, res[i].Logprob = tok[i], lp[i]
		res[i].Top = make([]engine.TokenLogprob, k)
		for j := 0; j < k; j++ {
			res[i].Top[j] = engine.TokenLogprob{Token: topT[i*k+j], Logprob: topL[i*k+j]}
		}
	}
	return res
}

// batchSize is the smallest export batch bucket >= n (n when none is).
func (b *Model) batchSize(n int) int {
	return export.Bucket(n, b.batchSizes)
}

// Prefill runs the prompts (right-padded to their prompt bucket, the batch
// padded to a batch bucket with one-token rows).
func (b *Model) Prefill(rows []engine.PrefillRow) ([]engine.Sample, engine.Cache, error) {
	longest := 1
	for _, r := range rows {
		if len(r.Prompt) > longest {
			longest = len(r.Prompt)
		}
	}
	width := b.Info.PromptWidth(longest)
	if width > b.Info.MaxLen {
		width = longest
	}
	n := b.batchSize(len(rows))
	flat, lengths := make([]int32, n*width), make([]int32, n)
	for i := range lengths {
		lengths[i] = 1
		if i < len(rows) {
			copy(flat[i*width:], rows[i].Prompt)
			lengths[i] = int32(len(rows[i].Prompt))
		}
	}
	feeds := rowFeeds(n, func(i int) (engine.Sampling, int32) {
		if i < len(rows) {
			return rows[i].Sampling, rows[i].Index
		}
		return engine.Sampling{TopP: 1}, 0
	})
	defer closeAll(feeds)
	feeds["tokens"] = mustInt32(flat, n, width)
	feeds["lengths"] = mustInt32(lengths, n)
	out, err := b.m.Run(export.Prefill, feeds, append([]string{"cache"}, sampled...))
	if err != nil {
		return nil, nil, err
	}
	return samples(out[1:], len(rows)), &cache{t: out[0], rows: len(rows), slots: width}, nil
}

// Step runs decode_step over every row of the batch cache and writes each
// row's new keys and values into its slot (the row's position).
func (b *Model) Step(c engine.Cache, rows []engine.StepRow) ([]engine.Sample, error) {
	bc := c.(*cache)
	n := len(rows)
	tokens, positions, steps := make([]int32, n), make([]int32, n), make([]int32, n)
	for i, r := range rows {
		tokens[i], positions[i], steps[i] = r.Token, r.Position, r.Step
	}
	feeds := rowFeeds(n, func(i int) (engine.Sampling, int32) { return rows[i].Sampling, rows[i].Index })
	defer closeAll(feeds)
	feeds["tokens"], feeds["positions"], feeds["step"] = mustInt32(tokens, n), mustInt32(positions, n), mustInt32(steps, n)
	feeds["cache"] = bc.t
	out, err := b.m.Run(export.DecodeStep, feeds, append([]string{"kv"}, sampled...))
	delete(feeds, "cache") // The batch's own: kept, not closed.
	if err != nil {
		return nil, err
	}
	defer out[0].Close()
	ci := b.Info.Cache
	slot := ci.KVHeads * ci.HeadDim * b.elem
	kv, dst := out[0].Bytes(), bc.t.Bytes()
	for r := 0; r < n; r++ {
		for lc := 0; lc < ci.Layers*2; lc++ {
			src := (r*ci.Layers*2 + lc) * slot
			at := ((r*ci.Layers*2+lc)*bc.slots + int(positions[r])) * slot
			copy(dst[at:at+slot], kv[src:src+slot])
		}
	}
	return samples(out[1:], n), nil
}

// Score runs the score signature on sequences (padded to a prompt bucket).
func (b *Model) Score(seqs [][]int32) ([]engine.Scored, error) {
	longest := 1
	for _, s := range seqs {
		if len(s) > longest {
			longest = len(s)
		}
	}
	width := b.Info.PromptWidth(longest)
	if width > b.Info.MaxLen {
		width = longest
	}
	flat := make([]int32, len(seqs)*width)
	for i, s := range seqs {
		copy(flat[i*width:], s)
	}
	feeds := map[string]*tfmodel.Tensor{"tokens": mustInt32(flat, len(seqs), width)}
	defer closeAll(feeds)
	out, err := b.m.Run(export.Score, feeds, []string{"logprobs", "top_tokens", "top_logprobs"})
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, t := range out {
			t.Close()
		}
	}()
	lp, topT, topL := out[0].Float32s(), out[1].Int32s(), out[2].Float32s()
	k := int(out[1].Shape()[2])
	res := make([]engine.Scored, len(seqs))
	for i, s := range seqs {
		res[i].Logprobs = append([]float32(nil), lp[i*width:i*width+len(s)]...)
		res[i].Top = make([][]engine.TokenLogprob, len(s))
		for t := range s {
			top := make([]engine.TokenLogprob, k)
			for j := range top {
				o := (i*width+t)*k + j
				top[j] = engine.TokenLogprob{Token: topT[o], Logprob: topL[o]}
			}
			res[i].Top[t] = top
		}
	}
	return res, nil
}

// Tokenize turns texts into token ids with the export's SentencePiece model.
func (b *Model) Tokenize(texts []string) ([][]int32, error) {
	if len(texts) == 0 {
		return nil, nil
	}
	feeds := map[string]*tfmodel.Tensor{"text": tfmodel.NewStrings(texts)}
	defer closeAll(feeds)
	out, err := b.m.Run(export.Tokenize, feeds, []string{"tokens", "lengths"})
	if err != nil {
		return nil, err
	}
	defer out[0].Close()
	defer out[1].Close()
	flat, lengths := out[0].Int32s(), out[1].Int32s()
	width := int(out[0].Shape()[1])
	res := make([][]int32, len(texts))
	for i := range res {
		res[i] = append([]int32{}, flat[i*width:i*width+int(lengths[i])]...)
	}
	return res, nil
}

// Detokenize turns rows of token ids into text.
func (b *Model) Detokenize(rows [][]int32) ([]string, error) {
	if len(rows) == 0 {
		return nil, nil
	}
	width := 1
	for _, r := range rows {
		if len(r) > width {
			width = len(r)
		}
	}
	flat, lengths := make([]int32, len(rows)*width), make([]int32, len(rows))
	for i, r := range rows {
		copy(flat[i*width:], r)
		lengths[i] = int32(len(r))
	}
	feeds := map[string]*tfmodel.Tensor{"tokens": mustInt32(flat, len(rows), width),
		"lengths": mustInt32(lengths, len(rows))}
	defer closeAll(feeds)
	out, err := b.m.Run(export.Detokenize, feeds, []string{"text"})
	if err != nil {
		return nil, err
	}
	defer out[0].Close()
	return out[0].Strings(), nil
}

// Warmup compiles decode_step for each batch size and prefill for each batch
// bucket at the smallest prompt bucket (each new shape compiles once).
func (b *Model) Warmup(batchSizes []int) error {
	sizes := append([]int(nil), batchSizes...)
	sort.Ints(sizes)
	for _, n := range sizes {
		c, err := b.NewCache(n)
		if err != nil {
			return err
		}
		rows := make([]engine.StepRow, n)
		for i := range rows {
			rows[i].Position = int32(b.Info.Cache.Slots - 1)
		}
		_, err = b.Step(c, rows)
		c.Close()
		if err != nil {
			return err
		}
	}
	for _, n := range b.batchSizes {
		rows := make([]engine.PrefillRow, n)
		for i := range rows {
			rows[i].Prompt = []int32{0}
		}
		_, c, err := b.Prefill(rows)
		if err != nil {
			return err
		}
		c.Close()
	}
	return nil
}
