"""Data: sources -> cleaning -> SentencePiece -> token shards -> prefetched batches."""
