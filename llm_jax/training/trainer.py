"""The Trainer: model, optimizer, shardings and the jitted steps, built once.

``Trainer.build(config, vocab_size, mesh)`` turns a config into everything the
loop needs: the model's graph definition, the optimizer, the sharding of every
array of the train state, and the jitted init, train and eval steps
(``llm_jax/training/steps.py``). ``checkpoint_meta`` is what a checkpoint
records besides arrays; ``sample_texts`` the end-of-run samples.
"""

import dataclasses
import functools
import json
import re
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.core.errors import UserError
from llm_jax.inference import decode
from llm_jax.model import cpu_matmul, lora
from llm_jax.model import transformer as model_lib
from llm_jax.model.transformer import ModelConfig, Transformer
from llm_jax.training import fused_adamw, objectives, optim, sharding, sparsity
from llm_jax.training.steps import TrainState, eval_step, pair_eval_step, train_step


@dataclasses.dataclass
class Trainer:
  """Everything the loop needs, built once from the config and the data."""
  config: Any
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  batch_sharding: jax.sharding.NamedSharding
  init_fn: Any
  step_fn: Any
  eval_fn: Any
  objective: Any = None  # llm_jax/training/objectives.py, from config.objective.

  @classmethod
  def build(cls, config, vocab_size: int, mesh) -> 'Trainer':
    model_cfg = ModelConfig.from_config(
        config.model, vocab_size=vocab_size, max_len=config.data.seq_len)
    _check_train_config(config, mesh)
    cpu_matmul.warn_if_bf16_is_emulated(model_cfg.compute_dtype)
    schedule = optim.learning_rate_schedule(config.optim, config.train.steps)
    tx = make_tx(config)
    rules = config.mesh.rules
    objective = objectives.from_config(config)
    # A frozen reference copy, unless LoRA's base serves (adapters off).
    frozen_copy = objective.needs_reference and not lora.enabled(config)

    def init_fn():
      model = _make_model(config, model_cfg, config.seed)
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=tx.init(params),
                        rng=jax.random.key_data(jax.random.key(config.seed)),
                        ref_params=jax.tree.map(jnp.copy, params) if frozen_copy else None)

    # Shapes first (no memory), then shardings from the parameters' logical
    # axes, then init directly into those shardings: no device ever holds a
    # full copy of a sharded parameter.
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: _make_model(config, model_cfg, 0)))
    names = sharding.param_names(abstract_params)
    sharding.check_divisible(nnx.to_pure_dict(abstract_params), names, mesh, rules)
    p_shard = sharding.tree_shardings(names, mesh, rules)
    abstract = jax.eval_shape(init_fn)
    rep = sharding.replicated(mesh)
    state_shardings = TrainState(
        step=rep, params=p_shard, rng=rep,
        opt_state=(lora.opt_state_shardings(abstract.opt_state, p_shard, mesh)
                   if lora.enabled(config) else
                   sharding.opt_state_shardings(tx, abstract.opt_state, p_shard, mesh)),
        ref_params=p_shard if frozen_copy else None)
    batch_shard = sharding.batch_sharding(mesh, rules)
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                             accum_steps=config.optim.grad_accum_steps,
                             objective=objective,
                             fused_update=fused_adamw.make_update(config, schedule, mesh))
    if objective.is_pairwise:  # Reference (or None) beside the parameters.
      eval_fn = jax.jit(functools.partial(pair_eval_step, graphdef=graphdef,
                                          objective=objective),
                        in_shardings=(p_shard, state_shardings.ref_params, batch_shard),
                        out_shardings=rep)
    else:
      eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef,
                                          loss_chunk=config.train.loss_chunk),
                        in_shardings=(p_shard, batch_shard), out_shardings=rep)
    return cls(
        config=config, model_cfg=model_cfg, mesh=mesh, graphdef=graphdef, tx=tx,
        schedule=schedule, state_shardings=state_shardings, batch_sharding=batch_shard,
        init_fn=jax.jit(init_fn, out_shardings=state_shardings),
        step_fn=jax.jit(step, in_shardings=(state_shardings, batch_shard),
                        out_shardings=(state_shardings, rep), donate_argnums=0),
        eval_fn=eval_fn, objective=objective)

  def unrolled(self, params) -> tuple[ModelConfig, Any, Any]:
    """(model config, graphdef, params) of the same model layer by layer.

    Decoding, export and conversion walk ``blocks/0``, ``blocks/1``, ...; a
    run with ``model.scan_layers`` holds its blocks stacked, so they are
    unstacked here (the same weights). Unscanned models pass through.
    """
    if not self.model_cfg.scan_layers:
      return self.model_cfg, self.graphdef, params
    model_cfg = dataclasses.replace(self.model_cfg, scan_layers=False)
    graphdef = nnx.split(nnx.eval_shape(
        lambda: _make_model(self.config, model_cfg, 0)))[0]
    return model_cfg, graphdef, model_lib.unstack_blocks(params)

  def abstract_state(self) -> TrainState:
    shapes = jax.eval_shape(self.init_fn)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, self.state_shardings)

  def evaluate(self, params, batches: list[dict], ref_params=None) -> dict:
    """Mean validation loss and perplexity over fixed batches.

    Preference objectives report their pair loss, reward accuracy (chosen
    above rejected) and mean margin instead of a perplexity; GRPO has no
    batches here (its held-out reward is ``io.extra_eval``).
    """
    if self.objective is not None and self.objective.is_pairwise:
      return pair_metrics([self.eval_fn(params, ref_params, b) for b in batches])
    if not batches:
      return {}
    totals = [self.eval_fn(params, b) for b in batches]
    loss_sum = sum(float(t['loss_sum']) for t in totals)
    count = sum(float(t['count']) for t in totals)
    loss = loss_sum / count
    out = {'val_loss': loss, 'val_ppl': float(np.exp(min(loss, 50)))}
    if not self.model_cfg.causal:
      # The encoder's metric: how often the masked token is the argmax.
      out['val_accuracy'] = sum(float(t['correct']) for t in totals) / count
    return out


