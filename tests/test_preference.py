"""Preference pairs and the reward model: rows, errors, Bradley-Terry, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import colours
from llm_jax import evaluate as evaluate_cli
from llm_jax import train
from llm_jax.core import configuration
from llm_jax.core.errors import UserError
from llm_jax.data import batch as batch_lib
from llm_jax.data import preference, shards
from llm_jax.model import transformer as model_lib
from llm_jax.training import objectives

TEMPLATE = '<|{role}|>\n{content}\n'


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  c = configuration.load_preset('tiny')
  c.data.cache_dir = str(tmp_path_factory.mktemp('cache'))
  c.data.max_documents = 120
  return shards.prepare(c, log=lambda *_: None).tokenizer


def _pair(prompt='What color is the cup? It is red.', chosen='The cup is red.',
          rejected='The cup is green.'):
  return {'prompt': [{'role': 'user', 'content': prompt}],
          'chosen': [{'role': 'assistant', 'content': chosen}],
          'rejected': [{'role': 'assistant', 'content': rejected}]}


def test_rows_share_the_prompt_and_weigh_only_responses(tokenizer):
  (ids_c, w_c), (ids_r, w_r) = preference.render_pair(_pair(), TEMPLATE, tokenizer)
  prompt = tokenizer.encode('<|user|>\n') + tokenizer.encode(
      'What color is the cup? It is red.\n') + tokenizer.encode('<|assistant|>\n')
  assert ids_c[:len(prompt)].tolist() == ids_r[:len(prompt)].tolist() == prompt
  assert not w_c[:len(prompt)].any() and w_c[len(prompt):].all()
  assert tokenizer.decode(ids_c[w_c > 0]) == 'The cup is red.\n'
  assert tokenizer.decode(ids_r[w_r > 0]) == 'The cup is green.\n'
  rows, counts = preference.pair_rows([((ids_c, w_c), (ids_r, w_r))], seq_len=64)
  batch_lib.check(rows)
  assert counts == {'cut': 0, 'dropped': 0}
  n = len(ids_c) - 1
  assert rows['inputs'][0, :n].tolist() == ids_c[:-1].tolist()
  assert rows['rejected_targets'][0, :len(ids_r) - 1].tolist() == ids_r[1:].tolist()
  # The last weighted target is the end-of-text; its input is the last response token.
  last = int(objectives.last_weighted(jnp.asarray(rows['weights']))[0])
  assert last == n - 1 and rows['targets'][0, last] == tokenizer.eos_id


def test_long_pairs_are_cut_or_dropped_and_counted(tokenizer):
  rendered = preference.render_pair(_pair(chosen='The cup is red. ' * 8), TEMPLATE,
                                    tokenizer)
  prompt_len = int(np.argmax(rendered[0][1] > 0))
  _, counts = preference.pair_rows([rendered], seq_len=prompt_len + 4)
  assert counts == {'cut': 1, 'dropped': 0}
  rows, counts = preference.pair_rows([rendered], seq_len=prompt_len - 2)
  assert counts == {'cut': 1, 'dropped': 1} and len(rows['inputs']) == 0


@pytest.mark.parametrize('line, message', [
    ({'prompt': 'Hi', 'chosen': 'Hello'}, r'x\.jsonl:2: missing "rejected"'),
    ({'chosen': 'a', 'rejected': 'b'}, r'x\.jsonl:2: missing "prompt"'),
    ({'prompt': 'Hi', 'chosen': [{'role': 'user', 'content': 'a'}], 'rejected': 'b'},
     r'x\.jsonl:2: "chosen" has no \'assistant\' message'),
    ({'prompt': 'Hi', 'chosen': 3, 'rejected': 'b'}, r'x\.jsonl:2: "chosen" must be a string'),
])
def test_a_malformed_line_names_file_line_and_what(tmp_path, line, message):
  path = tmp_path / 'x.jsonl'
  path.write_text(json.dumps({'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}) + '\n'
                  + json.dumps(line) + '\n')
  with pytest.raises(UserError, match=message):
    preference.read_pairs(str(path))


def test_the_batch_contract_wants_a_whole_pair():
  rows = {k: np.zeros((2, 8), batch_lib.DTYPES[k]) for k in
          ('inputs', 'targets', 'weights', 'rejected_inputs', 'rejected_targets')}
  with pytest.raises(UserError, match=r"missing \['rejected_weights'\]"):
    batch_lib.check(rows)
  rows['rejected_weights'] = np.zeros((2, 8), np.float32)
  assert batch_lib.check(rows) is rows


def test_bradley_terry_reads_the_reward_at_the_last_response_token():
  c = configuration.load_preset('tiny').model
  c.update(num_layers=1, d_model=32, mlp_dim=64)
  cfg = model_lib.ModelConfig.from_config(c, vocab_size=50, max_len=16)
  # Shapes, then numpy values: eager init ops on tiny arrays are what would take time.
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.RewardModel(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                        nnx.to_pure_dict(params))
  batch = {k: rng.integers(1, 50, (4, 16)).astype(np.int32) for k in
           ('inputs', 'targets', 'rejected_inputs', 'rejected_targets')}
  w = np.zeros((4, 16), np.float32)
  for row, last in enumerate((5, 9, 15, 3)):
    w[row, 2:last + 1] = 1
  batch.update(weights=w, rejected_weights=w[::-1].copy())

  @jax.jit
  def loss_and_scores(params, batch):
    model = nnx.merge(graphdef, params)
    loss, m = objectives.RewardModel().loss(model, None, batch)
    r_c = model.score(batch['inputs'], objectives.last_weighted(batch['weights']))
    r_r = model.score(batch['rejected_inputs'],
                      objectives.last_weighted(batch['rejected_weights']))
    return loss, m, r_c, r_r

  loss, m, r_c, r_r = loss_and_scores(params, batch)
  np.testing.assert_allclose(loss, np.mean(np.log1p(np.exp(-(r_c - r_r)))), rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], np.mean(r_c > r_r))
  # Tokens after a response's last token (padding) cannot change its reward.
  changed = dict(batch, inputs=np.where(w > 0, batch['inputs'], 7).astype(np.int32))
  changed['inputs'][:, :2] = batch['inputs'][:, :2]
  np.testing.assert_allclose(loss_and_scores(params, changed)[2], r_c, rtol=1e-6)


@pytest.mark.slow
def test_reward_model_learns_the_rule_and_exports_a_scorer(colour_sft_run, tmp_path,
                                                          command_status):
  config = configuration.load_preset(configuration.CONFIGS_DIR / 'reward.py')
  from llm_jax.runs import init_from  # pylint: disable=g-import-not-at-top
  config = init_from.config_from(colour_sft_run, config, with_template=True)
  config.data.update(paths=colours.write_pairs(tmp_path / 'pairs.jsonl', n=300),
                     cache_dir=str(tmp_path / 'cache'))
  config.optim.update(learning_rate=1e-3, warmup_steps=5)
  config.train.update(steps=80, batch_size=16, eval_every=80, eval_batches=8)
  config.checkpoint.every = 80
  result = train.run(config, str(tmp_path / 'rm'))
  # Held-out prompts: ~0.5 (the head is random) -> 1.0 in 80 steps (figure in
  # docs/alignment.md); the bar leaves room for run-to-run noise.
  assert result['val_accuracy'] >= 0.9, result
  assert result['val_margin'] > 1.0, result

  from llm_jax.core.tfhost import tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from llm_jax.deploy import saved_model  # pylint: disable=g-import-not-at-top
  from llm_jax.runs import workdir  # pylint: disable=g-import-not-at-top
  info = saved_model.export(str(tmp_path / 'rm'), str(tmp_path / 'export'),
                            platforms=('cpu',), batch_buckets=(2,), log=lambda *_: None)
  assert info['signatures'] == ['score', 'score_text', 'serving_default']
  loaded = tf.saved_model.load(str(tmp_path / 'export'))
  prompts = ['What color is the cup? It is blue.'] * 2
  responses = ['The cup is blue.', 'The cup is black.']
  got = loaded.signatures['score_text'](prompt=tf.constant(prompts),
                                        response=tf.constant(responses))['reward'].numpy()
  run = workdir.load(str(tmp_path / 'rm'))
  rendered = [preference.render_pair(
      _pair(p, r, r), run.config.sft.template, run.tokenizer)[0][0][:-1]
      for p, r in zip(prompts, responses)]
  tokens = np.zeros((2, max(map(len, rendered))), np.int32)
  for row, ids in enumerate(rendered):
    tokens[row, :len(ids)] = ids
  lengths = np.array([len(ids) for ids in rendered], np.int32)
  want = np.asarray(jax.jit(lambda p, t, n: nnx.merge(run.graphdef, p).score(t, n - 1))(
      run.params, tokens, lengths))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert got[0] > got[1]  # The right colour is preferred.
  ids_out = loaded.signatures['score'](tokens=tf.constant(tokens),
                                       lengths=tf.constant(lengths))['reward'].numpy()
  np.testing.assert_allclose(ids_out, want, rtol=1e-5, atol=1e-5)
  # An int8 scorer scores as its dequantised params, on its first call and
  # from its float32 copies after.
  from llm_jax.deploy import quantize  # pylint: disable=g-import-not-at-top
  saved_model.export(str(tmp_path / 'rm'), str(tmp_path / 'export8'), quantize='int8',
                     platforms=('cpu',), batch_buckets=(2,), text_signature=False,
                     log=lambda *_: None)
  int8 = tf.saved_model.load(str(tmp_path / 'export8'))
  deq = quantize.unflatten_params(*quantize.flatten_params(run.params, 'int8'))
  want8 = np.asarray(jax.jit(lambda p, t, n: nnx.merge(run.graphdef, p).score(t, n - 1))(
      deq, tokens, lengths))
  for _ in range(2):
    got8 = int8.signatures['score'](tokens=tf.constant(tokens),
                                    lengths=tf.constant(lengths))['reward'].numpy()
    np.testing.assert_allclose(got8, want8, rtol=1e-5, atol=1e-5)
  assert int8.float_params_ready.numpy()

  heldout = colours.write_pairs(tmp_path / 'heldout.jsonl', n=64, seed=7)
  assert command_status(evaluate_cli.main, [f'--workdir={tmp_path / "rm"}',
                                            f'--preferences={heldout}']) == 0
  (path,) = (tmp_path / 'rm' / 'eval').glob('preferences-*.json')
  scores = json.loads(path.read_text())
  assert scores['pairs'] == 64 and scores['reward_accuracy'] >= 0.9, scores
