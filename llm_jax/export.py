r"""Export a run as a TensorFlow SavedModel: ``python -m llm_jax.export``.

    python -m llm_jax.export --workdir=runs/tiny --out=runs/tiny/export/1 [--quantize=int8]

The whole generation loop (``decode.decode_tokens``: prefill plus KV-cache
steps in one ``lax.while_loop``) is converted with jax2tf's native
serialization (StableHLO inside an ``XlaCallModule`` op), lowered for cpu,
cuda and tpu together, without gradients. Batch and prompt width are
polymorphic; the output width W (``--max_new_tokens``) is static and the
number of tokens a request wants is a runtime scalar. Parameters are a flat
list of ``tf.Variable``s (constants would hit protobuf's 2 GB limit).

Signatures (README "Generation and export" documents them):

* ``serving_default``: ``tokens`` int32 [batch, prompt_len] (left-padded),
  ``lengths`` int32 [batch], scalars ``max_new_tokens`` int32,
  ``temperature`` float32, ``top_k`` int32, ``top_p`` float32, ``seed``
  int32 -> ``tokens`` int32 [batch, W], ``counts`` int32 [batch].
* ``generate_text``: ``text`` string [batch] and the same scalars ->
  ``text`` string [batch] (the continuations), ``tokens`` int32 [batch, W]
  and ``counts`` int32 [batch] as in ``serving_default``.
  SentencePiece runs inside the graph (tensorflow-text); the ``.model`` file
  is also in ``assets/tokenizer.model`` for clients that tokenize themselves.

Requests the model cannot answer fail with InvalidArgument (graph asserts):
a length outside ``1 .. min(prompt_len, max_len - 1)`` (the prompt must fit
the context with room for one new token), a token id outside the vocabulary,
or lengths and tokens that disagree on the batch.

``assets.extra/tf_serving_warmup_requests`` holds TF Serving warm-up requests
(PredictionLog TFRecords) for every (batch, prompt) bucket: each new shape
compiles once inside ``XlaCallModule``. ``assets.extra/llm_jax_export.json``
records the export (signatures, buckets, sizes, the int8 perplexity check).

The export is written to a temporary directory beside ``--out`` and renamed
into place: a failed export leaves nothing that looks complete.
"""

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

from absl import app, flags, logging
import numpy as np

from llm_jax import cli
from llm_jax.errors import UserError

PLATFORMS = ('cpu', 'cuda', 'tpu')
SCALARS = (('max_new_tokens', 'int32'), ('temperature', 'float32'),
           ('top_k', 'int32'), ('top_p', 'float32'), ('seed', 'int32'))
TEXT_SIGNATURE = 'generate_text'
WARMUP_FILE = 'tf_serving_warmup_requests'
INFO_FILE = 'llm_jax_export.json'

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defines the CLI's flags.

  Only when run as a program: importing this module as a library (tests,
  bench) must not claim flag names that other CLIs define too.
  """
  flags.DEFINE_string('workdir', None, 'The run directory to export.')
  flags.DEFINE_string('out', None, 'SavedModel directory to create, e.g. RUN/export/1 '
                      '(TF Serving wants a numbered version).')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).')
  flags.DEFINE_enum('quantize', 'none', ['none', 'int8'],
                    'int8: weight-only, per-channel scales.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Output width W: the most new tokens a '
                       'request can get (capped at the context).')
  flags.DEFINE_list('batch_buckets', ['1', '4', '8'], 'Batch sizes to warm up.')
  flags.DEFINE_list('prompt_buckets', [], 'Prompt widths to warm up and to pad text '
                    'prompts to (default: 16, 32, 64, ... below the context, and '
                    'the context).')
  flags.DEFINE_list('platforms', list(PLATFORMS), 'Lower for these.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.DEFINE_bool('text_signature', True, 'Add the generate_text signature '
                    '(SentencePiece ops from tensorflow-text in the graph; a server '
                    'must load them, see the README). --notext_signature: ids only.')
  flags.DEFINE_integer('eval_batches', 8, 'With --quantize=int8: validation batches '
                       'for the perplexity check (0 skips it).')


# ---- Parameters: flat leaves, optionally int8 with per-channel scales.


@dataclasses.dataclass(frozen=True)
class Leaf:
  """How one parameter is stored: float as is, or int8 + float32 scales."""
  name: str
  shape: tuple[int, ...]
  reduce_axes: tuple[int, ...] | None  # None: stored float32.


def _leaf_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _reduce_axes(name: str, ndim: int) -> tuple[int, ...] | None:
  """The axes a per-channel scale spans: a kernel's inputs, a table's D."""
  if ndim < 2:
    return None  # Norm scales and biases: tiny, kept float32.
  parts = name.split('/')
  if parts[-1] == 'table':
    return (ndim - 1,)  # One scale per row: a token's (or position's) vector.
  # The attention output kernel contracts two axes (heads, head_dim).
  return (0, 1) if parts[-2:] == ['o', 'kernel'] else (0,)


def quantize_int8(w: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Symmetric int8: ``w ~= q * scale``, one scale per output channel."""
  amax = np.max(np.abs(w), axis=axes, keepdims=True)
  scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
  q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return q, scale


