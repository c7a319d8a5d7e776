package engine

import (
	"time"
)

// The loop's turn: drop, admit, step. Everything here runs on the loop
// goroutine; only e.waiting is shared (under e.mu).

// dropStopped ends the choices whose request was cancelled or that were
// asked to stop, and drops cancelled requests that still wait.
func (e *Engine) dropStopped() {
	for i, s := range e.rows {
		if s == nil {
			continue
		}
		if err := s.req.ctx.Err(); err != nil {
			e.free(i)
			e.finish(s, "", err)
		} else if s.req.stopped[s.choice].Load() {
			e.free(i)
			e.finish(s, "stop", nil)
		}
	}
	e.mu.Lock()
	kept := e.waiting[:0]
	var gone []*Request
	for _, r := range e.waiting {
		if r.ctx.Err() != nil {
			gone = append(gone, r)
		} else {
			kept = append(kept, r)
		}
	}
	e.waiting = kept
	e.queued.Store(int64(len(kept)))
	e.mu.Unlock()
	for _, r := range gone {
		r.events <- Event{Err: r.ctx.Err()}
		close(r.events)
	}
}

// admit moves waiting requests (in order) into free rows, with one prefill
// for all of them.
func (e *Engine) admit() {
	free := e.cfg.MaxBatch - int(e.active.Load())
	e.mu.Lock()
	var take []*Request
	for len(e.waiting) > 0 && e.waiting[0].N <= free {
		take = append(take, e.waiting[0])
		free -= e.waiting[0].N
		e.waiting = e.waiting[1:]
	}
	e.queued.Store(int64(len(e.waiting)))
	e.mu.Unlock()
	if len(take) == 0 {
		return
	}
	var rows []PrefillRow
	var seqs []*seq
	for _, r := range take {
		for c := 0; c < r.N; c++ {
			rows = append(rows, PrefillRow{Prompt: r.Prompt, Sampling: r.Sampling, Index: int32(c)})
			seqs = append(seqs, &seq{req: r, choice: c})
		}
	}
	samples, pc, err := e.b.Prefill(rows)
	if err == nil {
		err = e.place(seqs, pc)
		pc.Close()
	}
	if err != nil {
		for _, s := range seqs {
			e.free(e.rowOf(s))
			e.finish(s, "", err)
		}
		return
	}
	e.deliver(seqs, samples)
}

// place puts prefilled rows into free rows of the batch cache, growing it
// to the next batch size when they do not fit.
func (e *Engine) place(seqs []*seq, pc Cache) error {
	need := int(e.active.Load()) + len(seqs)
	if e.cache == nil || need > e.cache.Rows() {
		if err := e.resize(need); err != nil {
			return err
		}
	}
	next := 0
	for i := range e.rows {
		if e.rows[i] != nil {
			continue
		}
		if err := e.b.CopyRow(e.cache, i, pc, next); err != nil {
			return err
		}
		e.rows[i] = seqs[next]
		e.active.Add(1)
		next++
		if next == len(seqs) {
			break
		}
	}
	return nil
}

// resize makes a cache of the smallest batch size >= need, holding the
// active rows first (in order).
func (e *Engine) resize(need int) error {
	size := e.cfg.BatchSizes[len(e.cfg.BatchSizes)-1]
	for _, s := range e.cfg.BatchSizes {
		if s >= need {
			size = s
			break
		}
	}
	c, err := e.b.NewCache(size)
	if err != nil {
		return err
	}
	rows := make([]*seq, size)
	n := 0
	for i, s := range e.rows {
		if s == nil {
			continue
		}
		if err := e.b.CopyRow(c, n, e.cache, i); err != nil {
			c.Close()
			return err
		}
		rows[n] = s
		n++
	}
	if e.cache != nil {
		e.cache.Close()
	}
	e.cache, e.rows = c, rows
	return nil
}

