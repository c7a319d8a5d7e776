r"""The SavedModel export's library (the command is ``python -m llm_jax.export``).

    python -m llm_jax.export --workdir=runs/tiny --out=runs/tiny/export/1 [--quantize=int8|int4]

The whole generation loop (``decode.decode_tokens``: prefill plus KV-cache
steps in one ``lax.while_loop``) is converted with jax2tf's native
serialization (StableHLO inside an ``XlaCallModule`` op), lowered for cpu,
cuda and tpu together, without gradients. Batch and prompt width are
polymorphic; the output width W (``--max_new_tokens``) is static and the
number of tokens a request wants is a runtime scalar. Parameters are a flat
list of ``tf.Variable``s (constants would hit protobuf's 2 GB limit).

Signatures (docs/serving.md documents them):

* ``serving_default``: ``tokens`` int32 [batch, prompt_len] (left-padded),
  ``lengths`` int32 [batch], scalars ``max_new_tokens`` int32,
  ``temperature`` float32, ``top_k`` int32, ``top_p`` float32, ``seed``
  int32 -> ``tokens`` int32 [batch, W], ``counts`` int32 [batch].
* ``generate_text``: ``text`` string [batch] and the same scalars ->
  ``text`` string [batch] (the continuations), ``tokens`` int32 [batch, W]
  and ``counts`` int32 [batch] as in ``serving_default``.
  SentencePiece runs inside the graph (tensorflow-text); the ``.model`` file
  is also in ``assets/tokenizer.model`` for clients that tokenize themselves.
  A run with a Hugging Face tokenizer (byte-level BPE has no tensorflow-text
  op) has no ``generate_text``; its ``tokenizer.json`` and
  ``tokenizer_config.json`` are in ``assets/`` for the client.
* ``prefill``, ``decode_step``, ``score``: generation one step at a time with
  the KV cache in the caller's hands (``decode.prefill`` returns a prompt's
  cache, ``decode.decode_step`` reads the batch's and returns the new slot;
  ``decode.score``), so a server streams tokens and batches requests that
  started at different times; per-row sampling settings.
* ``tokenize`` / ``detokenize`` (with the text signature): SentencePiece
  alone, strings to padded ids and back.

A reward model (``objective='reward'``) exports a scorer instead:

* ``score`` (also ``serving_default``): ``tokens`` int32 [batch, len]
  (right-padded prompt plus response, as ``sft.template`` renders them, no
  end-of-text) and ``lengths`` int32 [batch] -> ``reward`` float32 [batch],
  the head read at each row's last token.
* ``score_text``: ``prompt`` and ``response`` string [batch] -> ``reward``
  float32 [batch]; the conversation is rendered and tokenized in the graph
  exactly as training rendered it.

A run with a task head (``model.head`` 'classification' or 'qa') exports
``classify`` / ``answer`` signatures instead (``deploy/task_export.py``).

Requests the model cannot answer fail with InvalidArgument (graph asserts):
a length outside ``1 .. min(prompt_len, max_len - 1)`` (the prompt must fit
the context with room for one new token), a token id outside the vocabulary,
or lengths and tokens that disagree on the batch.

``assets.extra/tf_serving_warmup_requests`` holds TF Serving warm-up requests
(PredictionLog TFRecords) for every (batch, prompt) bucket: each new shape
compiles once inside ``XlaCallModule``. ``assets.extra/llm_jax_export.json``
records the export (signatures, buckets, sizes; for a quantized export the
parameter bytes and validation perplexity of float32, int8 and int4 side by
side, ``formats``). A quantized export dequantizes its weights on its first
call, or on every call with ``--dequantize=every_call`` (``ServedParams``).

The export is written to a temporary directory beside ``--out`` and renamed
into place: a failed export leaves nothing that looks complete.
"""

import dataclasses
import os
import time
from collections.abc import Sequence

from flax import nnx
import jax
from jax.experimental import jax2tf
import numpy as np