def flatten_params(params, quantize: str) -> tuple[list[Leaf], list[np.ndarray], Any]:
  """(leaf specs, the flat arrays to store, the treedef to rebuild params)."""
  import jax  # pylint: disable=g-import-not-at-top
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, arrays = [], []
  for path, value in with_path:
    value = np.asarray(value, np.float32)
    name = _leaf_name(path)
    axes = _reduce_axes(name, value.ndim) if quantize == 'int8' else None
    specs.append(Leaf(name, value.shape, axes))
    arrays.extend(quantize_int8(value, axes) if axes is not None else [value])
  return specs, arrays, treedef


def unflatten_params(specs: Sequence[Leaf], arrays, treedef):
  """Rebuilds float32 params (dequantising int8 leaves; works on jax arrays)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  it = iter(arrays)
  leaves = []
  for spec in specs:
    if spec.reduce_axes is None:
      leaves.append(next(it))
    else:
      q, scale = next(it), next(it)
      leaves.append(q.astype(jnp.float32) * scale)
  return treedef.unflatten(leaves)


# ---- Buckets and warm-up requests.


def default_prompt_buckets(max_len: int) -> list[int]:
  """16, 32, 64, ... below the context, then the context itself."""
  from llm_jax import decode  # pylint: disable=g-import-not-at-top
  return decode.prompt_buckets(max_len)


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predict_log_record(signature: str, inputs: dict[str, np.ndarray]) -> bytes:
  """A serialized ``tensorflow.serving.PredictionLog`` holding one PredictRequest.

  Hand-encoded (tensorflow_serving's protos are not a dependency):
  PredictionLog.predict_log = 6 -> PredictLog.request = 1 ->
  PredictRequest{model_spec = 1 {signature_name = 3}, inputs = 2 (map entries
  {key = 1, value = 2: TensorProto})}. tests/test_export.py checks the bytes
  parse with the official protos when they are installed.
  """
  from llm_jax.tfhost import tf  # pylint: disable=g-import-not-at-top
  spec = _field(3, signature.encode())
  request = _field(1, spec)
  for key in sorted(inputs):
    tensor = tf.make_tensor_proto(inputs[key]).SerializeToString()
    request += _field(2, _field(1, key.encode()) + _field(2, tensor))
  return _field(6, _field(1, request))


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


# ---- The TF module.


def _build_module(run, specs, arrays, treedef, *, width: int, stop_ids,
                  platforms: Sequence[str], prompt_buckets: Sequence[int],
                  tokenizer_path: str | None):
  """A tf.Module with the parameter variables and both signature functions."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from llm_jax import decode  # pylint: disable=g-import-not-at-top
  from llm_jax.tfhost import tf  # pylint: disable=g-import-not-at-top

  cfg = run.model_cfg
  pad_id = decode.pad_id_of(run)

  def jax_fn(flat, tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed):
    params = unflatten_params(specs, flat, treedef)
    return decode.decode_tokens(params, tokens, lengths, max_new_tokens, temperature,
                                top_k, top_p, seed, graphdef=run.graphdef, width=width,
                                stop_ids=stop_ids, pad_id=pad_id)

  tf_fn = jax2tf.convert(
      jax_fn, with_gradient=False, native_serialization_platforms=tuple(platforms),
      polymorphic_shapes=[None, '(b, p)', '(b,)', '()', '()', '()', '()', '()'])

  module = tf.Module()
  module.params = [tf.Variable(a, trainable=False, name=f'param_{i}')
                   for i, a in enumerate(arrays)]
  scalar_specs = [tf.TensorSpec([], getattr(tf, dt), name=n) for n, dt in SCALARS]

  def checked_generate(tokens, lengths, *scalars):
    """The asserts a request must pass, then the converted decode loop."""
    width_p = tf.shape(tokens)[1]
    checks = [
        tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0], message=(
            'lengths must have one entry per row of tokens')),
        tf.debugging.assert_greater_equal(lengths, 1, message=(
            'every prompt needs at least one token (lengths >= 1)')),
        tf.debugging.assert_less_equal(lengths, width_p, message=(
            'a length exceeds the prompt width (tokens.shape[1])')),
        tf.debugging.assert_less(lengths, cfg.max_len, message=(
            f'prompt longer than the model context: lengths must be below '
            f'max_len={cfg.max_len} (room for one new token)')),
        tf.debugging.assert_greater_equal(tokens, 0, message='token id below 0'),
        tf.debugging.assert_less(tokens, cfg.vocab_size, message=(
            f'token id outside the vocabulary [0, {cfg.vocab_size})')),
    ]
    with tf.control_dependencies(checks):
      tokens = tf.identity(tokens)
    out, counts = tf_fn(list(module.params), tokens, lengths, *scalars)
    out.set_shape([None, width])
    return out, counts

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, None], tf.int32, name='tokens'),
                                tf.TensorSpec([None], tf.int32, name='lengths'),
                                *scalar_specs])
  def serve(tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed):
    out, counts = checked_generate(tokens, lengths, max_new_tokens, temperature,
                                   top_k, top_p, seed)
    return {'tokens': out, 'counts': counts}

  module.serve = serve
  signatures = {'serving_default': serve}
  if tokenizer_path is not None:
    module.tokenizer_model = tf.saved_model.Asset(tokenizer_path)
    module.sp, module.text = _text_function(run, tokenizer_path, checked_generate,
                                            scalar_specs, prompt_buckets, pad_id)
    signatures[TEXT_SIGNATURE] = module.text
  return module, signatures


