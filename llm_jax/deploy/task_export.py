r"""The SavedModel of an encoder's task head: ``classify`` and ``answer`` signatures.

    python -m llm_jax.export --workdir=runs/qa --out=runs/qa/export/1

``saved_model.export`` comes here for a run with ``model.head`` 'classification'
or 'qa'. The model (and, for QA, the span search ``inference.tasks.best_spans``)
is converted with jax2tf like the decoder's export; rows and windows are
built in the graph exactly as ``data/tasks.py`` builds them in Python.

Signatures (docs/encoders.md documents them):

* ``classify_ids``: ``tokens``, ``token_type_ids``, ``attention_mask`` int32
  [batch, length] (rows as the run's tokenizer lays them out, 1 at real tokens)
  -> ``probabilities`` float32 [batch, labels], ``label_id`` int32 [batch].
* ``classify`` (tokenizer in the graph): ``text`` string [batch] (and
  ``text_pair`` for a pair task) -> ``label`` string, ``label_id`` int32,
  ``probabilities`` float32 [batch, labels].
* ``answer_ids``: ``tokens``, ``token_type_ids``, ``attention_mask`` (1 at
  real tokens), ``context_mask`` (1 at context tokens) int32 [windows, length] -> ``start_logits``, ``end_logits``
  float32 [windows, length], ``score``, ``null_score`` float32 [windows] and
  ``start``, ``end`` int32 [windows] (each window's best span).
* ``answer`` (tokenizer in the graph): ``question``, ``context`` string
  [batch] -> ``answer`` string, ``score`` float32, ``start``, ``end`` int32
  [batch]: character offsets of the answer in its context (-1 and '' for no
  answer). A long context is cut into windows ``task.doc_stride`` tokens apart.

The tokenizer runs in the graph where tensorflow-text has it: SentencePiece
(``SentencepieceTokenizer``) and BERT WordPiece (``FastBertTokenizer``). A
byte-level BPE tokenizer has no op: the export then has the ids signatures
only, and the tokenizer's files are in ``assets/`` for the client.
"""

import json
import os

from jax.experimental import jax2tf
import numpy as np

from llm_jax.core import files
from llm_jax.core import tfhost
from llm_jax.core.tfhost import tf
from llm_jax.deploy import quantize as quantize_lib
from llm_jax.inference import tasks as infer

INFO_FILE = 'llm_jax_export.json'


def text_tokenizer(tok):
  """The tensorflow-text tokenizer that equals ``tok``, or None if there is none."""
  if tok.kind == 'sentencepiece':
    return tfhost.import_text().SentencepieceTokenizer(model=tok.model_bytes,
                                                       out_type=tf.int32)
  spec = json.loads(tok.model_bytes)
  norm, pre = spec.get('normalizer') or {}, spec.get('pre_tokenizer') or {}
  model = spec.get('model') or {}
  lowercase = norm.get('lowercase', False)
  if (model.get('type') != 'WordPiece' or norm.get('type') != 'BertNormalizer'
      or pre.get('type') != 'BertPreTokenizer'
      or norm.get('strip_accents') not in (None, lowercase)
      or not norm.get('handle_chinese_chars', True)):
    return None  # Byte-level BPE, or a WordPiece FastBertTokenizer cannot match.
  vocab = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
  return tfhost.import_text().FastBertTokenizer(
      vocab=vocab, token_out_type=tf.int32, lower_case_nfd_strip_accents=lowercase,
      unknown_token=model.get('unk_token', '[UNK]'),
      suffix_indicator=model.get('continuing_subword_prefix', '##'))


def _ragged_constant(value: int, n, type_dtype=tf.int32):
  return tf.RaggedTensor.from_row_lengths(tf.fill([n], tf.constant(value, type_dtype)),
                                          tf.ones([n], tf.int64))


