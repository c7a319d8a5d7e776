"""Data: sources -> cleaning -> SentencePiece -> token shards -> tf.data batches."""