from llm_jax.core import files
from llm_jax.core.errors import UserError
from llm_jax.core import tfhost
from llm_jax.core.tfhost import tf
from llm_jax.deploy import quantize as quantize_lib
from llm_jax.deploy.options import DEQUANTIZE, PLATFORMS
from llm_jax.deploy import task_export, warmup
from llm_jax.deploy.warmup import TEXT_SIGNATURE
from llm_jax.inference import decode
from llm_jax.model import transformer as model_lib
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import objectives

SCALARS = (('max_new_tokens', 'int32'), ('temperature', 'float32'),
           ('top_k', 'int32'), ('top_p', 'float32'), ('seed', 'int32'))
INFO_FILE = 'llm_jax_export.json'
# An export directory holds this file: only such a directory may be replaced.
EXPORT_MARKER = os.path.join('assets.extra', INFO_FILE)


def default_prompt_buckets(max_len: int) -> list[int]:
  """16, 32, 64, ... below the context, then the context itself."""
  return decode.prompt_buckets(max_len)


# ---- The TF module.


class ServedParams:
  """The parameter variables of an export and the float32 leaves its signatures run on.

  A float32 export stores the leaves the signatures run on. A quantized one
  stores int8/int4 leaves (``module.params``) and, beside them, float32
  variables that start empty (``module.float_params``, nothing on disk).
  The first call of any signature dequantises the stored leaves into them,
  empties the stored ones and sets ``module.float_params_ready``; every
  later call reads the copies. Dequantising on every call made a quantized
  ``decode_step`` 3.5x slower than float32's on configs/gpt2_small_cpu.py
  (docs/compression.md#speed). A served model then holds what a float32 one
  does (both during the first call). The first call runs under a lock, so
  concurrent first calls fill once and the others wait for it.
  With ``once=False`` (``--dequantize=every_call``) there are no copies: every
  call dequantises the stored leaves, for servers short of memory.
  """

  def __init__(self, module: tf.Module, specs, arrays, platforms: Sequence[str],
               matrices=None, once: bool = True):
    self._module = module
    self.quantized = once and any(s.reduce_axes is not None for s in specs)
    # A quantized export's stored leaves are emptied once copied: any shape.
    shape = lambda a: tf.TensorShape(None) if self.quantized else a.shape
    module.params = [tf.Variable(a, shape=shape(a), trainable=False, name=f'param_{i}')
                     for i, a in enumerate(arrays)]
    if not self.quantized:
      self.specs = list(specs)
      return
    expand = lambda flat: quantize_lib.expand(specs, flat, matrices)[1]
    self.specs = quantize_lib.float_specs(specs)
    module.float_params = [
        tf.Variable(tf.zeros([0], tf.float32), shape=tf.TensorShape(None),
                    trainable=False, name=f'float_param_{i}')
        for i in range(len(self.specs))]
    module.float_params_ready = tf.Variable(False, trainable=False,
                                            name='float_params_ready')
    expand_tf = jax2tf.convert(expand, with_gradient=False,
                               native_serialization_platforms=tuple(platforms))
    stored = [a.shape for a in arrays]

    def copy():
      values = expand_tf([tf.ensure_shape(v.read_value(), s)
                          for v, s in zip(module.params, stored)])
      with tf.control_dependencies([v.assign(x, read_value=False)
                                    for v, x in zip(module.float_params, values)]):
        emptied = [v.assign(tf.zeros([0], v.dtype), read_value=False)
                   for v in module.params]
      with tf.control_dependencies(emptied):
        # Set only once every copy holds its values: a call that sees it reads them.
        done = module.float_params_ready.assign(True, read_value=False)
      with tf.control_dependencies([done]):
        return tf.constant(True)

    @tf.function(autograph=False, input_signature=[])
    def fill():
      # A mutex created by name in the graph (a Python-made one would not be
      # saved); it is released when the lock is consumed, after the fill.
      lock = tf.raw_ops.MutexLock(mutex=tf.raw_ops.MutexV2(
          container='', shared_name='llm_jax_fill_float_params'))
      with tf.control_dependencies([lock]):
        # A call that waited for another call's fill finds the copies ready.
        out = tf.cond(module.float_params_ready.read_value(),
                      lambda: tf.constant(True), copy)
      with tf.control_dependencies([out]):
        release = tf.raw_ops.ConsumeMutexLock(mutex_lock=lock)
      with tf.control_dependencies([release]):
        return tf.identity(out)

    # One function every signature calls: the SavedModel holds its graph once.
    module.fill_float_params = fill
    self._shapes = [v.shape for v in jax.eval_shape(expand, arrays)]

  def read(self) -> list:
    """The float32 leaves (inside a tf.function), filled on the first call."""
    m = self._module
    if not self.quantized:
      return list(m.params)
    # The reads wait for the copies to be filled; a filled one costs one flag read.
    filled = tf.cond(m.float_params_ready.read_value(), lambda: tf.constant(True),
                     m.fill_float_params)
    with tf.control_dependencies([filled]):
      return [tf.ensure_shape(v.read_value(), shape)
              for v, shape in zip(m.float_params, self._shapes)]


