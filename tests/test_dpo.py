"""DPO and ORPO: parity with TRL's own loss code, LoRA as the reference, learning.

The parity tests export one tiny model (and a perturbed reference) to Hugging
Face LLaMA with llm_jax.interchange.hf, run TRL 1.16's DPO loss
(``DPOTrainer._compute_loss``, with its fused log-prob head) and ORPO loss
(``ORPOTrainer.odds_ratio_loss`` on ``get_batch_logps``) on the same pairs,
and compare the loss, the logged rewards and the gradient of every policy
weight with ours.
"""

import collections
import math
import types

import jax
import numpy as np
import pytest
from flax import nnx

from llm_jax.core import configuration
from llm_jax.interchange import hf
from llm_jax.model import transformer as model_lib
from llm_jax.training import objectives, sharding, trainer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
trl = pytest.importorskip('trl')
from trl.trainer import dpo_trainer  # noqa: E402  pylint: disable=g-import-not-at-top
from trl.experimental.orpo import orpo_trainer  # noqa: E402  pylint: disable=g-import-not-at-top

V, T = 64, 24  # Vocabulary and row length of the parity batch.
# (prompt length, chosen length, rejected length) of each pair, end-of-text included.
SHAPES = ((5, 7, 4), (9, 3, 6), (3, 12, 10))


def _tiny(seed: int, like=None):
  c = configuration.load_preset('tiny').model
  cfg = model_lib.ModelConfig.from_config(c, vocab_size=V, max_len=T + 1)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                        nnx.to_pure_dict(abstract))
  if like is not None:  # A reference near the policy: log-ratios of order 1.
    params = jax.tree.map(lambda a, b: a + 0.25 * b, like, params)
  return cfg, graphdef, params


def _pairs():
  """Our batch (pair keys, right-padded) and TRL's (chosen rows, then rejected)."""
  rng = np.random.default_rng(1)
  ours = {k: np.zeros((len(SHAPES), T), np.int32) for k in
          ('inputs', 'targets', 'rejected_inputs', 'rejected_targets')}
  ours.update(weights=np.zeros((len(SHAPES), T), np.float32),
              rejected_weights=np.zeros((len(SHAPES), T), np.float32))
  ids_rows, completion_rows = [[], []], [[], []]
  for row, (p, c, r) in enumerate(SHAPES):
    prompt = rng.integers(1, V, p)
    for side, (prefix, n) in enumerate((('', c), ('rejected_', r))):
      ids = np.concatenate([prompt, rng.integers(1, V, n)])
      ours[prefix + 'inputs'][row, :len(ids) - 1] = ids[:-1]
      ours[prefix + 'targets'][row, :len(ids) - 1] = ids[1:]
      ours[prefix + 'weights'][row, p - 1:len(ids) - 1] = 1
      ids_rows[side].append(ids)
      completion_rows[side].append(np.r_[np.zeros(p), np.ones(n)])
  rows = ids_rows[0] + ids_rows[1]
  completion = completion_rows[0] + completion_rows[1]
  L = max(map(len, rows))
  pad = lambda xs: torch.tensor(np.stack([np.pad(x, (0, L - len(x))) for x in xs]))
  theirs = {'input_ids': pad(rows).long(),
            'attention_mask': pad([np.ones(len(x)) for x in rows]).long(),
            'completion_mask': pad(completion).long()}
  return ours, theirs


def _hf_model(cfg, params):
  config = transformers.LlamaConfig(**{k: v for k, v in hf.hf_config(cfg, 'llama').items()
                                       if k not in ('architectures', 'model_type')})
  model = transformers.LlamaForCausalLM(config)
  tensors = hf.params_to_hf('llama', params, cfg)
  model.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=True)
  return model.float()


def _our_grads(objective, graphdef, params, ref_params, batch):
  def loss_fn(p):
    ref = nnx.merge(graphdef, ref_params) if ref_params is not None else None
    return objective.loss(nnx.merge(graphdef, p), ref, batch)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _hf_grads_as_ours(model, cfg):
  grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
  return hf.params_from_hf('llama', grads, cfg)


