"""Tests of llm_jax/deploy/saved_model.py: the SavedModel returns what llm_jax.generate returns.

One tiny run is trained and exported once for the module; the SavedModel is
read back with TF2's ``tf.saved_model.load`` and with the TF1 session loader
(the path TF Serving, C and Go take).
"""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from llm_jax.inference import decode
from llm_jax.deploy import quantize, warmup
from llm_jax.deploy import saved_model as export
from llm_jax.core.errors import UserError
from llm_jax.core.tfhost import tf
from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-bad-import-order
import tensorflow_text  # noqa: F401  (registers the SentencePiece ops)

WIDTH = 12  # The export's static output width (conftest.exported_tiny_run).
PROMPTS = ['def main(', 'import os\nclass Thing:\n    def __init__(self', '', 'x']


@pytest.fixture(scope='module')
def exported(exported_tiny_run):
  """(run, SavedModel dir) of a 20-step tiny run exported for cpu, cuda, tpu."""
  run, out, info = exported_tiny_run
  assert info['platforms'] == ['cpu', 'cuda', 'tpu']
  assert info['max_new_tokens'] == WIDTH
  return run, out


class _Tf1Model:
  """A SavedModel in a TF1 Graph/Session, run by tensor names as TF Serving does."""

  def __init__(self, export_dir):
    self.graph = tf.Graph()
    self.sess = tf.compat.v1.Session(graph=self.graph)
    with self.graph.as_default():
      meta = tf.compat.v1.saved_model.loader.load(self.sess, ['serve'], export_dir)
    self.signatures = meta.signature_def

  def __call__(self, signature, **feeds):
    sig = self.signatures[signature]
    names = sorted(sig.outputs)
    values = self.sess.run([sig.outputs[n].name for n in names],
                           {sig.inputs[k].name: v for k, v in feeds.items()})
    return dict(zip(names, values))


@pytest.fixture(scope='module')
def loaded(exported):
  _, out = exported
  tf1 = _Tf1Model(out)
  yield tf.saved_model.load(out), tf1
  tf1.sess.close()


def _scalars(max_new=WIDTH, temperature=0.0, top_k=0, top_p=1.0, seed=0):
  return dict(max_new_tokens=np.int32(max_new), temperature=np.float32(temperature),
              top_k=np.int32(top_k), top_p=np.float32(top_p), seed=np.int32(seed))


SAMPLING = [dict(temperature=0.0), dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)]


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
@pytest.mark.parametrize('sampling', SAMPLING, ids=['greedy', 'sampled'])
def test_both_loaders_return_the_tokens_of_generate(exported, loaded, sampling):
  run, _ = exported
  tf2, tf1 = loaded
  ids = [run.tokenizer.encode(p) or [run.tokenizer.eos_id] for p in PROMPTS]
  grid = [(ids[:1], 16), (ids[1:2], 32), (ids[:3], 16), (ids[:3], 32)]
  for prompts, prompt_width in grid:
    want_tokens, want_counts = decode.generate_for_run(
        run, prompts, max_new_tokens=10, width=WIDTH, prompt_width=prompt_width,
        **sampling)
    assert want_counts.max() > 0
    tokens, lengths = decode.left_pad(prompts, prompt_width, 0)
    scalars = _scalars(max_new=10, **sampling)
    got2 = tf2.signatures['serving_default'](
        tokens=tf.constant(tokens), lengths=tf.constant(lengths),
        **{k: tf.constant(v) for k, v in scalars.items()})
    got1 = tf1('serving_default', tokens=tokens, lengths=lengths, **scalars)
    for got in (got2, got1):
      np.testing.assert_array_equal(np.asarray(got['tokens']), want_tokens)
      np.testing.assert_array_equal(np.asarray(got['counts']), want_counts)


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
@pytest.mark.parametrize('sampling', SAMPLING, ids=['greedy', 'sampled'])
def test_text_signature_returns_the_text_of_generate(exported, loaded, sampling):
  run, _ = exported
  tf2, tf1 = loaded
  tok = run.tokenizer
  ids = [tok.encode(p) or [tok.eos_id] for p in PROMPTS]
  want_tokens, want_counts = decode.generate_for_run(
      run, ids, max_new_tokens=WIDTH, width=WIDTH, **sampling)
  want = [tok.decode(row[:n]) for row, n in zip(want_tokens, want_counts)]
  scalars = _scalars(**sampling)
  got2 = tf2.signatures[export.TEXT_SIGNATURE](
      text=tf.constant(PROMPTS), **{k: tf.constant(v) for k, v in scalars.items()})
  got1 = tf1(export.TEXT_SIGNATURE, text=np.array(PROMPTS, dtype=object), **scalars)
  for got in (got2, got1):
    assert [t.decode() for t in np.asarray(got['text'])] == want
    np.testing.assert_array_equal(np.asarray(got['counts']), want_counts)