def _build_module(run, specs, arrays, treedef, *, width: int, stop_ids,
                  platforms: Sequence[str], prompt_buckets: Sequence[int],
                  tokenizer_path: str | None, matrices=None, once: bool = True):
  """A tf.Module with the parameter variables and both signature functions."""

  cfg = run.model_cfg
  pad_id = decode.pad_id_of(run)
  module = tf.Module()
  served = ServedParams(module, specs, arrays, platforms, matrices, once)
  specs = served.specs

  def jax_fn(flat, tokens, lengths, max_new_tokens, temperature, top_k, top_p, seed):
    params = quantize_lib.unflatten_params(specs, flat, treedef)
    return decode.decode_tokens(params, tokens, lengths, max_new_tokens, temperature,
                                top_k, top_p, seed, graphdef=run.graphdef, width=width,
                                stop_ids=stop_ids, pad_id=pad_id)

  tf_fn = jax2tf.convert(
      jax_fn, with_gradient=False, native_serialization_platforms=tuple(platforms),
      polymorphic_shapes=[None, '(b, p)', '(b,)', '()', '()', '()', '()', '()'])

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
    out, counts = tf_fn(served.read(), tokens, lengths, *scalars)
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
  module.tokenizer_files = tokenizer_assets(run)
  module.steps = _step_functions(run, specs, treedef, served, platforms)
  signatures.update(module.steps)
  if tokenizer_path is not None:
    module.tokenizer_model = tf.saved_model.Asset(tokenizer_path)
    module.sp, module.text, module.tokens = _text_function(
        run, tokenizer_path, checked_generate, scalar_specs, prompt_buckets, pad_id)
    signatures[TEXT_SIGNATURE] = module.text
    signatures.update(module.tokens)
  return module, signatures


ROW_SAMPLING = (('seed', 'int32'), ('index', 'int32'), ('temperature', 'float32'),
                ('top_k', 'int32'), ('top_p', 'float32'))


def cache_info(cfg) -> dict:
  """The cache layout of ``decode_step``: [batch, layers, 2, slots, kv heads, head dim]."""
  return {'layers': cfg.num_layers, 'kv_heads': cfg.num_kv_heads,
          'head_dim': cfg.head_dim, 'slots': cfg.max_len,
          'dtype': np.dtype(cfg.compute_dtype).name}