def _text_function(run, tokenizer_path, checked_generate, scalar_specs,
                   prompt_buckets, pad_id):
  """(tokenizer, the strings-in strings-out signature function)."""
  import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top
  from llm_jax.tfhost import tf  # pylint: disable=g-import-not-at-top

  with open(tokenizer_path, 'rb') as f:
    sp = tf_text.SentencepieceTokenizer(model=f.read(), out_type=tf.int32)
  tok = run.tokenizer
  sp_vocab, unk, eos = tok.vocab_size, tok.unk_id, tok.eos_id
  buckets = tf.constant(sorted(prompt_buckets), tf.int32)

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None], tf.string, name='text'),
                                *scalar_specs])
  def text(text, max_new_tokens, temperature, top_k, top_p, seed):
    ids = sp.tokenize(text)
    lengths = tf.cast(ids.row_lengths(), tf.int32)
    longest = tf.maximum(tf.reduce_max(tf.concat([lengths, [0]], 0)), 1)
    dense = ids.to_tensor(default_value=pad_id)
    # All-empty prompts give zero columns: make room for the end-of-text.
    dense = tf.pad(dense, [[0, 0], [0, longest - tf.shape(dense)[1]]],
                   constant_values=pad_id)
    # An empty prompt starts from end-of-text, a document boundary (as
    # decode.generate does on the host).
    empty = tf.equal(lengths, 0)
    first_col = tf.equal(tf.range(longest), 0)
    dense = tf.where(empty[:, None] & first_col[None, :], eos, dense)
    lengths = tf.maximum(lengths, 1)
    # Left padding: reverse each row's tokens in place, then the whole row.
    dense = tf.reverse(tf.reverse_sequence(dense, lengths, seq_axis=1, batch_axis=0),
                       axis=[1])
    # Pad to the prompt bucket (as llm_jax.generate does), so text requests
    # reuse the compiled shapes the warm-up made.
    fits = tf.boolean_mask(buckets, buckets >= longest)
    width_p = tf.cond(tf.size(fits) > 0, lambda: fits[0], lambda: longest)
    dense = tf.pad(dense, [[0, 0], [width_p - longest, 0]], constant_values=pad_id)
    out, counts = checked_generate(dense, lengths, max_new_tokens, temperature,
                                   top_k, top_p, seed)
    new = tf.RaggedTensor.from_tensor(out, lengths=counts)
    # Ids the model knows but the tokenizer does not (a padded or extended
    # vocabulary) detokenize as unknown.
    known = (new.flat_values >= 0) & (new.flat_values < sp_vocab)
    new = new.with_flat_values(tf.where(known, new.flat_values, unk))
    return {'text': sp.detokenize(new), 'tokens': out, 'counts': counts}

  # The tokenizer holds a TF resource: the module must track it.
  return sp, text