def _assemble(template, a, b, n, special=None):
  """Ragged ids, type ids and a context flag (1 on b) of the template's layout.

  ``special``: the value special tokens take (default: their ids).
  """
  ids, types, in_b = [], [], []
  for item, type_id in template:
    part = (a if item == 'A' else b if item == 'B' else
            _ragged_constant(item if special is None else special, n))
    ids.append(part)
    types.append(tf.ones_like(part) * type_id)
    in_b.append(tf.ones_like(part) * int(item == 'B'))
  return tf.concat(ids, axis=1), tf.concat(types, axis=1), tf.concat(in_b, axis=1)


def _dense(ragged, width, pad):
  return ragged.to_tensor(default_value=pad, shape=[None, width])


def _convert(jax_fn, num_inputs: int, platforms, max_len: int):
  """jax2tf with any batch and any length up to the model's context."""
  return jax2tf.convert(jax_fn, with_gradient=False,
                        native_serialization_platforms=tuple(platforms),
                        polymorphic_shapes=[None] + ['(b, p)'] * num_inputs,
                        polymorphic_constraints=(f'p <= {max_len}',))


def _classify_functions(module, run, tf_fn, tokenizer, pad: int):
  """classify_ids and (with a graph tokenizer) classify."""
  labels = tf.constant([n for n in run.config.task.labels.split(',') if n])
  T = run.model_cfg.max_len
  pair = bool(run.config.task.text_pair_field)
  tok = run.tokenizer

  def predict(tokens, types, mask):
    probs = tf_fn(list(module.params), tokens, types, mask)
    return {'probabilities': probs, 'label_id': tf.argmax(probs, -1, output_type=tf.int32)}

  ids_spec = [tf.TensorSpec([None, None], tf.int32, name=n)
              for n in ('tokens', 'token_type_ids', 'attention_mask')]
  classify_ids = tf.function(predict, input_signature=ids_spec, autograph=False)
  if tokenizer is None:
    return {'classify_ids': classify_ids}
  room = T - len(tok.with_specials([], [] if pair else None)[0])

  def classify(text, text_pair=None):
    a = tokenizer.tokenize(text)
    n = a.nrows()
    la = a.row_lengths()
    if text_pair is None:
      keep_a, b = tf.minimum(la, room), None
    else:
      b = tokenizer.tokenize(text_pair)
      keep_a, keep_b = _longest_first(la, b.row_lengths(), room)
      b = tf.ragged.boolean_mask(b, tf.ragged.range(b.row_lengths()) < keep_b[:, None])
    a = tf.ragged.boolean_mask(a, tf.ragged.range(la) < keep_a[:, None])
    ids, types, _ = _assemble(tok.template(pair), a, b, n)
    width = tf.cast(tf.reduce_max(tf.concat([ids.row_lengths(), [1]], 0)), tf.int32)
    mask = tf.sequence_mask(ids.row_lengths(), width, dtype=tf.int32)
    out = predict(ids.to_tensor(pad), types.to_tensor(0), mask)
    return dict(out, label=tf.gather(labels, out['label_id']))

  text_specs = [tf.TensorSpec([None], tf.string, name='text')]
  if pair:
    text_specs.append(tf.TensorSpec([None], tf.string, name='text_pair'))
  return {'classify_ids': classify_ids,
          'classify': tf.function(classify, input_signature=text_specs, autograph=False)}