def _converted_steps(run, specs, treedef, platforms):
  """jax2tf conversions of ``decode.prefill``, ``decode_step`` and ``score``."""
  graphdef = run.graphdef
  params = lambda flat: quantize_lib.unflatten_params(specs, flat, treedef)

  def convert(fn, shapes):
    return jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=[None, *shapes],
                          native_serialization_platforms=tuple(platforms))

  rows = ['(b,)'] * len(ROW_SAMPLING)
  cache_shape = '(b, {layers}, 2, {slots}, {kv_heads}, {head_dim})'.format(
      **cache_info(run.model_cfg))
  return (
      convert(lambda flat, *a: decode.prefill(params(flat), *a, graphdef=graphdef),
              ['(b, p)', '(b,)', *rows]),
      convert(lambda flat, *a: decode.decode_step(params(flat), *a, graphdef=graphdef),
              [cache_shape, '(b,)', '(b,)', '(b,)', *rows]),
      convert(lambda flat, t: decode.score(params(flat), t, graphdef=graphdef), ['(b, t)']))


def _step_functions(run, specs, treedef, served: ServedParams, platforms) -> dict:
  """The ``prefill``, ``decode_step`` and ``score`` signature functions."""
  cfg = run.model_cfg
  cache = cache_info(cfg)
  prefill_tf, step_tf, score_tf = _converted_steps(run, specs, treedef, platforms)
  row_specs = [tf.TensorSpec([None], getattr(tf, dt), name=n) for n, dt in ROW_SAMPLING]
  ids = lambda name: tf.TensorSpec([None], tf.int32, name=name)
  in_vocab = lambda t: [
      tf.debugging.assert_greater_equal(t, 0, message='token id below 0'),
      tf.debugging.assert_less(t, cfg.vocab_size, message=(
          f'token id outside the vocabulary [0, {cfg.vocab_size})'))]

  def checked(checks, t):
    with tf.control_dependencies(checks):
      return tf.identity(t)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None], tf.int32, name='tokens'), ids('lengths'), *row_specs])
  def prefill(tokens, lengths, *sampling):
    tokens = checked(in_vocab(tokens) + [
        tf.debugging.assert_greater_equal(lengths, 1, message='lengths must be >= 1'),
        tf.debugging.assert_less_equal(lengths, tf.shape(tokens)[1], message=(
            'a length exceeds the prompt width (tokens.shape[1])')),
        tf.debugging.assert_less(lengths, cfg.max_len, message=(
            f'prompt longer than the model context: lengths must be below '
            f'max_len={cfg.max_len} (room for one new token)'))], tokens)
    return prefill_tf(served.read(), tokens, lengths, *sampling)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, cache['layers'], 2, cache['slots'], cache['kv_heads'],
                     cache['head_dim']], tf.as_dtype(cache['dtype']), name='cache'),
      ids('tokens'), ids('positions'), ids('step'), *row_specs])
  def decode_step(cache_in, tokens, positions, step, *sampling):
    tokens = checked(in_vocab(tokens) + [
        tf.debugging.assert_greater_equal(positions, 0, message='positions must be >= 0'),
        tf.debugging.assert_less(positions, cfg.max_len, message=(
            f'positions must be below max_len={cfg.max_len}'))], tokens)
    return step_tf(served.read(), cache_in, tokens, positions, step, *sampling)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None], tf.int32, name='tokens')])
  def score(tokens):
    tokens = checked(in_vocab(tokens) + [tf.debugging.assert_less_equal(
        tf.shape(tokens)[1], cfg.max_len, message=(
            f'more tokens than the model context max_len={cfg.max_len}'))], tokens)
    return score_tf(served.read(), tokens)

  return {'prefill': prefill, 'decode_step': decode_step, 'score': score}


