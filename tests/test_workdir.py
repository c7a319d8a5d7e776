"""Reading a finished run back: config, tokenizer, parameters."""

import jax
import numpy as np
import pytest

from llm_jax import train, workdir as workdir_lib
from llm_jax.errors import UserError


def test_load_returns_the_trained_parameters(tmp_path, tiny_config):
  config = tiny_config(train__steps=6, checkpoint__every=3)
  run_dir = str(tmp_path / 'run')
  result = train.run(config, run_dir)
  run = workdir_lib.load(run_dir)
  assert run.step == 6 and run.meta['step'] == 6
  assert run.tokenizer.vocab_size == result['vocab_size'] == run.model_cfg.vocab_size
  assert run.config.train.steps == 6 and run.config.mesh.data == config.mesh.data
  # The loaded parameters give the run's own validation loss.
  from llm_jax import trainer
  from llm_jax.data import pipeline, shards
  data = shards.prepare(config, log=lambda *_: None)
  windows = pipeline.TokenWindows(data.val_shards, data.manifest['dtype'], config.data.seq_len)
  batches = list(pipeline.eval_batches(windows, global_batch=config.train.batch_size,
                                       num_batches=config.train.eval_batches,
                                       process_index=0, process_count=1))
  total = count = 0.0
  for b in batches:
    out = trainer.eval_step(run.params, {k: jax.numpy.asarray(v) for k, v in b.items()},
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
