package engine

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"
)

const (
	vocab = 50
	stop  = 3
	slots = 40
)

// next is the fake model: the token after `last` at `position`. It depends on
// the seed and choice index as the real sampling does.
func next(last, position int32, s Sampling, index int32) int32 {
	return (last*31 + position*7 + s.Seed*3 + index*11) % vocab
}

// reference generates one choice alone, as a model without batching would.
func reference(prompt []int32, maxTokens int, s Sampling, index int32) ([]int32, string) {
	var out []int32
	last, pos := prompt[len(prompt)-1], int32(len(prompt)-1)
	for {
		t := next(last, pos, s, index)
		if t == stop {
			return out, "stop"
		}
		out = append(out, t)
		if len(out) >= maxTokens || len(prompt)+len(out) >= slots {
			return out, "length"
		}
		last, pos = t, pos+1
	}
}

// fakeCache holds each row's tokens by slot; it checks the engine feeds
// every row the history it built.
type fakeCache struct{ rows [][]int32 }

func (c *fakeCache) Rows() int { return len(c.rows) }
func (c *fakeCache) Close()    { c.rows = nil }

type fake struct {
	gate    chan struct{} // if set, each step waits for a value
	mu      sync.Mutex
	batches []int // live rows of each step
	fail    error
}

func (f *fake) Prefill(rows []PrefillRow) ([]Sample, Cache, error) {
	c := &fakeCache{}
	var out []Sample
	for _, r := range rows {
		c.rows = append(c.rows, append([]int32(nil), r.Prompt...))
		t := next(r.Prompt[len(r.Prompt)-1], int32(len(r.Prompt)-1), r.Sampling, r.Index)
		out = append(out, Sample{TokenLogprob: TokenLogprob{t, -1}})
	}
	return out, c, nil
}

func (f *fake) NewCache(rows int) (Cache, error) {
	return &fakeCache{rows: make([][]int32, rows)}, nil
}

func (f *fake) CopyRow(dst Cache, d int, src Cache, s int) error {
	dst.(*fakeCache).rows[d] = append([]int32(nil), src.(*fakeCache).rows[s]...)
	return nil
}

func (f *fake) Step(c Cache, rows []StepRow) ([]Sample, error) {
	if f.gate != nil {
		<-f.gate
	}
	if f.fail != nil {
		return nil, f.fail
	}
	fc := c.(*fakeCache)
	out := make([]Sample, len(rows))
	live := 0
	for i, r := range rows {
		if r.Position == slots-1 && r.Token == 0 {
			continue // an idle row
		}
		live++
		if int(r.Position) != len(fc.rows[i]) {
			return nil, fmt.Errorf("row %d fed position %d with %d tokens cached", i, r.Position, len(fc.rows[i]))
		}
		fc.rows[i] = append(fc.rows[i], r.Token)
		out[i] = Sample{TokenLogprob: TokenLogprob{next(r.Token, r.Position, r.Sampling, r.Index), -1}}
	}
	f.mu.Lock()
	f.batches = append(f.batches, live)
	f.mu.Unlock()
	return out, nil
}