def _step_by_step(tf1, prompts, steps, sampling, slots):
  """Generation through prefill and decode_step, the cache kept by the caller
  (one row per prompt; all rows step together as a server's batch does)."""
  B = len(prompts)
  rows = dict(seed=np.full(B, sampling.get('seed', 0), np.int32),
              index=np.arange(B, dtype=np.int32),
              temperature=np.full(B, sampling.get('temperature', 0.0), np.float32),
              top_k=np.full(B, sampling.get('top_k', 0), np.int32),
              top_p=np.full(B, sampling.get('top_p', 1.0), np.float32))
  tokens = np.zeros((B, 16), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  out = tf1('prefill', tokens=tokens, lengths=lengths, **rows)
  cache = np.zeros(out['cache'].shape[:3] + (slots,) + out['cache'].shape[4:], np.float32)
  cache[:, :, :, :16] = out['cache']
  got = [out['token']]
  for j in range(1, steps):
    positions = lengths + j - 1
    out = tf1('decode_step', cache=cache, tokens=got[-1], positions=positions,
              step=np.full(B, j, np.int32), **rows)
    cache[np.arange(B), :, :, positions] = out['kv']
    got.append(out['token'])
  return np.stack(got, 1)


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
@pytest.mark.parametrize('sampling', SAMPLING, ids=['greedy', 'sampled'])
def test_step_signatures_return_the_tokens_of_generate(exported, loaded, sampling):
  run, _ = exported
  _, tf1 = loaded
  ids = [run.tokenizer.encode(p) or [run.tokenizer.eos_id] for p in PROMPTS]
  # No stop tokens in the reference: every row runs all WIDTH steps.
  want, _ = decode.decode_jit(
      run.params, *decode.left_pad(ids, 16, 0), WIDTH, sampling.get('temperature', 0.0),
      sampling.get('top_k', 0), sampling.get('top_p', 1.0), sampling.get('seed', 0),
      graphdef=run.graphdef, width=WIDTH, stop_ids=(), pad_id=0)
  np.testing.assert_array_equal(_step_by_step(tf1, ids, WIDTH, sampling,
                                                run.model_cfg.max_len), np.asarray(want))


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_score_and_tokenizer_signatures(exported, loaded):
  run, _ = exported
  _, tf1 = loaded
  tok = run.tokenizer
  got = tf1('tokenize', text=np.array(PROMPTS[:2], dtype=object))
  ids = [tok.encode(p) for p in PROMPTS[:2]]
  assert [row[:n].tolist() for row, n in zip(got['tokens'], got['lengths'])] == ids
  text = tf1('detokenize', tokens=got['tokens'], lengths=got['lengths'])['text']
  assert [t.decode() for t in text] == [tok.decode(i) for i in ids]
  scored = tf1('score', tokens=got['tokens'])
  want = jax.jit(decode.score, static_argnames='graphdef')(
      run.params, got['tokens'], graphdef=run.graphdef)
  for key in ('logprobs', 'top_logprobs'):
    np.testing.assert_allclose(scored[key], want[key], atol=1e-4)
  np.testing.assert_array_equal(scored['top_tokens'][:, 1:, 0], want['top_tokens'][:, 1:, 0])
  bad = np.array([[5, run.model_cfg.vocab_size]], np.int32)
  with pytest.raises(tf.errors.InvalidArgumentError, match='outside the vocabulary'):
    tf1('score', tokens=bad)


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_bad_requests_are_errors_not_garbage(exported, loaded):
  run, _ = exported
  tf2, tf1 = loaded
  max_len, vocab = run.model_cfg.max_len, run.model_cfg.vocab_size
  too_long = np.full((1, max_len), 5, np.int32)
  bad = [
      (too_long, np.array([max_len], np.int32), 'longer than the model context'),
      (np.array([[5, vocab]], np.int32), np.array([2], np.int32), 'outside the vocabulary'),
      (np.array([[5, -1]], np.int32), np.array([2], np.int32), 'below 0'),
      (np.array([[5, 6]], np.int32), np.array([3], np.int32), 'exceeds the prompt width'),
      (np.array([[5, 6]], np.int32), np.array([0], np.int32), 'at least one token'),
  ]
  for tokens, lengths, message in bad:
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      tf2.signatures['serving_default'](
          tokens=tf.constant(tokens), lengths=tf.constant(lengths),
          **{k: tf.constant(v) for k, v in _scalars().items()})
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      tf1('serving_default', tokens=tokens, lengths=lengths, **_scalars())
  text = ' '.join(map(str, range(max_len)))  # Digits split: > max_len tokens.
  with pytest.raises(tf.errors.InvalidArgumentError, match='longer than the model'):
    tf1(export.TEXT_SIGNATURE, text=np.array([text], dtype=object), **_scalars())


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_warmup_requests_parse_and_run(exported, loaded):
  run, out = exported
  _, tf1 = loaded
  path = os.path.join(out, 'assets.extra', warmup.WARMUP_FILE)
  seen = []
  for record in tf.data.TFRecordDataset(path):
    # The official TF Serving protos, as TF Serving reads them at load time.
    request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
    signature = request.model_spec.signature_name
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    seen.append((signature, (inputs['tokens'] if 'tokens' in inputs else inputs['text']).shape))
    tf1(signature, **inputs)  # TF Serving runs each at load time.
  prompt_buckets = export.default_prompt_buckets(run.model_cfg.max_len)
  assert seen == ([('serving_default', (b, p)) for b in (1, 3) for p in prompt_buckets]
                  + [(export.TEXT_SIGNATURE, (b,)) for b in (1, 3)])


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_export_layout_and_info(exported):
  run, out = exported
  assert os.path.exists(os.path.join(out, 'assets', 'tokenizer.model'))
  with open(os.path.join(out, 'assets', 'tokenizer.model'), 'rb') as f:
    assert f.read() == run.tokenizer.model_bytes
  with open(os.path.join(out, 'assets.extra', export.INFO_FILE)) as f:
    info = json.load(f)
  assert info['max_new_tokens'] == WIDTH and info['step'] == run.step
  # What a Session.Run client feeds and fetches, named in the export's JSON.
  tensors = info['signature_tensors']
  assert set(tensors) == {'serving_default', export.TEXT_SIGNATURE, 'prefill',
                          'decode_step', 'score', 'tokenize', 'detokenize'}
  assert set(info['signatures']) == set(tensors)
  cfg = run.model_cfg
  assert info['cache'] == {'layers': cfg.num_layers, 'kv_heads': cfg.num_kv_heads,
                           'head_dim': cfg.head_dim, 'slots': cfg.max_len,
                           'dtype': 'float32'}
  assert info['chat_template'] == run.config.sft.template
  assert info['eos_id'] == run.tokenizer.eos_id
  assert set(tensors['serving_default']['inputs']) == {
      'tokens', 'lengths', 'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed'}
  assert all(':' in name for sig in tensors.values() for side in sig.values()
             for name in side.values())
  # Nothing half-written is left beside the export.
  assert os.listdir(os.path.dirname(out)) == ['1']


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_int8_export_is_smaller_and_close(exported, tmp_path):
  run, out = exported
  q_out = str(tmp_path / 'int8')
  info = export.export(run.workdir, q_out, quantize='int8', max_new_tokens=WIDTH,
                       platforms=('cpu',), batch_buckets=(1,), eval_batches=2,
                       log=lambda *_: None)
  assert info['param_bytes'] < 0.3 * info['param_bytes_float32']
  assert export.dir_bytes(os.path.join(q_out, 'variables')) < 0.4 * export.dir_bytes(
      os.path.join(out, 'variables'))
  ppl = info['perplexity']
  assert abs(ppl['int8'] / ppl['float32'] - 1) < 0.05, ppl
  # The in-graph dequantisation gives the tokens of the dequantised JAX params.
  specs, arrays, treedef = quantize.flatten_params(run.params, 'int8')
  deq = quantize.unflatten_params(specs, arrays, treedef)
  prompts = [run.tokenizer.encode('def main(')]
  want = decode.decode_jit(deq, *decode.left_pad(prompts, 16, 0), 8, 0.0, 0, 1.0, 0,
                           graphdef=run.graphdef, width=WIDTH,
                           stop_ids=decode.stop_ids(run), pad_id=0)
  tokens, lengths = decode.left_pad(prompts, 16, 0)
  loaded = tf.saved_model.load(q_out)
  generate = lambda: loaded.signatures['serving_default'](
      tokens=tf.constant(tokens), lengths=tf.constant(lengths),
      **{k: tf.constant(v) for k, v in _scalars(max_new=8).items()})['tokens'].numpy()
  # Float32 copies start empty (nothing on disk) and fill on the first call,
  # which then empties the stored leaves. Four concurrent first calls (one
  # fills under the lock, the others wait) all answer; the window in which a
  # call without the lock would read emptied leaves is too narrow to hit here.
  assert not loaded.float_params_ready.numpy()
  assert all(tf.size(v).numpy() == 0 for v in loaded.float_params)
  answers = [None] * 4
  threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, generate()))
             for i in range(len(answers))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for got in answers:
    np.testing.assert_array_equal(got, np.asarray(want[0]))
  assert loaded.float_params_ready.numpy()
  assert info['dequantize'] == 'once'
  assert (sum(4 * int(tf.size(v)) for v in loaded.float_params)
          == info['param_bytes_float32'] == info['served_param_bytes'])
  assert all(tf.size(v).numpy() == 0 for v in loaded.params)
  # Later calls read the copies (dequantising every call made decode_step
  # 3.5x slower than float32's, docs/compression.md#speed).
  np.testing.assert_array_equal(generate(), np.asarray(want[0]))
  # The step signatures through the session loader (TF Serving's and Go's
  # path) fill their copies too and give the dequantised params' tokens.
  ids = [run.tokenizer.encode(p) or [run.tokenizer.eos_id] for p in PROMPTS[:3]]
  want = decode.decode_jit(deq, *decode.left_pad(ids, 16, 0), WIDTH, 0.0, 0, 1.0, 0,
                           graphdef=run.graphdef, width=WIDTH, stop_ids=(), pad_id=0)
  tf1 = _Tf1Model(q_out)
  try:
    got = _step_by_step(tf1, ids, WIDTH, {}, run.model_cfg.max_len)
  finally:
    tf1.sess.close()
  np.testing.assert_array_equal(got, np.asarray(want[0]))


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_int4_export_is_smaller_and_answers_like_its_jax_twin(exported, tmp_path):
  run, out = exported
  q_out = str(tmp_path / 'int4')
  # every_call: no float32 copies (the int8 test covers the default, once).
  info = export.export(run.workdir, q_out, quantize='int4', group_size=32,
                       max_new_tokens=WIDTH, platforms=('cpu',), batch_buckets=(1,),
                       eval_batches=2, dequantize='every_call', log=lambda *_: None)
  assert info['dequantize'] == 'every_call'
  assert info['served_param_bytes'] == info['param_bytes']
  # Blocks: 4 bits a weight plus a float32 scale per 32; the embedding and
  # LM head (57% of this tiny model) int8; norms float32.
  assert info['param_bytes'] < 0.23 * info['param_bytes_float32']
  assert info['int4_group_size'] == 32 and not info['int4_embeddings']
  formats = info['formats']
  assert (formats['int4']['param_bytes'] == info['param_bytes'] <
          formats['int8']['param_bytes'] < formats['float32']['param_bytes'])
  ppl = info['perplexity']
  assert abs(ppl['int4'] / ppl['float32'] - 1) < 0.1, ppl
  # The in-graph unpacking gives the tokens of the dequantised JAX params.
  specs, arrays, treedef = quantize.flatten_params(run.params, 'int4', 32)
  deq = quantize.unflatten_params(specs, arrays, treedef)
  prompts = [run.tokenizer.encode(p) or [run.tokenizer.eos_id] for p in PROMPTS[:3]]
  tokens, lengths = decode.left_pad(prompts, 16, 0)
  want = decode.decode_jit(deq, tokens, lengths, 10, 0.0, 0, 1.0, 0,
                           graphdef=run.graphdef, width=WIDTH,
                           stop_ids=decode.stop_ids(run), pad_id=decode.pad_id_of(run))
  loaded = tf.saved_model.load(q_out)
  got = loaded.signatures['serving_default'](
      tokens=tf.constant(tokens), lengths=tf.constant(lengths),
      **{k: tf.constant(v) for k, v in _scalars(max_new=10).items()})
  np.testing.assert_array_equal(got['tokens'].numpy(), np.asarray(want[0]))
  np.testing.assert_array_equal(got['counts'].numpy(), np.asarray(want[1]))
  assert any(v.dtype == tf.uint8 for v in loaded.params)  # Packed nibbles.
  assert not hasattr(loaded, 'float_params')


