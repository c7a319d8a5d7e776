"""Reading a finished run back: config, tokenizer, parameters."""

import jax
import numpy as np
import pytest

from llm_jax import train
from llm_jax.runs import workdir as workdir_lib
from llm_jax.core.errors import UserError


def test_load_returns_the_trained_parameters(tmp_path, tiny_config):
  config = tiny_config(train__steps=6, checkpoint__every=3)
  run_dir = str(tmp_path / 'run')
  result = train.run(config, run_dir)
  run = workdir_lib.load(run_dir)
  assert run.step == 6 and run.meta['step'] == 6
  assert run.tokenizer.vocab_size == result['vocab_size'] == run.model_cfg.vocab_size
  assert run.config.train.steps == 6 and run.config.mesh.data == config.mesh.data
  # The loaded parameters give the run's own validation loss.
  from llm_jax.training import steps
  from llm_jax.data import pipeline, shards
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'], config.data.seq_len)
  batches = list(pipeline.eval_batches(windows, global_batch=config.train.batch_size,
                                       num_batches=config.train.eval_batches,
                                       process_index=0, process_count=1))
  total = count = 0.0
  for b in batches:
    out = steps.eval_step(run.params, {k: jax.numpy.asarray(v) for k, v in b.items()},
                            graphdef=run.graphdef)
    total += float(out['loss_sum'])
    count += float(out['count'])
  assert total / count == pytest.approx(result['val_loss'], rel=1e-5)
  earlier = workdir_lib.load(run_dir, step=3)
  assert earlier.step == 3
  assert not np.array_equal(earlier.params['embed']['table'], run.params['embed']['table'])


def test_load_refuses_a_directory_without_a_run(tmp_path):
  with pytest.raises(UserError, match='not a run directory'):
    workdir_lib.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(UserError, match='no complete checkpoint'):
    workdir_lib.load(str(tmp_path))


@pytest.mark.slow  # 10-25 s on 2 cores; runs in CI with the full suite.
def test_a_scanned_run_loads_layer_by_layer(tmp_path, tiny_config):
  """decode, export and convert walk blocks/0, blocks/1, ...: load unstacks."""
  from flax import nnx
  from llm_jax.inference import decode
  from llm_jax.model import transformer as model_lib
  config = tiny_config(train__steps=4, model__scan_layers=True)
  run_dir = str(tmp_path / 'run')
  train.run(config, run_dir)
  run = workdir_lib.load(run_dir)
  assert not run.model_cfg.scan_layers
  assert sorted(run.params['blocks']) == list(range(config.model.num_layers))
  # The unrolled model on the unstacked weights equals the scanned one.
  tokens = jax.numpy.arange(24, dtype=jax.numpy.int32).reshape(2, 12) % run.model_cfg.vocab_size
  unrolled = nnx.merge(run.graphdef, run.params)(tokens)
  scanned_cfg = model_lib.ModelConfig(**{**run.model_cfg.__dict__, 'scan_layers': True})
  graphdef = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(scanned_cfg, rngs=nnx.Rngs(0))))[0]
  scanned = nnx.merge(graphdef, model_lib.stack_blocks(run.params))(tokens)
  np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), atol=1e-5)
  out = decode.generate(run.graphdef, run.params, [[5, 6, 7]], max_new_tokens=4,
                        temperature=0.0, seed=0, max_len=run.model_cfg.max_len,
                        pad_id=run.tokenizer.pad_id, eos_id=-1)
  assert len(out[0]) == 4