def make_tx(config) -> optax.GradientTransformation:
  """The run's optimizer: ``config.optim``'s, on adapters only with LoRA,
  holding pruned weights at zero with ``prune.keep_zeros``."""
  tx = optim.make_optimizer(config.optim, config.train.steps)
  if lora.enabled(config):  # Only the adapters are trained (and have state).
    tx = lora.optimizer(tx)
  if sparsity.keeps_zeros(config):
    tx = sparsity.keep_zeros(tx)
  return tx


def pair_metrics(totals: list[dict]) -> dict:
  """``val_*`` means of ``pair_eval_step`` sums over several batches."""
  total = {k: sum(float(t[k]) for t in totals) for k in totals[0]}
  n = max(total['count'], 1.0)
  out = {'val_loss': total['loss_sum'] / n, 'val_accuracy': total['correct'] / n,
         'val_margin': total['margin_sum'] / n, 'val_chosen_reward': total['chosen_sum'] / n,
         'val_rejected_reward': total['rejected_sum'] / n, 'val_pairs': total['count']}
  if 'nll_sum' in total:  # ORPO: its loss is the odds-ratio term plus this NLL.
    out['val_nll'] = total['nll_sum'] / max(total['nll_count'], 1.0)
    out['val_loss'] += out['val_nll']
  return out


def _make_model(config, model_cfg: ModelConfig, seed: int) -> Transformer:
  """The model ``config.objective`` trains (a Transformer, or one with a head),
  with LoRA adapters where ``config.lora`` asks for them."""
  model = model_lib.model_class(objectives.objective_of(config))(model_cfg, rngs=nnx.Rngs(seed))
  return lora.apply(model, config.lora, seed) if lora.enabled(config) else model


# Keys whose values have a floor, with what the value means (for the message).
_AT_LEAST = (
    ('train.steps', 1, 'optimizer updates in the whole run'),
    ('train.batch_size', 1, 'sequences per step'),
    ('train.log_every', 1, 'steps between progress lines'),
    ('train.eval_every', 0, 'steps between evals; 0: at the end only'),
    ('train.eval_batches', 1, 'batches per eval'),
    ('train.stop_at', 0, 'the step to stop after; 0: off'),
    ('train.max_nan_skips', 0, 'skipped updates in a row before halting'),
    ('train.num_samples', 0, 'samples printed at the end'),
    ('train.loss_chunk', 0, 'positions per loss chunk; 0: all at once'),
    ('optim.warmup_steps', 0, 'steps of linear warmup'),
    ('optim.grad_accum_steps', 1, 'micro-batches per update'),
    ('checkpoint.every', 0, 'steps between saves; 0: only the last step'),
    ('checkpoint.keep', 1, 'checkpoints kept'),
    ('checkpoint.keep_every', 0, "every N-th step's checkpoint kept forever; 0: off"),
    ('data.seq_len', 1, 'tokens per training window'),
    ('data.max_documents', 0, 'documents read; 0: all'),
    ('data.num_threads', 1, 'tokenizer threads'),
)