def _assert_trees_close(ours, theirs, atol):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0],
                          jax.tree.leaves(theirs)):
    np.testing.assert_allclose(np.asarray(a), b, atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _trl_dpo(policy, ref, inputs, *, beta, loss_types, loss_weights, label_smoothing):
  """TRL's DPOTrainer._compute_loss on one batch, with the trainer's state faked."""
  add = dpo_trainer.add_fused_lm_head
  add(policy, outputs=('log_probs', 'entropy', 'mean_logits', 'is_top1'))
  add(ref)
  accel = types.SimpleNamespace(device=torch.device('cpu'), gather=lambda x: x,
                                gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)
  fake = types.SimpleNamespace(
      model=policy, ref_model=ref, accelerator=accel, aux_loss_enabled=False,
      ld_alpha=None, precompute_ref_logps=False, f_divergence_type='reverse_kl',
      args=types.SimpleNamespace(gradient_checkpointing_kwargs=None), beta=beta,
      loss_types=loss_types, loss_weights=loss_weights, label_smoothing=label_smoothing,
      use_weighting=False, _metrics={'train': collections.defaultdict(list)},
      _total_train_tokens=0, _tp_size=1)
  policy.train()
  loss = dpo_trainer.DPOTrainer._compute_loss(fake, policy, inputs, False)  # pylint: disable=protected-access
  loss.backward()
  return float(loss), {k: v[-1] for k, v in fake._metrics['train'].items()}  # pylint: disable=protected-access


@pytest.mark.parametrize('loss_type, label_smoothing', [
    ('sigmoid', 0.0), ('sigmoid', 0.2), ('ipo', 0.0)])
def test_dpo_loss_rewards_and_gradient_equal_trl(loss_type, label_smoothing):
  cfg, graphdef, params = _tiny(0)
  _, _, ref_params = _tiny(1, like=params)
  ours, theirs = _pairs()
  beta = 0.3
  objective = objectives.Dpo(beta=beta, label_smoothing=label_smoothing,
                             loss_type=loss_type)
  (loss, m), grads = _our_grads(objective, graphdef, params, ref_params, ours)
  # TRL 1.16's 'sigmoid' has no label smoothing; conservative DPO is its
  # 'sigmoid' and 'robust' losses combined: 2(1-e) sigmoid - (1-2e) robust.
  e = label_smoothing
  types_, weights = (([loss_type], [1.0]) if not e else
                     (['sigmoid', 'robust'], [2 * (1 - e), -(1 - 2 * e)]))
  policy, ref = _hf_model(cfg, params), _hf_model(cfg, ref_params)
  trl_loss, trl_m = _trl_dpo(policy, ref, theirs, beta=beta, loss_types=types_,
                             loss_weights=weights, label_smoothing=e)
  assert abs(float(m['margin'])) > 0.05  # The policy and reference do differ.
  np.testing.assert_allclose(float(loss), trl_loss, atol=1e-5, rtol=0)
  for ours_key, trl_key in (('chosen_reward', 'rewards/chosen'),
                            ('rejected_reward', 'rewards/rejected'),
                            ('margin', 'rewards/margins'),
                            ('accuracy', 'rewards/accuracies')):
    np.testing.assert_allclose(float(m[ours_key]), trl_m[trl_key], atol=1e-5, rtol=0,
                               err_msg=ours_key)
  _assert_trees_close(grads, _hf_grads_as_ours(policy, cfg), atol=1e-5)


def test_orpo_loss_rewards_and_gradient_equal_trl():
  cfg, graphdef, params = _tiny(0)
  ours, theirs = _pairs()
  beta = 0.25
  (loss, m), grads = _our_grads(objectives.Orpo(beta=beta), graphdef, params, None, ours)
  policy = _hf_model(cfg, params)
  policy.train()
  logits = policy(input_ids=theirs['input_ids'],
                  attention_mask=theirs['attention_mask']).logits
  labels = theirs['input_ids'].masked_fill(theirs['completion_mask'] == 0, -100)
  fake = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(
      device=torch.device('cpu')))
  logps = orpo_trainer.ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
  n = len(SHAPES)
  losses, chosen, rejected, _, _ = orpo_trainer.ORPOTrainer.odds_ratio_loss(
      fake, logps[:n], logps[n:])
  # The NLL over the chosen responses (TRL's also covers the prompt; ORPO's
  # paper and we do not): the HF model's own loss with the prompt masked.
  shift = lambda x: x[:n, 1:].reshape(-1)
  nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, V), shift(labels),
                                          ignore_index=-100)
  trl_loss = nll - losses.mean()
  trl_loss.backward()
  np.testing.assert_allclose(float(loss), float(trl_loss), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(m['nll']), float(nll), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(m['chosen_reward']), float(chosen.mean()), atol=1e-6)
  np.testing.assert_allclose(float(m['rejected_reward']), float(rejected.mean()), atol=1e-6)
  _assert_trees_close(grads, _hf_grads_as_ours(policy, cfg), atol=1e-5)