def _text_function(run, tokenizer_path, checked_generate, scalar_specs,
                   prompt_buckets, pad_id):
  """(tokenizer, the strings-in strings-out signature function, and the
  tokenize / detokenize signature functions by name)."""
  tf_text = tfhost.import_text()

  with open(tokenizer_path, 'rb') as f:
    sp = tf_text.SentencepieceTokenizer(model=f.read(), out_type=tf.int32)
  tok = run.tokenizer
  sp_vocab, unk, eos = tok.vocab_size, tok.unk_id, tok.eos_id
  buckets = tf.constant(sorted(prompt_buckets), tf.int32)

  def known_ids(ragged):
    # Ids the model knows but the tokenizer does not (a padded or extended
    # vocabulary) detokenize as unknown.
    flat = ragged.flat_values
    return ragged.with_flat_values(tf.where((flat >= 0) & (flat < sp_vocab), flat, unk))

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
    new = known_ids(tf.RaggedTensor.from_tensor(out, lengths=counts))
    return {'text': sp.detokenize(new), 'tokens': out, 'counts': counts}

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None], tf.string, name='text')])
  def tokenize(text):
    ids = sp.tokenize(text)
    return {'tokens': ids.to_tensor(default_value=0),
            'lengths': tf.cast(ids.row_lengths(), tf.int32)}

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, None], tf.int32, name='tokens'),
                                tf.TensorSpec([None], tf.int32, name='lengths')])
  def detokenize(tokens, lengths):
    lengths = tf.minimum(tf.maximum(lengths, 0), tf.shape(tokens)[1])
    return {'text': sp.detokenize(known_ids(tf.RaggedTensor.from_tensor(tokens,
                                                                       lengths=lengths)))}

  # The tokenizer holds a TF resource: the module must track it.
  return sp, text, {'tokenize': tokenize, 'detokenize': detokenize}


def tokenizer_assets(run) -> list:
  """The run's Hugging Face tokenizer files as SavedModel assets (else none)."""
  tok = run.tokenizer
  if tok is None or tok.kind == 'sentencepiece':
    return []  # The text signature's op holds a SentencePiece model itself.
  return [tf.saved_model.Asset(os.path.join(run.workdir, name)) for name in tok.files()]


# ---- Export.