# ---- Export.


def export(workdir: str, out: str, *, step: int | None = None, quantize: str = 'none',
           max_new_tokens: int = 128, batch_buckets: Sequence[int] = (1, 4, 8),
           prompt_buckets: Sequence[int] | None = None,
           platforms: Sequence[str] = PLATFORMS, overwrite: bool = False,
           eval_batches: int = 8, text_signature: bool = True,
           stop_ids: Sequence[int] | None = None, log=print) -> dict:
  """Writes the SavedModel of a run to ``out`` (whole or not at all).

  Args (besides the CLI's flags):
    stop_ids: tokens that end a row (default: the tokenizer's end-of-text;
      ``()`` makes every row run to ``max_new_tokens``, as the benchmark does).

  Returns:
    The export info (also in ``assets.extra/llm_jax_export.json``).

  Raises:
    UserError: no checkpoint, ``out`` exists, or a bad option.
  """
  from llm_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from llm_jax.tfhost import tf  # pylint: disable=g-import-not-at-top

  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise UserError(f'--out={out} already exists; pass --overwrite to replace it or '
                    'choose another directory (e.g. the next version number).')
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad:
    raise UserError(f'--platforms has {bad[0]!r}; choose from {", ".join(PLATFORMS)}.')
  run = workdir_lib.load(workdir, step)
  cfg = run.model_cfg
  width = max(1, min(max_new_tokens, cfg.max_len - 1))
  prompt_buckets = sorted(prompt_buckets or default_prompt_buckets(cfg.max_len))
  t0 = time.time()
  specs, arrays, treedef = flatten_params(run.params, quantize)
  tokenizer_path = (os.path.join(run.workdir, workdir_lib.TOKENIZER_FILE)
                    if run.tokenizer is not None and text_signature else None)
  from llm_jax import decode  # pylint: disable=g-import-not-at-top
  stop_ids = tuple(decode.stop_ids(run) if stop_ids is None else stop_ids)
  module, signatures = _build_module(
      run, specs, arrays, treedef, width=width, platforms=platforms, stop_ids=stop_ids,
      prompt_buckets=prompt_buckets, tokenizer_path=tokenizer_path)

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    tf.saved_model.save(module, tmp, signatures=signatures)
    info = {
        'workdir': run.workdir, 'step': run.step, 'quantize': quantize,
        'max_new_tokens': width, 'max_len': cfg.max_len,
        'vocab_size': cfg.vocab_size, 'platforms': list(platforms),
        'stop_ids': list(stop_ids), 'batch_buckets': list(batch_buckets),
        'prompt_buckets': prompt_buckets,
        'signatures': ['serving_default'] + ([TEXT_SIGNATURE] if tokenizer_path else []),
        'param_bytes': int(sum(a.nbytes for a in arrays)),
        'param_bytes_float32': int(sum(4 * int(np.prod(s.shape)) for s in specs)),
    }
    extra = os.path.join(tmp, 'assets.extra')
    os.makedirs(extra, exist_ok=True)
    fill = run.tokenizer.unk_id if run.tokenizer is not None else 0
    with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as w:
      for sig, inputs in warmup_requests(batch_buckets, prompt_buckets, cfg.max_len, fill):
        if sig == TEXT_SIGNATURE and tokenizer_path is None:
          continue
        w.write(predict_log_record(sig, inputs))
    if quantize == 'int8' and eval_batches > 0:
      info['perplexity'] = int8_perplexity(run, specs, arrays, treedef, eval_batches)
    info['saved_model_bytes'] = dir_bytes(tmp)
    info['export_seconds'] = round(time.time() - t0, 1)
    with open(os.path.join(extra, INFO_FILE), 'w') as f:
      json.dump(info, f, indent=2)
    _swap_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f'Exported step {run.step} of {run.workdir} to {out} '
      f'({info["saved_model_bytes"] / 2**20:.2f} MiB, {quantize}) in '
      f'{info["export_seconds"]:.0f}s.')
  if 'perplexity' in info:
    p = info['perplexity']
    log(f'int8: parameters {info["param_bytes"] / 2**20:.2f} MiB against '
        f'{info["param_bytes_float32"] / 2**20:.2f} MiB float32; validation '
        f'perplexity {p["float32"]:.3f} -> {p["int8"]:.3f} '
        f'({100 * (p["int8"] / p["float32"] - 1):+.3f}%).')
  return info