// step runs one decode step over the batch.
func (e *Engine) step() {
	rows := make([]StepRow, len(e.rows))
	var live []*seq
	for i, s := range e.rows {
		if s == nil {
			// An idle row writes the last slot, which a row always writes
			// itself before it reads it.
			rows[i] = StepRow{Position: int32(e.cfg.Slots - 1)}
			continue
		}
		n := int32(len(s.tokens))
		rows[i] = StepRow{Token: s.last.Token, Position: int32(len(s.req.Prompt)) + n - 1,
			Step: n, Sampling: s.req.Sampling, Index: int32(s.choice)}
		live = append(live, s)
	}
	t0 := time.Now()
	samples, err := e.b.Step(e.cache, rows)
	if e.cfg.Observe != nil {
		e.cfg.Observe(len(live), len(rows), time.Since(t0))
	}
	if err != nil {
		for i, s := range e.rows {
			if s != nil {
				e.free(i)
				e.finish(s, "", err)
			}
		}
		e.release() // The cache may be half-written: start a new one.
		return
	}
	var got []Sample
	for i, s := range e.rows {
		if s != nil {
			got = append(got, samples[i])
		}
	}
	e.deliver(live, got)
	e.shrink()
}

// deliver records each row's new sample, sends the token events (with the
// texts of one batched detokenize), then ends finished rows.
func (e *Engine) deliver(seqs []*seq, samples []Sample) {
	var grew []*seq
	var done []*seq
	var why []string
	for i, s := range seqs {
		x := samples[i]
		if e.isStop(x.Token) {
			done, why = append(done, s), append(why, "stop")
			continue
		}
		s.tokens = append(s.tokens, x.Token)
		s.last = x
		grew = append(grew, s)
		if len(s.tokens) >= s.req.MaxTokens || len(s.req.Prompt)+len(s.tokens) >= e.cfg.Slots {
			done, why = append(done, s), append(why, "length")
		}
	}
	texts := e.texts(grew)
	for i, s := range grew {
		s.req.events <- Event{Choice: s.choice, Sample: s.last, Text: texts[i]}
	}
	for i, s := range done {
		e.free(e.rowOf(s))
		e.finish(s, why[i], nil)
	}
}

func (e *Engine) texts(seqs []*seq) []string {
	texts := make([]string, len(seqs))
	if e.cfg.Detokenize == nil || len(seqs) == 0 {
		return texts
	}
	rows := make([][]int32, len(seqs))
	for i, s := range seqs {
		rows[i] = s.tokens
	}
	if got, err := e.cfg.Detokenize(rows); err == nil && len(got) == len(seqs) {
		return got
	}
	return texts
}

func (e *Engine) isStop(t int32) bool {
	for _, s := range e.cfg.StopIDs {
		if s == t {
			return true
		}
	}
	return false
}

func (e *Engine) rowOf(s *seq) int {
	for i, r := range e.rows {
		if r == s {
			return i
		}
	}
	return -1
}

func (e *Engine) free(i int) {
	if i >= 0 && e.rows[i] != nil {
		e.rows[i] = nil
		e.active.Add(-1)
	}
}

// finish ends a choice; the request's events close with its last choice.
func (e *Engine) finish(s *seq, reason string, err error) {
	r := s.req
	if r.open == 0 {
		return
	}
	if err != nil {
		r.events <- Event{Choice: s.choice, Err: err}
		r.open = 0
		// The request's other rows go too.
		for i, o := range e.rows {
			if o != nil && o.req == r {
				e.free(i)
			}
		}
		close(r.events)
		return
	}
	r.events <- Event{Choice: s.choice, Done: true, Finish: reason}
	r.open--
	if r.open == 0 {
		close(r.events)
	}
}

// shrink moves the rows into a smaller cache when they fit one and nobody
// waits (a smaller batch steps faster).
func (e *Engine) shrink() {
	n := int(e.active.Load())
	if e.cache == nil || n == 0 || e.QueueDepth() > 0 {
		if n == 0 {
			e.release()
		}
		return
	}
	for _, s := range e.cfg.BatchSizes {
		if s >= n {
			if s < e.cache.Rows() {
				if err := e.resize(n); err != nil {
					for i, r := range e.rows {
						if r != nil {
							e.free(i)
							e.finish(r, "", err)
						}
					}
					e.release()
				}
			}
			return
		}
	}
}