def export(workdir: str, out: str, *, step: int | None = None, quantize: str = 'none',
           group_size: int = quantize_lib.DEFAULT_GROUP, int4_embeddings: bool = False,
           max_new_tokens: int = 128, batch_buckets: Sequence[int] = (1, 4, 8),
           prompt_buckets: Sequence[int] | None = None,
           platforms: Sequence[str] = PLATFORMS, overwrite: bool = False,
           eval_batches: int = 8, text_signature: bool = True,
           stop_ids: Sequence[int] | None = None, dequantize: str = 'once',
           log=print) -> dict:
  """Writes the SavedModel of a run to ``out`` (whole or not at all).

  Args (besides the CLI's flags):
    stop_ids: tokens that end a row (default: the tokenizer's end-of-text;
      ``()`` makes every row run to ``max_new_tokens``, as the benchmark does).

  Returns:
    The export info (also in ``assets.extra/llm_jax_export.json``).

  Raises:
    UserError: no checkpoint, ``out`` exists, or a bad option.
  """

  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise UserError(f'--out={out} already exists; pass --overwrite to replace it or '
                    'choose another directory (e.g. the next version number).')
  # Never replace the run itself, or anything that is not an earlier export.
  run_dir = os.path.abspath(workdir)
  guard = dict(protect=(run_dir,), allow_inside=(os.path.join(run_dir, 'export'),),
               what='export')
  files.check_replaceable(out, marker=EXPORT_MARKER, **guard)
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad:
    raise UserError(f'--platforms has {bad[0]!r}; choose from {", ".join(PLATFORMS)}.')
  if dequantize not in DEQUANTIZE:
    raise UserError(f'--dequantize={dequantize!r}; choose from {", ".join(DEQUANTIZE)}.')
  once = dequantize == 'once'
  run = workdir_lib.load(workdir, step)
  # The oneMKL matmul is a custom call local to this machine: exports use XLA's dot.
  run = dataclasses.replace(run, graphdef=model_lib.with_xla_matmuls(run.graphdef, run.params),
                            model_cfg=dataclasses.replace(run.model_cfg, cpu_matmul='xla'))
  if objectives.objective_of(run.config) == 'reward':
    return _export_scorer(run, out, quantize=quantize, batch_buckets=batch_buckets,
                          platforms=platforms, overwrite=overwrite, guard=guard, once=once,
                          text_signature=text_signature, log=log)
  cfg = run.model_cfg
  if cfg.head != 'lm':  # An encoder's task head: classify / answer signatures.
    if quantize != 'none':
      raise UserError(f'--quantize={quantize} is for decoders; export a '
                      f'{cfg.head} head with --quantize=none.')
    return task_export.export(run, out, guard=guard, overwrite=overwrite,
                              platforms=platforms, text_signature=text_signature,
                              signature_tensors=signature_tensors, log=log)
  width = max(1, min(max_new_tokens, cfg.max_len - 1))
  prompt_buckets = sorted(prompt_buckets or default_prompt_buckets(cfg.max_len))
  t0 = time.time()
  matrices = decode.kernel_matrices(run.graphdef, run.params)
  specs, arrays, treedef = quantize_lib.flatten_params(
      run.params, quantize, group_size, int4_embeddings, matrices=matrices)
  tokenizer_path = (os.path.join(run.workdir, workdir_lib.TOKENIZER_FILE)
                    if run.tokenizer is not None and run.tokenizer.kind == 'sentencepiece'
                    and text_signature else None)
  stop_ids = tuple(decode.stop_ids(run) if stop_ids is None else stop_ids)
  module, signatures = _build_module(
      run, specs, arrays, treedef, width=width, platforms=platforms, stop_ids=stop_ids,
      prompt_buckets=prompt_buckets, tokenizer_path=tokenizer_path, matrices=matrices,
      once=once)

  with files.atomic_dir(out, overwrite=overwrite, marker=EXPORT_MARKER, **guard) as tmp:
    tf.saved_model.save(module, tmp, signatures=signatures)
    info = {
        'workdir': run.workdir, 'step': run.step, 'quantize': quantize,
        **({'int4_group_size': group_size, 'int4_embeddings': int4_embeddings}
           if quantize == 'int4' else {}),
        'max_new_tokens': width, 'max_len': cfg.max_len,
        'vocab_size': cfg.vocab_size, 'platforms': list(platforms),
        'stop_ids': list(stop_ids), 'batch_buckets': list(batch_buckets),
        'prompt_buckets': prompt_buckets,
        'signatures': sorted(signatures),
        # Signature -> argument -> graph tensor: what a Session.Run client
        # (the Go runtime) feeds and fetches, without parsing saved_model.pb.
        'signature_tensors': signature_tensors(tmp),
        # For the step signatures and the HTTP server (serving/go).
        'cache': cache_info(cfg), 'top_logprobs': decode.TOP_LOGPROBS,
        'eos_id': run.tokenizer.eos_id if run.tokenizer is not None else -1,
        'chat_template': run.config.sft.template,
        'param_bytes': int(sum(a.nbytes for a in arrays)),
        'param_bytes_float32': int(sum(4 * int(np.prod(s.shape)) for s in specs)),
    }
    # A quantized export served with copies holds float32 leaves, not its own.
    if quantize != 'none':
      info['dequantize'] = dequantize
    info['served_param_bytes'] = info[
        'param_bytes_float32' if quantize != 'none' and once else 'param_bytes']
    extra = os.path.join(tmp, 'assets.extra')
    os.makedirs(extra, exist_ok=True)
    fill = run.tokenizer.unk_id if run.tokenizer is not None else 0
    warmup.write(os.path.join(extra, warmup.WARMUP_FILE),
                 ((sig, inputs) for sig, inputs in warmup.warmup_requests(
                     batch_buckets, prompt_buckets, cfg.max_len, fill)
                  if sig != TEXT_SIGNATURE or tokenizer_path is not None))
    if quantize != 'none' and eval_batches > 0:
      formats = quantize_lib.compare_formats(run, eval_batches, group_size,
                                             int4_embeddings)
      info['formats'] = formats
      info['perplexity'] = {**{k: formats[k]['perplexity']
                               for k in ('float32', 'int8', 'int4')},
                            'tokens': formats['tokens']}
    info['saved_model_bytes'] = dir_bytes(tmp)
    info['export_seconds'] = round(time.time() - t0, 1)
    files.atomic_write_json(os.path.join(extra, INFO_FILE), info)
  log(f'Exported step {run.step} of {run.workdir} to {out} '
      f'({info["saved_model_bytes"] / 2**20:.2f} MiB, {quantize}) in '
      f'{info["export_seconds"]:.0f}s.')
  if 'formats' in info:
    f = info['formats']
    for name in ('float32', 'int8', 'int4'):
      log(f'{name:8s} parameters {f[name]["param_bytes"] / 2**20:7.3f} MiB; validation '
          f'perplexity {f[name]["perplexity"]:.3f} '
          f'({100 * (f[name]["perplexity"] / f["float32"]["perplexity"] - 1):+.3f}%)'
          + (' <- this export' if name == quantize else ''))
  return info