def test_dpo_with_lora_as_reference_starts_at_log_2(tiny_config):
  config = tiny_config(data__source='preference', lora__rank=4)
  config.objective = 'dpo'
  config.train.batch_size = 8
  # One device: compiling for the 8 simulated ones would take most of the time.
  tr = trainer.Trainer.build(config, V, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state = tr.init_fn()
  assert state.ref_params is None  # The base is the reference: no copy held.
  ours, _ = _pairs()
  batch = {k: np.tile(v, (3, 1))[:8] for k, v in ours.items()}
  batch = {k: np.pad(v, ((0, 0), (0, config.data.seq_len - T))) for k, v in batch.items()}
  _, m = tr.step_fn(state, sharding.global_batch(batch, tr.batch_sharding))
  # Adapters start at zero, so the policy is its reference: every log-ratio is
  # 0 (up to the order XLA sums in, as the two passes fuse differently).
  assert float(m['loss']) == pytest.approx(math.log(2), abs=1e-6)
  assert abs(float(m['margin'])) < 1e-6 and float(m['grad_norm']) > 0


@pytest.mark.slow  # Two compiles; the figures for configs/base.py are in docs/alignment.md.
def test_lora_reference_needs_no_copy_and_less_memory(tiny_config):
  from llm_jax.training import aot  # pylint: disable=g-import-not-at-top
  reports = {}
  for rank in (0, 8):
    config = tiny_config(data__source='preference', lora__rank=rank)
    config.objective = 'dpo'
    reports[rank] = aot.dry_run(config)
  full, lora = reports[0], reports[8]
  # The frozen copy is a second set of parameters; LoRA's reference is its base.
  assert full['reference_bytes'] == full['params_bytes'] and lora['reference_bytes'] == 0
  assert lora['peak_bytes'] < full['peak_bytes'] - full['reference_bytes']


@pytest.mark.slow
def test_dpo_makes_held_out_chosen_responses_likelier_than_the_sft_start(
    colour_sft_run, tmp_path):
  import colours  # pylint: disable=g-import-not-at-top
  from llm_jax import train  # pylint: disable=g-import-not-at-top
  from llm_jax.evaluation import pairs  # pylint: disable=g-import-not-at-top
  from llm_jax.runs import init_from, workdir  # pylint: disable=g-import-not-at-top
  config = init_from.config_from(
      colour_sft_run, configuration.load_preset(configuration.CONFIGS_DIR / 'dpo.py'),
      with_template=True)
  config.data.update(paths=colours.write_pairs(tmp_path / 'pairs.jsonl', n=300),
                     cache_dir=str(tmp_path / 'cache'))
  config.optim.update(learning_rate=5e-4, warmup_steps=5)
  config.train.update(steps=50, batch_size=16, eval_every=50, eval_batches=8,
                      num_samples=0)
  config.checkpoint.every = 50
  result = train.run(config, str(tmp_path / 'dpo'))
  assert result['val_history'][0] == pytest.approx(math.log(2), abs=1e-5)
  assert result['val_accuracy'] >= 0.9 and result['val_margin'] > 0.1, result
  heldout = colours.write_pairs(tmp_path / 'heldout.jsonl', n=64, seed=7)
  quiet = dict(log=lambda *_: None)
  before = pairs.evaluate_preferences(workdir.load(colour_sft_run), heldout, **quiet)
  after = pairs.evaluate_preferences(workdir.load(str(tmp_path / 'dpo')), heldout, **quiet)
  # Measured (docs/alignment.md): 0.69 -> 1.00, margin 0.35 -> 5.5 nats.
  assert after['logp_accuracy'] >= before['logp_accuracy'] + 0.2, (before, after)
  assert after['logp_margin'] > before['logp_margin'] + 1.0, (before, after)
  assert after['reward_accuracy'] >= 0.9, after