def _longest_first(la, lb, room):
  """``data.tasks.longest_first`` on tensors of lengths."""
  room = tf.constant(room, la.dtype)
  short = tf.minimum(la, lb)
  fits = la + lb <= room
  keep_short = 2 * short <= room
  a_short = la <= lb
  a = tf.where(fits, la, tf.where(keep_short, tf.where(a_short, la, room - lb), room // 2))
  b = tf.where(fits, lb, tf.where(keep_short, tf.where(a_short, room - la, lb),
                                  room - room // 2))
  return a, b


def _windows(run, tokenizer, question, context):
  """Every question's windows: ids, types, context flag, byte offsets, question of each."""
  tok, t = run.tokenizer, run.config.task
  T = run.model_cfg.max_len
  q = tokenizer.tokenize(question)
  q = tf.ragged.boolean_mask(q, tf.ragged.range(q.row_lengths()) < t.max_query_len)
  c, c_start, c_end = tokenizer.tokenize_with_offsets(context)
  lq, lc = q.row_lengths(), c.row_lengths()
  budget = T - len(tok.with_specials([], [])[0]) - lq
  checks = [tf.debugging.assert_greater_equal(budget, tf.ones_like(budget), message=(
      f'task.max_query_len={t.max_query_len} leaves no context in {T}-token windows'))]
  with tf.control_dependencies(checks):
    over = tf.maximum(lc - budget, 0)
  count = over // t.doc_stride + 1
  extra = tf.cast((count - 1) * t.doc_stride + budget < lc, count.dtype)
  question_of = tf.repeat(tf.range(tf.size(lc, out_type=tf.int64)), count + extra)
  k = tf.ragged.range(count + extra).flat_values
  start = tf.where(k < tf.gather(count, question_of), k * t.doc_stride,
                   tf.gather(lc - budget, question_of))
  length = tf.minimum(tf.gather(budget, question_of), tf.gather(lc, question_of) - start)
  first = tf.gather(c.row_starts(), question_of) + start
  index = tf.ragged.range(first, first + length)
  b = tf.gather(c.flat_values, index)
  n = tf.size(question_of)
  ids, types, in_b = _assemble(tok.template(True), tf.gather(q, question_of), b, n)
  offsets = []  # Byte offsets of context tokens, -1 elsewhere.
  q_none = tf.ones_like(tf.gather(q, question_of)) * -1
  for values in (c_start, c_end):
    o_b = tf.gather(tf.cast(values.flat_values, tf.int32), index)
    offsets.append(_dense(_assemble(tok.template(True), q_none, o_b, n, special=-1)[0],
                          T, -1))
  return ids, types, in_b, offsets, question_of


def _answer_functions(module, run, tf_fn, tokenizer, pad: int):
  """answer_ids and (with a graph tokenizer) answer."""
  T, t = run.model_cfg.max_len, run.config.task

  def spans(tokens, types, mask, context_mask):
    start_logits, end_logits, score, start, end, null = tf_fn(
        list(module.params), tokens, types, mask, context_mask)
    return {'start_logits': start_logits, 'end_logits': end_logits, 'score': score,
            'start': start, 'end': end, 'null_score': null}

  ids_spec = [tf.TensorSpec([None, None], tf.int32, name=n)
              for n in ('tokens', 'token_type_ids', 'attention_mask', 'context_mask')]
  out = {'answer_ids': tf.function(spans, input_signature=ids_spec, autograph=False)}
  if tokenizer is None:
    return out

  def answer(question, context):
    ids, types, in_b, (o_start, o_end), question_of = _windows(run, tokenizer, question,
                                                              context)
    real = tf.sequence_mask(ids.row_lengths(), T, dtype=tf.int32)
    tokens = tf.where(real > 0, _dense(ids, T, pad), pad)
    _, _, score, start, end, null = tf_fn(list(module.params), tokens, _dense(types, T, 0),
                                          real, _dense(in_b, T, 0))
    n = tf.size(context)
    best = tf.math.unsorted_segment_max(score, question_of, n)
    w = tf.range(tf.size(question_of))
    is_best = score >= tf.gather(best, question_of)
    row = tf.math.unsorted_segment_min(tf.where(is_best, w, tf.size(w)), question_of, n)
    null_min = tf.math.unsorted_segment_min(null, question_of, n)
    none = null_min > best + t.null_threshold
    byte_start = tf.gather_nd(o_start, tf.stack([row, tf.gather(start, row)], 1))
    byte_end = tf.gather_nd(o_end, tf.stack([row, tf.gather(end, row)], 1))
    text = tf.strings.substr(context, byte_start, byte_end - byte_start, unit='BYTE')
    chars = tf.strings.unicode_decode_with_offsets(context, 'UTF-8')[1]
    char_starts = chars.to_tensor(default_value=np.iinfo(np.int64).max)
    to_char = lambda b: tf.reduce_sum(tf.cast(
        char_starts < tf.cast(b, tf.int64)[:, None], tf.int32), axis=1)
    return {'answer': tf.where(none, '', text), 'score': tf.where(none, null_min, best),
            'start': tf.where(none, -1, to_char(byte_start)),
            'end': tf.where(none, -1, to_char(byte_end))}

  out['answer'] = tf.function(answer, autograph=False, input_signature=[
      tf.TensorSpec([None], tf.string, name='question'),
      tf.TensorSpec([None], tf.string, name='context')])
  return out


def build_module(run, platforms, *, text_signature: bool = True):
  """(tf.Module, signatures) of a task run."""
  specs, arrays, treedef = quantize_lib.flatten_params(run.params, 'none')
  graphdef, cfg = run.graphdef, run.model_cfg
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def model(flat, tokens, types, mask):
    params = quantize_lib.unflatten_params(specs, flat, treedef)
    return nnx.merge(graphdef, params)(tokens, segment_ids_BT=mask, token_types_BT=types)

  def classify_jax(flat, tokens, types, mask):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.nn.softmax(model(flat, tokens, types, mask), axis=-1)

  def answer_jax(flat, tokens, types, mask, context_mask):
    out = model(flat, tokens, types, mask)
    return (out[..., 0], out[..., 1],
            *infer.best_spans(out[..., 0], out[..., 1], context_mask > 0,
                              run.config.task.max_answer_len))

  module = tf.Module()
  module.params = [tf.Variable(a, trainable=False, name=f'param_{i}')
                   for i, a in enumerate(arrays)]
  module.tokenizer_files = [tf.saved_model.Asset(os.path.join(run.workdir, name))
                            for name in run.tokenizer.files()]
  tokenizer = text_tokenizer(run.tokenizer) if text_signature else None
  module.text_tokenizer = tokenizer  # Tracked: it may hold a TF resource.
  pad = max(run.tokenizer.pad_id, 0)
  if cfg.head == 'classification':
    signatures = _classify_functions(module, run, _convert(classify_jax, 3, platforms, cfg.max_len),
                                     tokenizer, pad)
  else:
    signatures = _answer_functions(module, run, _convert(answer_jax, 4, platforms, cfg.max_len),
                                   tokenizer, pad)
  for name, fn in signatures.items():
    setattr(module, name, fn)
  return module, signatures


def export(run, out: str, *, guard: dict, overwrite: bool, platforms, text_signature: bool,
           signature_tensors, log=print) -> dict:
  """Writes the task run's SavedModel to ``out`` (whole or not at all)."""
  if run.tokenizer is None:
    from llm_jax.core.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError(f'{run.workdir} has no tokenizer files; a task export needs them.')
  module, signatures = build_module(run, platforms, text_signature=text_signature)
  with files.atomic_dir(out, overwrite=overwrite, marker=os.path.join('assets.extra', INFO_FILE),
                        **guard) as tmp:
    tf.saved_model.save(module, tmp, signatures=signatures)
    info = {'workdir': run.workdir, 'step': run.step, 'head': run.model_cfg.head,
            'max_len': run.model_cfg.max_len, 'platforms': list(platforms),
            'labels': [n for n in run.config.task.labels.split(',') if n],
            'signatures': sorted(signatures),
            'signature_tensors': signature_tensors(tmp),
            'tokenizer_files': sorted(run.tokenizer.files())}
    os.makedirs(os.path.join(tmp, 'assets.extra'), exist_ok=True)
    files.atomic_write_json(os.path.join(tmp, 'assets.extra', INFO_FILE), info)
  log(f'Exported step {run.step} of {run.workdir} ({run.model_cfg.head} head; '
      f'signatures {", ".join(sorted(signatures))}) to {out}.')
  return info
