"""TF Serving warm-up records: one cheap request per (batch, prompt) bucket.

TF Serving replays ``assets.extra/tf_serving_warmup_requests`` (PredictionLog
TFRecords) when it loads a model, so each shape compiles before the first
user request. The records are the official protos of ``tensorflow-serving-api``.
"""

import itertools

import numpy as np

from llm_jax.core.tfhost import tf  # First: it hides accelerators from TF.
from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-bad-import-order

TEXT_SIGNATURE = 'generate_text'
WARMUP_FILE = 'tf_serving_warmup_requests'


def predict_log_record(signature: str, inputs: dict[str, np.ndarray]) -> bytes:
  """A serialized ``tensorflow.serving.PredictionLog`` holding one PredictRequest."""
  log = prediction_log_pb2.PredictionLog()
  request = log.predict_log.request
  request.model_spec.signature_name = signature
  for key in sorted(inputs):
    request.inputs[key].CopyFrom(tf.make_tensor_proto(inputs[key]))
  return log.SerializeToString()


def write(path: str, records) -> None:
  """Writes ``(signature, inputs)`` requests as PredictionLog TFRecords."""
  with tf.io.TFRecordWriter(path) as writer:
    for signature, inputs in records:
      writer.write(predict_log_record(signature, inputs))


def warmup_requests(batch_buckets, prompt_buckets, max_len: int, fill_id: int):
  """(signature, inputs) of one cheap request per shape bucket."""
  scalars = dict(max_new_tokens=np.int32(1), temperature=np.float32(0),
                 top_k=np.int32(0), top_p=np.float32(1), seed=np.int32(0))
  for b, p in itertools.product(batch_buckets, prompt_buckets):
    tokens = np.full((b, p), fill_id, np.int32)
    lengths = np.full((b,), min(p, max_len - 1), np.int32)
    yield 'serving_default', dict(tokens=tokens, lengths=lengths, **scalars)
  for b in batch_buckets:
    yield TEXT_SIGNATURE, dict(text=np.array([b'def main('] * b, dtype=object),
                               **scalars)