# ---- A reward model's scorer.

SCORE_SIGNATURE = 'score'
SCORE_TEXT_SIGNATURE = 'score_text'


def _score_function(run, specs, treedef, served: ServedParams, platforms):
  """The checked ids-in, rewards-out function over the module's variables.

  Rows are padded to the model's context before the converted function, so
  its only polymorphic dimension is the batch (one compile per batch size).
  """
  cfg = run.model_cfg

  def jax_fn(flat, tokens, lengths):
    model = nnx.merge(run.graphdef, quantize_lib.unflatten_params(specs, flat, treedef))
    return model.score(tokens, lengths - 1)

  tf_fn = jax2tf.convert(jax_fn, with_gradient=False,
                         native_serialization_platforms=tuple(platforms),
                         polymorphic_shapes=[None, '(b, _)', '(b,)'])

  def checked_score(tokens, lengths):
    width = tf.shape(tokens)[1]
    checks = [
        tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0], message=(
            'lengths must have one entry per row of tokens')),
        tf.debugging.assert_greater_equal(lengths, 1, message=(
            'every row needs at least one token (lengths >= 1)')),
        tf.debugging.assert_less_equal(lengths, width, message=(
            'a length exceeds the row width (tokens.shape[1])')),
        tf.debugging.assert_less_equal(width, cfg.max_len, message=(
            f'rows longer than the model context max_len={cfg.max_len}')),
        tf.debugging.assert_greater_equal(tokens, 0, message='token id below 0'),
        tf.debugging.assert_less(tokens, cfg.vocab_size, message=(
            f'token id outside the vocabulary [0, {cfg.vocab_size})')),
    ]
    with tf.control_dependencies(checks):
      tokens = tf.pad(tokens, [[0, 0], [0, cfg.max_len - width]])
    tokens = tf.ensure_shape(tokens, [None, cfg.max_len])
    return tf_fn(served.read(), tokens, lengths)

  return checked_score


def _score_text_function(run, tokenizer_path, checked_score):
  """(tokenizer, the prompt and response strings in, rewards out function)."""
  tf_text = tfhost.import_text()
  with open(tokenizer_path, 'rb') as f:
    sp = tf_text.SentencepieceTokenizer(model=f.read(), out_type=tf.int32)
  template = run.config.sft.template
  pieces = lambda role: template.replace('{role}', role).split('{content}')
  (user_head, user_tail), (bot_head, bot_tail) = pieces('user'), pieces('assistant')
  string = lambda text: tf.TensorSpec([None], tf.string, name=text)

  @tf.function(autograph=False, input_signature=[string('prompt'), string('response')])
  def score_text(prompt, response):
    batch = tf.shape(prompt)[0]
    const = lambda text: tf.fill([batch], text)
    # The pieces sft.render encodes one by one, in its order.
    parts = [const(user_head), prompt + user_tail, const(bot_head), response + bot_tail]
    ids = tf.concat([sp.tokenize(p) for p in parts], axis=1)
    lengths = tf.cast(ids.row_lengths(), tf.int32)
    return {'reward': checked_score(ids.to_tensor(default_value=0), lengths)}

  return sp, score_text


