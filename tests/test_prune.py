"""Pruning: masks of each pattern, zeros kept through recovery, exact resume, a smaller model.

``random_run`` is configs/tiny.py's model with random weights and a real
tokenizer, written as a run without training (seconds); the slow tests
fine-tune from its pruned copy.
"""

import dataclasses
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from llm_jax import evaluate
from llm_jax import prune as prune_cli
from llm_jax import train
from llm_jax.compression import prune, structured
from llm_jax.core import configuration
from llm_jax.core.errors import UserError
from llm_jax.data import shards
from llm_jax.model.transformer import ModelConfig, Transformer
from llm_jax.runs import init_from
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import checkpoint, sharding, sparsity, trainer


def _tiny(cache_dir) -> ml_collections.ConfigDict:
  c = configuration.load_preset('tiny')
  c.data.cache_dir = str(cache_dir)
  c.data.max_documents = 120
  c.train.eval_every = 0
  c.train.eval_batches = 2
  c.train.num_samples = 0
  c.optim.warmup_steps = 2
  return c


@pytest.fixture(scope='module')
def random_run(tmp_path_factory):
  """(run dir, config): tiny's model, random weights, the tiny tokenizer; untrained."""
  root = tmp_path_factory.mktemp('prune')
  config = _tiny(root / 'cache')
  data = shards.prepare(config, log=lambda *_: None)
  cfg = ModelConfig.from_config(config.model, vocab_size=data.vocab_size,
                                max_len=config.data.seq_len)
  params = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  path = workdir_lib.write(str(root / 'run'), config, params, vocab_size=data.vocab_size,
                           tokenizer=data.tokenizer,
                           source={'test': 'random weights'})
  return path, config


def _cli(args, capsys) -> tuple[int, str]:
  """(exit status, stderr) of ``python -m llm_jax.prune ARGS`` in this process."""
  try:
    prune_cli.main(args)
    code = 0
  except SystemExit as e:
    code = e.code
  return code, capsys.readouterr().err.strip()


# ---- Masks.


def test_each_pattern_removes_what_it_says():
  rng = np.random.default_rng(0)
  kernels = {'blocks/0/mlp/up/kernel': rng.normal(size=(16, 24)).astype(np.float32),
             'blocks/0/attn/o/kernel': rng.normal(size=(2, 4, 16)).astype(np.float32) * 3}
  per_layer = prune.unstructured_masks(kernels, 0.5, 'layer')
  for name, keep in per_layer.items():
    w = np.abs(kernels[name])
    assert keep.sum() == w.size // 2
    assert w[keep].min() >= w[~keep].max()  # The smallest went.
  # Global: one threshold, so the kernel with 3x larger weights keeps more.
  both = prune.unstructured_masks(kernels, 0.5, 'global')
  assert sum(k.sum() for k in both.values()) == sum(w.size for w in kernels.values()) // 2
  assert both['blocks/0/attn/o/kernel'].mean() > 0.8
  # 2:4: in every 4 consecutive inputs of each output, the 2 largest stay.
  for name, keep in prune.n_m_masks(kernels, 2, 4).items():
    w_IO, k_IO = prune.as_matrix(name, np.abs(kernels[name])), prune.as_matrix(name, keep)
    groups_w = w_IO.reshape(-1, 4, w_IO.shape[1])
    groups_k = k_IO.reshape(-1, 4, w_IO.shape[1])
    assert (groups_k.sum(axis=1) == 2).all()
    assert (np.where(groups_k, groups_w, np.inf).min(axis=1) >=
            np.where(groups_k, -np.inf, groups_w).max(axis=1)).all()
  # Rows: whole output channels, the smallest L2 norms.
  keep = prune.row_masks(kernels, 0.25)['blocks/0/mlp/up/kernel']
  assert (keep.all(axis=0) | ~keep.any(axis=0)).all() and (~keep.any(axis=0)).sum() == 6


def test_a_pattern_the_shapes_do_not_allow_names_the_kernel():
  kernels = {'blocks/1/attn/o/kernel': np.ones((2, 3, 8), np.float32)}
  with pytest.raises(UserError, match=r'blocks/1/attn/o/kernel has 6 inputs, not a '
                     'multiple of 4'):
    prune.n_m_masks(kernels, 2, 4)