func newEngine(t *testing.T, f *fake, maxBatch, queue int) *Engine {
	e, err := New(f, Config{MaxBatch: maxBatch, BatchSizes: []int{1, 2}, QueueLimit: queue,
		Slots: slots, StopIDs: []int32{stop}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e
}

type choiceResult struct {
	tokens []int32
	finish string
}

func collect(r *Request) ([]choiceResult, error) {
	out := make([]choiceResult, r.N)
	for ev := range r.Events() {
		if ev.Err != nil {
			return out, ev.Err
		}
		if ev.Done {
			out[ev.Choice].finish = ev.Finish
		} else {
			out[ev.Choice].tokens = append(out[ev.Choice].tokens, ev.Sample.Token)
		}
	}
	return out, nil
}

func TestConcurrentRequestsGetTheTokensTheyWouldAlone(t *testing.T) {
	f := &fake{}
	e := newEngine(t, f, 4, 16)
	type job struct {
		prompt   []int32
		n, max   int
		sampling Sampling
	}
	jobs := []job{
		{[]int32{5, 6, 7}, 1, 12, Sampling{Seed: 1}},
		{[]int32{9}, 2, 20, Sampling{Seed: 2}},
		{[]int32{1, 2, 3, 4, 5, 6}, 1, 5, Sampling{Seed: 3}},
		{make([]int32, 35), 1, 30, Sampling{Seed: 4}}, // runs into the context
		{[]int32{8, 8}, 3, 9, Sampling{Seed: 5}},
		{[]int32{44}, 1, 25, Sampling{Seed: 6}},
	}
	jobs[3].prompt[34] = 7
	var wg sync.WaitGroup
	errs := make(chan error, len(jobs))
	for _, j := range jobs {
		j := j
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := e.Submit(context.Background(), j.prompt, j.n, j.max, j.sampling)
			if err != nil {
				errs <- err
				return
			}
			got, err := collect(r)
			if err != nil {
				errs <- err
				return
			}
			for c := 0; c < j.n; c++ {
				want, why := reference(j.prompt, j.max, j.sampling, int32(c))
				if !reflect.DeepEqual(got[c].tokens, want) || got[c].finish != why {
					errs <- fmt.Errorf("prompt %v choice %d: got %v %q, want %v %q",
						j.prompt, c, got[c].tokens, got[c].finish, want, why)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	most := 0
	for _, b := range f.batches {
		if b > 4 {
			t.Errorf("a step ran %d rows; MaxBatch is 4", b)
		}
		if b > most {
			most = b
		}
	}
	if most < 2 {
		t.Errorf("no step shared rows (largest %d)", most)
	}
	if e.ActiveRows() != 0 || e.QueueDepth() != 0 {
		t.Errorf("rows %d, queue %d after all finished", e.ActiveRows(), e.QueueDepth())
	}
}

func TestAFullQueueRefusesAndRecovers(t *testing.T) {
	f := &fake{gate: make(chan struct{})}
	e := newEngine(t, f, 1, 1)
	first, err := e.Submit(context.Background(), []int32{5}, 1, 30, Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return e.ActiveRows() == 1 })
	second, err := e.Submit(context.Background(), []int32{6}, 1, 30, Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(context.Background(), []int32{7}, 1, 30, Sampling{}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("third request: %v, want ErrQueueFull", err)
	}
	close(f.gate) // Steps run freely from now on.
	for _, r := range []*Request{first, second} {
		if _, err := collect(r); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.Submit(context.Background(), []int32{7}, 1, 3, Sampling{}); err != nil {
		t.Fatalf("after the queue drained: %v", err)
	}
}

func TestCancelFreesTheRowsAndStopChoiceEndsOne(t *testing.T) {
	f := &fake{gate: make(chan struct{}, 1000)}
	e := newEngine(t, f, 4, 4)
	ctx, cancel := context.WithCancel(context.Background())
	r, err := e.Submit(ctx, []int32{5}, 2, 30, Sampling{Seed: 9})
	if err != nil {
		t.Fatal(err)
	}
	ev := <-r.Events() // The first token came: the request is running.
	if ev.Err != nil || ev.Done {
		t.Fatalf("first event %+v", ev)
	}
	cancel()
	f.gate <- struct{}{}
	if _, err := collect(r); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled request ended with %v", err)
	}
	waitFor(t, func() bool { return e.ActiveRows() == 0 })

	r, err = e.Submit(context.Background(), []int32{5}, 2, 30, Sampling{Seed: 9})
	if err != nil {
		t.Fatal(err)
	}
	r.StopChoice(1)
	for i := 0; i < 40; i++ {
		f.gate <- struct{}{}
	}
	got, err := collect(r)
	if err != nil {
		t.Fatal(err)
	}
	want, why := reference([]int32{5}, 30, Sampling{Seed: 9}, 0)
	if !reflect.DeepEqual(got[0].tokens, want) || got[0].finish != why || got[1].finish != "stop" || len(got[1].tokens) > 2 {
		t.Errorf("got %+v", got)
	}
}

func TestCloseFinishesInFlightWorkAndRefusesNew(t *testing.T) {
	f := &fake{}
	e := newEngine(t, f, 2, 2)
	r, err := e.Submit(context.Background(), []int32{5}, 1, 30, Sampling{Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- e.Close(context.Background()) }()
	got, err := collect(r)
	want, _ := reference([]int32{5}, 30, Sampling{Seed: 1}, 0)
	if err != nil || !reflect.DeepEqual(got[0].tokens, want) {
		t.Errorf("in-flight request: %v %v", got, err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if _, err := e.Submit(context.Background(), []int32{5}, 1, 3, Sampling{}); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v, want ErrClosed", err)
	}
}

func TestAFailedStepEndsTheRequestsWithTheError(t *testing.T) {
	f := &fake{fail: errors.New("device lost")}
	e := newEngine(t, f, 2, 2)
	r, err := e.Submit(context.Background(), []int32{5}, 2, 30, Sampling{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := collect(r); err == nil || err.Error() != "device lost" {
		t.Errorf("got %v", err)
	}
	waitFor(t, func() bool { return e.ActiveRows() == 0 })
}

func TestSubmitRefusesWhatCannotRun(t *testing.T) {
	e := newEngine(t, &fake{}, 2, 2)
	for _, c := range []struct {
		prompt []int32
		n      int
	}{{nil, 1}, {make([]int32, slots), 1}, {[]int32{1}, 3}, {[]int32{1}, 0}} {
		if _, err := e.Submit(context.Background(), c.prompt, c.n, 4, Sampling{}); err == nil {
			t.Errorf("prompt of %d tokens, n %d: accepted", len(c.prompt), c.n)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting")
		}
		time.Sleep(time.Millisecond)
	}
}