def _export_scorer(run, out, *, quantize, batch_buckets, platforms, overwrite, guard,
                   text_signature, log, once=True) -> dict:
  """Writes a reward model's ``score`` (and ``score_text``) SavedModel."""
  t0 = time.time()
  specs, arrays, treedef = quantize_lib.flatten_params(run.params, quantize)
  module = tf.Module()
  served = ServedParams(module, specs, arrays, platforms, once=once)
  checked_score = _score_function(run, served.specs, treedef, served, platforms)

  @tf.function(autograph=False,
               input_signature=[tf.TensorSpec([None, None], tf.int32, name='tokens'),
                                tf.TensorSpec([None], tf.int32, name='lengths')])
  def score(tokens, lengths):
    return {'reward': checked_score(tokens, lengths)}

  module.score = score
  signatures = {'serving_default': score, SCORE_SIGNATURE: score}
  warm = [(SCORE_SIGNATURE, dict(tokens=np.ones((b, 1), np.int32),
                                 lengths=np.ones((b,), np.int32))) for b in batch_buckets]
  if run.tokenizer is not None and text_signature:
    path = os.path.join(run.workdir, workdir_lib.TOKENIZER_FILE)
    module.tokenizer_model = tf.saved_model.Asset(path)
    module.sp, module.score_text = _score_text_function(run, path, checked_score)
    signatures[SCORE_TEXT_SIGNATURE] = module.score_text
    warm += [(SCORE_TEXT_SIGNATURE, dict(prompt=np.array([b'Hi'] * b, dtype=object),
                                         response=np.array([b'Hello'] * b, dtype=object)))
             for b in batch_buckets]
  with files.atomic_dir(out, overwrite=overwrite, marker=EXPORT_MARKER, **guard) as tmp:
    tf.saved_model.save(module, tmp, signatures=signatures)
    info = {'workdir': run.workdir, 'step': run.step, 'quantize': quantize,
            'objective': 'reward', 'max_len': run.model_cfg.max_len,
            'vocab_size': run.model_cfg.vocab_size, 'platforms': list(platforms),
            'batch_buckets': list(batch_buckets), 'signatures': sorted(signatures),
            'signature_tensors': signature_tensors(tmp),
            'param_bytes': int(sum(a.nbytes for a in arrays))}
    extra = os.path.join(tmp, 'assets.extra')
    os.makedirs(extra, exist_ok=True)
    warmup.write(os.path.join(extra, warmup.WARMUP_FILE), warm)
    info['saved_model_bytes'] = dir_bytes(tmp)
    info['export_seconds'] = round(time.time() - t0, 1)
    files.atomic_write_json(os.path.join(extra, INFO_FILE), info)
  log(f'Exported the reward model at step {run.step} of {run.workdir} to {out} '
      f'({info["saved_model_bytes"] / 2**20:.2f} MiB; signatures {", ".join(sorted(signatures))}).')
  return info


def signature_tensors(saved_model_dir: str) -> dict:
  """``{signature: {'inputs': {name: tensor}, 'outputs': {name: tensor}}}``.

  Read from ``saved_model.pb`` with TensorFlow's own protobuf classes.
  """
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  proto = saved_model_pb2.SavedModel()
  with open(os.path.join(saved_model_dir, 'saved_model.pb'), 'rb') as f:
    proto.ParseFromString(f.read())
  graph = proto.meta_graphs[0]
  return {name: {'inputs': {k: v.name for k, v in sig.inputs.items()},
                 'outputs': {k: v.name for k, v in sig.outputs.items()}}
          for name, sig in graph.signature_def.items() if name != '__saved_model_init_op'}


def dir_bytes(path: str) -> int:
  """Total size of the files under ``path``."""
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(path) for f in files)