def test_keep_zeros_holds_zeros_through_adamw_updates():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(8, 8)).astype(np.float32)
  w[w < 0] = 0.0
  params = {'blocks': {0: {'mlp': {'up': {'kernel': jnp.asarray(w)}}}},
            'embed': {'table': jnp.zeros((4, 8))}}  # Not prunable: zeros may change.
  tx = sparsity.keep_zeros(optax.adamw(1e-2, weight_decay=0.1))
  state = tx.init(params)
  for i in range(5):
    grads = jax.tree.map(lambda p, i=i: jnp.full(p.shape, 0.5 + i, jnp.float32), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  up = np.asarray(params['blocks'][0]['mlp']['up']['kernel'])
  np.testing.assert_array_equal(up[w == 0], 0.0)
  assert (up[w != 0] != w[w != 0]).all()
  assert (np.asarray(params['embed']['table']) != 0).all()


def test_keep_masks_shard_like_their_parameters(tiny_config):
  config = tiny_config(prune__keep_zeros=True)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(config.mesh)
  tr = trainer.Trainer.build(config, 256, mesh)
  keep = tr.state_shardings.opt_state.keep
  assert keep['blocks'][0]['mlp']['up']['kernel'] == tr.state_shardings.params[
      'blocks'][0]['mlp']['up']['kernel']
  assert keep['embed']['table'].spec == jax.sharding.PartitionSpec()  # A scalar.


# ---- The command, on a run.


@pytest.mark.parametrize('scope', ['layer', 'global'])
def test_prune_writes_a_run_with_exact_zeros_and_masks(random_run, tmp_path, capsys, scope):
  run_dir, _ = random_run
  out = str(tmp_path / 'pruned')
  assert _cli([f'--workdir={run_dir}', f'--out={out}', '--sparsity=0.5',
               '--targets=mlp/*', f'--scope={scope}'], capsys)[0] == 0
  source, pruned = workdir_lib.load(run_dir), workdir_lib.load(out)
  assert pruned.config.prune.keep_zeros and pruned.meta['source']['pattern'] == 'unstructured'
  masks = load_file(os.path.join(out, prune.MASK_FILE))
  assert sorted(masks) == [f'blocks/{i}/mlp/{n}/kernel' for i in (0, 1)
                           for n in ('down', 'gate', 'up')]
  before = checkpoint.flatten_params(source.params)
  after = checkpoint.flatten_params(pruned.params)
  for name, value in after.items():
    if name in masks:
      assert masks[name].mean() == 0.5 or scope == 'global'
      np.testing.assert_array_equal(np.asarray(value)[~masks[name]], 0.0)
      np.testing.assert_array_equal(np.asarray(value)[masks[name]],
                                    np.asarray(before[name])[masks[name]])
    else:  # Attention, embeddings, head and norms are untouched.
      np.testing.assert_array_equal(value, before[name])
  counts = sparsity.count(pruned.params)
  assert counts['prunable_zeros'] == sum(m.size - m.sum() for m in masks.values())
  assert sum(m.sum() for m in masks.values()) * 2 == sum(m.size for m in masks.values())
  if scope == 'layer':  # evaluate reports the size next to the perplexity.
    results = evaluate.main([f'--workdir={out}', '--eval_batches=1'])
    mlp = sum(m.size for m in masks.values())
    assert results['params'] == pruned.model_cfg.num_params()
    assert results['params_nonzero'] == results['params'] - mlp // 2
    assert results['sparsity'] == pytest.approx(mlp / 2 / counts['prunable_params'])
    assert f'| sparsity | {results["sparsity"]:.4f} |' in capsys.readouterr().out


def test_a_run_from_before_pruning_existed_prunes(random_run, tmp_path, capsys):
  """A config.json without the prune section (trained before it) still loads."""
  old = tmp_path / 'old'
  shutil.copytree(random_run[0], old)
  config = json.loads((old / 'config.json').read_text())
  del config['prune']
  (old / 'config.json').write_text(json.dumps(config))
  assert _cli([f'--workdir={old}', f'--out={tmp_path / "pruned"}', '--pattern=2:4',
               '--targets=blocks/0/mlp/up'], capsys)[0] == 0
  assert workdir_lib.load(str(tmp_path / 'pruned')).config.prune.keep_zeros


@pytest.mark.parametrize('args, message', [
    (['--sparsity=1.0'], '--sparsity=1.0 must be in [0, 1)'),
    (['--sparsity=-0.1', '--pattern=mlp_units'], '--sparsity=-0.1 must be in [0, 1)'),
    (['--pattern=2:5'], 'has 64 inputs, not a multiple of 5'),
    (['--pattern=4:2'], 'is not N:M with 0 < N < M'),
    (['--pattern=blocks', '--sparsity=0.5'], "--pattern='blocks' is not one of"),
    (['--sparsity=0.5', '--targets=mlp/nothing'],
     "--targets='mlp/nothing' matches no prunable kernel"),
    (['--pattern=2:4', '--scope=global'], '--scope=global ranks single weights'),
])
def test_bad_input_is_one_clear_line(random_run, tmp_path, capsys, args, message):
  run_dir, _ = random_run
  code, err = _cli([f'--workdir={run_dir}', f'--out={tmp_path / "out"}', *args], capsys)
  assert code == 2
  assert err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert message in err
  assert not (tmp_path / 'out').exists()


def test_pruning_a_run_that_does_not_exist(tmp_path, capsys):
  code, err = _cli([f'--workdir={tmp_path / "nope"}', f'--out={tmp_path / "out"}',
                    '--sparsity=0.5'], capsys)
  assert code == 2 and 'is not a run directory' in err and len(err.splitlines()) == 1


# ---- Structured: a smaller model.


def _dead(run, params, what):
  """Zeroes the down rows of a quarter of the MLP units, or o[n] of one head per
  KV group, in every block; returns (kept indices [L, .], cut, config changes)."""
  cfg, rng = run.model_cfg, np.random.default_rng(1)
  keep = []
  for layer in sorted(params['blocks']):
    mlp, attn = params['blocks'][layer]['mlp'], params['blocks'][layer]['attn']
    if what == 'mlp_units':
      dead = rng.choice(cfg.mlp_dim, cfg.mlp_dim // 4, replace=False)
      mlp['down']['kernel'][dead] = 0.0
      keep.append(np.setdiff1d(np.arange(cfg.mlp_dim), dead))
    else:
      group = cfg.num_heads // cfg.num_kv_heads
      dead = rng.integers(0, group, cfg.num_kv_heads) + group * np.arange(cfg.num_kv_heads)
      attn['o']['kernel'][dead] = 0.0
      keep.append(np.setdiff1d(np.arange(cfg.num_heads), dead))
  if what == 'mlp_units':
    return (np.stack(keep), 'mlp/down', {('mlp', 'gate'): 1, ('mlp', 'up'): 1,
                                         ('mlp', 'down'): 0},
            {'mlp_dim': cfg.mlp_dim - cfg.mlp_dim // 4})
  return np.stack(keep), 'attn/o', {('attn', 'q'): 1, ('attn', 'o'): 0}, {
      'num_heads': cfg.num_heads - cfg.num_kv_heads}


@pytest.mark.parametrize('what', ['mlp_units', 'heads'])
def test_removing_dead_units_or_heads_leaves_the_function_unchanged(random_run, what):
  """Units (heads) whose output weights are zero score 0, go first, change nothing."""
  run = workdir_lib.load(random_run[0])
  params = jax.tree.map(np.array, run.params)
  keep, layer, cut, changes = _dead(run, params, what)
  tokens = np.random.default_rng(0).integers(0, run.model_cfg.vocab_size, (2, 16))
  scores = structured.input_importance(run, params, [{'inputs': tokens}], layer)
  scores = scores if scores.ndim == 2 else scores.sum(axis=2)  # Heads: sum head_dim.
  for layer_scores, kept in zip(scores, keep):
    assert (np.delete(layer_scores, kept) == 0).all() and (layer_scores[kept] > 0).all()
  smaller = structured._slice(params, keep, cut)  # pylint: disable=protected-access
  small_cfg = dataclasses.replace(run.model_cfg, **changes)
  graphdef = nnx.split(Transformer(small_cfg, rngs=nnx.Rngs(0)))[0]
  forward = jax.jit(lambda p, t, g: nnx.merge(g, p)(t), static_argnums=2)
  want = forward(params, jnp.asarray(tokens), run.graphdef)
  got = forward(smaller, jnp.asarray(tokens), graphdef)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_mlp_units_writes_a_smaller_ordinary_run(random_run, tmp_path, capsys):
  run_dir, _ = random_run
  out = str(tmp_path / 'small')
  assert _cli([f'--workdir={run_dir}', f'--out={out}', '--pattern=mlp_units',
               '--sparsity=0.25', '--calibration_batches=1'], capsys)[0] == 0
  run = workdir_lib.load(out)
  assert run.config.model.mlp_dim == 144 and not run.config.prune.keep_zeros
  assert run.params['blocks'][1]['mlp']['down']['kernel'].shape == (144, 64)
  assert sparsity.count(run.params)['params'] == run.model_cfg.num_params()
  assert not os.path.exists(os.path.join(out, prune.MASK_FILE))


def test_heads_removes_as_many_from_each_kv_group(random_run, tmp_path, capsys):
  run_dir, _ = random_run
  out = str(tmp_path / 'heads')
  code, err = _cli([f'--workdir={run_dir}', f'--out={out}', '--pattern=heads',
                    '--sparsity=0.25', '--calibration_batches=1'], capsys)
  assert code == 2 and 'removes 0 of 2. Use a multiple of 1/2 below 1' in err, err
  assert _cli([f'--workdir={run_dir}', f'--out={out}', '--pattern=heads',
               '--sparsity=0.5', '--calibration_batches=1'], capsys)[0] == 0
  run = workdir_lib.load(out)
  assert run.model_cfg.num_heads == 2 and run.model_cfg.num_kv_heads == 2
  assert run.params['blocks'][0]['attn']['o']['kernel'].shape == (2, 16, 64)


# ---- Recovery fine-tuning through the ordinary trainer.


def _recovery_config(pruned: str, **train):
  c = init_from.config_from(pruned, _tiny(''))
  source = workdir_lib.read_config(pruned)
  c.data.cache_dir, c.data.max_documents = source.data.cache_dir, 120
  c.data.seq_len, c.train.batch_size = 64, 8
  c.train.eval_every, c.train.eval_batches, c.train.num_samples = 0, 2, 0
  c.optim.warmup_steps, c.checkpoint.every = 2, 100
  for key, value in train.items():
    c.train[key] = value
  return c


@pytest.mark.slow  # Three short training runs: ~1-2 min on 2 cores.
def test_recovery_keeps_zeros_and_a_pruned_run_resumes_exactly(random_run, tmp_path, capsys):
  run_dir, _ = random_run
  pruned = str(tmp_path / 'pruned')
  assert _cli([f'--workdir={run_dir}', f'--out={pruned}', '--pattern=2:4'], capsys)[0] == 0
  config = _recovery_config(pruned, steps=6)
  assert config.prune.keep_zeros  # configs/continued.py carries it over.
  whole = train.run(config, str(tmp_path / 'whole'))
  first = train.run(_recovery_config(pruned, steps=6, stop_at=3), str(tmp_path / 'split'))
  assert first['stopped_early'] and first['step'] == 3
  rest = train.run(_recovery_config(pruned, steps=6), str(tmp_path / 'split'))
  assert rest['step'] == whole['step'] == 6
  assert rest['loss_history'] == {s: whole['loss_history'][s] for s in (4, 5, 6)}
  masks = load_file(os.path.join(pruned, prune.MASK_FILE))
  start = checkpoint.flatten_params(workdir_lib.load(pruned).params)
  a = checkpoint.flatten_params(workdir_lib.load(str(tmp_path / 'whole')).params)
  b = checkpoint.flatten_params(workdir_lib.load(str(tmp_path / 'split')).params)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])  # Resumed exactly.
    if name in masks:
      np.testing.assert_array_equal(np.asarray(a[name])[~masks[name]], 0.0)
      assert (np.asarray(a[name])[masks[name]] != np.asarray(start[name])[masks[name]]).all()
  assert sparsity.count(workdir_lib.load(str(tmp_path / 'whole')).params)['sparsity'] == 0.5