def _swap_into_place(tmp: str, out: str) -> None:
  """Renames ``tmp`` to ``out``; an old ``out`` is removed only afterwards."""
  old = None
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.old-',
                           dir=os.path.dirname(out))
    os.rename(out, os.path.join(old, 'x'))
  os.rename(tmp, out)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def dir_bytes(path: str) -> int:
  """Total size of the files under ``path``."""
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)


def int8_perplexity(run, specs, arrays, treedef, num_batches: int) -> dict:
  """Validation perplexity with float32 and with the dequantised int8 weights."""
  import jax  # pylint: disable=g-import-not-at-top
  from llm_jax import trainer  # pylint: disable=g-import-not-at-top
  from llm_jax.data import pipeline, shards  # pylint: disable=g-import-not-at-top
  config = run.config
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'],
                                  config.data.seq_len)
  batches = list(pipeline.eval_batches(
      windows, global_batch=config.train.batch_size, num_batches=num_batches,
      process_index=0, process_count=1))
  dequant = jax.tree.map(np.asarray, unflatten_params(specs, arrays, treedef))
  result = {}
  for name, params in (('float32', run.params), ('int8', dequant)):
    total = count = 0.0
    for b in batches:
      o = trainer.eval_step(params, {k: jax.numpy.asarray(v) for k, v in b.items()},
                            graphdef=run.graphdef)
      total += float(o['loss_sum'])
      count += float(o['count'])
    result[name] = float(np.exp(total / count))
  result['tokens'] = int(count)
  return result


# ---- CLI.


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise UserError(f'--{name}={",".join(values)} must be comma-separated '
                    'positive integers.') from None
  if any(v <= 0 for v in out):
    raise UserError(f'--{name} values must be positive.')
  return out


def main(argv) -> None:
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    cli.fail(f'Unexpected arguments: {" ".join(argv[1:])}. Flags look like --out=DIR.')
  if not FLAGS.workdir or not FLAGS.out:
    cli.fail('Pass both --workdir=RUN (a training run) and --out=DIR (the SavedModel '
          'to create).')
  try:
    if FLAGS.max_new_tokens < 1:
      raise UserError(f'--max_new_tokens={FLAGS.max_new_tokens} must be at least 1.')
    export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, quantize=FLAGS.quantize,
           max_new_tokens=FLAGS.max_new_tokens,
           batch_buckets=_ints('batch_buckets', FLAGS.batch_buckets),
           prompt_buckets=_ints('prompt_buckets', FLAGS.prompt_buckets) or None,
           platforms=FLAGS.platforms, overwrite=FLAGS.overwrite,
           text_signature=FLAGS.text_signature,
           eval_batches=FLAGS.eval_batches)
  except UserError as e:
    cli.fail(str(e))




if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