def check_config(config) -> None:
  """Refuses values that cannot work, before a run creates or reads anything.

  What needs the data (the vocabulary) or the devices (the mesh) is checked
  later, in ``Trainer.build``; this catches the rest at once, naming the key.

  Raises:
    UserError: naming the first bad key, its value and what it must be.
  """
  for key, low, meaning in _AT_LEAST:
    section, name = key.split('.')
    value = config[section][name]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise UserError(f'{key}={value!r} must be an integer of at least {low} '
                      f'({meaning}). Set --config.{key}=...')
  if not 0 < config.data.val_fraction < 1:
    raise UserError(f'data.val_fraction={config.data.val_fraction!r} must be between '
                    '0 and 1 (the share of documents held out for validation).')
  optim.learning_rate_schedule(config.optim, config.train.steps)
  # The model's keys, with the configured vocabulary size standing in for the
  # tokenizer's and one label for a classifier's label set, which the task
  # data gives later (Trainer.build checks again with the real ones).
  model = config.model.copy_and_resolve_references()
  if model.head == 'classification':
    model.num_labels = max(model.num_labels, 1)
  ModelConfig.from_config(model, vocab_size=max(config.tokenizer.vocab_size, 1),
                          max_len=config.data.seq_len)
  _check_train_config(config, mesh=None)


def _check_train_config(config, mesh) -> None:
  """Refuses train settings that cannot work, before anything is compiled."""
  if sparsity.keeps_zeros(config) and lora.enabled(config):
    raise UserError('prune.keep_zeros and LoRA (lora.rank > 0) do not go together: '
                    'LoRA leaves the pruned kernels frozen anyway, and merging its '
                    'adapters would fill them in. Turn one off.')
  if config.train.nan_policy not in ('halt', 'skip'):
    raise UserError(f"train.nan_policy={config.train.nan_policy!r}: use 'halt' or 'skip'.")
  batch, accum = config.train.batch_size, config.optim.grad_accum_steps
  if accum < 1 or batch % accum:
    raise UserError(f'train.batch_size={batch} must be a multiple of '
                    f'optim.grad_accum_steps={accum} (and that at least 1).')
  if mesh is None:
    return
  ways = sharding.batch_divisor(mesh, config.mesh.rules)
  if (batch // accum) % ways:
    raise UserError(
        f'Each micro-batch ({batch // accum} sequences) must split evenly over '
        f'the {ways} batch shards of the mesh {dict(mesh.shape)}; make '
        f'train.batch_size a multiple of {ways * accum}.')


def checkpoint_meta(config, data, step: int) -> dict:
  """What a checkpoint records besides arrays: enough to refuse a bad resume."""
  import flax, optax as _optax, orbax.checkpoint as _ocp  # pylint: disable=g-import-not-at-top,g-multiple-import
  return {
      'config': json.loads(config.to_json()),
      'step': step,
      'tokenizer_sha256': data.tokenizer.sha256,
      'vocab_size': data.vocab_size,
      'data_sha256': data.manifest['content_sha256'],
      'versions': {'jax': jax.__version__, 'flax': flax.__version__,
                   'optax': _optax.__version__, 'orbax': _ocp.__version__},
      'mesh': dict(zip(sharding.MESH_AXES, sharding.mesh_shape(
          config.mesh, jax.device_count()))),
      'process_count': jax.process_count(),
      'time': time.time(),
  }


def split_prompts(spec: str) -> list[str]:
  """``train.sample_prompts`` as a list: split on '|', except inside ``<|`` and ``|>``."""
  return [p for p in re.split(r'(?<!<)\|(?!>)', spec) if p]


def sample_texts(trainer: Trainer, params, tokenizer, config) -> list[tuple[str, str, str]]:
  """(prompt, greedy continuation, sampled continuation) for each prompt."""
  prompts = split_prompts(config.train.sample_prompts)[:config.train.num_samples]
  if (not prompts or not trainer.model_cfg.causal  # An encoder does not continue text,
      or objectives.objective_of(config) == 'reward'):  # and a reward model scores it.
    return []
  ids = [tokenizer.encode(p) for p in prompts]
  out = []
  _, graphdef, params = trainer.unrolled(params)
  for temperature in (0.0, config.train.sample_temperature):
    new = decode.generate(
        graphdef, params, ids, max_new_tokens=config.train.sample_tokens,
        temperature=temperature, seed=config.seed, max_len=trainer.model_cfg.max_len,
        pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
    out.append([tokenizer.decode(t) for t in new])
  return list(zip(prompts, out[0], out[1]))