def test_export_without_checkpoint_is_a_clear_error(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='no complete checkpoint'):
    export.export(str(tmp_path / 'run'), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  proc = subprocess.run(
      [sys.executable, '-m', 'llm_jax.export', f'--workdir={tmp_path / "run"}',
       f'--out={tmp_path / "out"}'], capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'no complete checkpoint' in proc.stderr


def test_export_over_its_own_run_is_refused_and_the_run_kept(tmp_path):
  """The defect: --out=RUN --overwrite once deleted the run it exported."""
  run = tmp_path / 'run'
  (run / 'checkpoints' / '20').mkdir(parents=True)
  (run / 'checkpoints' / '20' / 'commit_success.txt').write_text('ok')
  (run / 'config.json').write_text('{}')
  before = sorted((p, p.read_bytes()) for p in run.rglob('*') if p.is_file())
  proc = subprocess.run(
      [sys.executable, '-m', 'llm_jax.export', f'--workdir={run}', f'--out={run}',
       '--overwrite'], capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert proc.returncode == 2, proc.stderr[-2000:]
  # One line of ours (TF's C++ start-up chatter may come before it).
  err = proc.stderr.strip().splitlines()
  assert err[-1].startswith('error: ') and 'is or holds' in err[-1], err
  assert sum(l.startswith('error') for l in err) == 1 and 'Traceback' not in proc.stderr
  after = sorted((p, p.read_bytes()) for p in run.rglob('*') if p.is_file())
  assert after == before and sorted(os.listdir(tmp_path)) == ['run']


@pytest.mark.slow  # Trains and exports once for the module: ~2-4 min on 2 cores.
def test_a_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
  run, _ = exported

  def broken_save(module, path, signatures=None):
    del module, signatures
    with open(os.path.join(path, 'saved_model.pb'), 'wb') as f:
      f.write(b'half')
    raise OSError('disk full')

  monkeypatch.setattr(tf.saved_model, 'save', broken_save)
  with pytest.raises(OSError, match='disk full'):
    export.export(run.workdir, str(tmp_path / 'out' / '1'), log=lambda *_: None)
  assert os.listdir(tmp_path / 'out') == []


# Compiles the decode loop through TensorFlow's XLA the way a loaded SavedModel
# runs it (an XlaCallModule op, compiled on demand), with and without the
# flattened kernels, and reports the loop fusions that contain a dot.
_FUSED_DOTS = r'''
import glob, re, sys
import numpy as np
from flax import nnx
from jax.experimental import jax2tf
from llm_jax.core.tfhost import tf
from llm_jax.inference import decode
from llm_jax.model import transformer as model
sys.path.insert(0, 'tests')
from test_decode import STYLES, TINY
graphdef, params = nnx.split(model.Transformer(model.ModelConfig(**TINY, **STYLES['llama']),
                                               rngs=nnx.Rngs(0)))
variables = tf.nest.map_structure(tf.Variable, nnx.to_pure_dict(params))
flatten = decode._flatten_kernels
for name, fix in (('flat', flatten), ('control', lambda model: None)):
  decode._flatten_kernels = fix
  fn = lambda p, t, l: decode.decode_tokens(p, t, l, 4, 0.0, 0, 1.0, 0, graphdef=graphdef,
                                            width=4)
  tf.function(jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=('cpu',)),
              autograph=False)(variables, tf.ones((1, 5), tf.int32), tf.constant([5]))
  hlo = open(max(glob.glob(sys.argv[1] + '/*after_optimizations.txt'),
                 key=lambda f: int(re.search(r'module_(\d+)', f).group(1)))).read()
  fused = [c for c in hlo.split('\n\n') if c.startswith('%fused_computation')]
  print(name, sum(' dot(' in c for c in fused))
'''


def test_the_served_decode_loop_runs_its_projections_as_library_dots(tmp_path):
  """The defect: the SavedModel generated at 0.5x JAX's tokens/s at batch 1.

  Inside the decode loop, TensorFlow's XLA:CPU fused the reshape of each 3-D
  projection kernel ([D, N, H] -> [D, N*H]) into the one-row product and
  emitted a naive dot, 4-8x slower than its library dot
  (docs/performance.md#decode-at-batch-1-the-savedmodel-against-jax).
  ``decode._flatten_kernels`` reshapes the kernels once, before the loop.
  """
  proc = subprocess.run(
      [sys.executable, '-c', _FUSED_DOTS, str(tmp_path)], capture_output=True, text=True,
      timeout=300, env={**os.environ, 'PYTHONPATH': os.getcwd(),
                        'XLA_FLAGS': f'--xla_dump_to={tmp_path} --xla_dump_hlo_as_text '
                                     '--xla_dump_hlo_pass_re=NONE'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = dict(line.split() for line in proc.stdout.splitlines())
  assert counts['flat'] == '0', counts
  # Without the reshape before the loop, q, k, v and o of both layers fuse:
  # the check above can see the slow form.
  assert int(counts['control']) >= 8, counts
