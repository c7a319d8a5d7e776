package main

import (
	"reflect"
	"testing"
)

func TestBatchSizesAreTheBucketsThenDoublings(t *testing.T) {
	for _, c := range []struct {
		buckets  []int
		maxBatch int
		want     []int
	}{
		{[]int{1, 4, 8}, 8, []int{1, 4, 8}},
		{[]int{1, 3}, 16, []int{1, 3, 4, 8, 16}},
		{[]int{1, 4, 8}, 2, []int{1, 2}},
		{nil, 5, []int{1, 2, 4, 5}},
	} {
		if got := batchSizes(c.buckets, c.maxBatch); !reflect.DeepEqual(got, c.want) {
			t.Errorf("batchSizes(%v, %d) = %v, want %v", c.buckets, c.maxBatch, got, c.want)
		}
	}
}
