"""GRPO's rollouts: sample completions from the policy in training, reward them, batch them.

At every step, ``Rollouts`` takes this step's prompts (a pure function of
``(seed, step)``, as every batch of the trainer is), repeats each
``rl.num_generations`` (G) times and samples the completions with
``decode.decode_tokens`` on the train state's own parameters: one jitted
call, sharded like the train step (rows over the batch axes), so no copy of
the weights ever reaches the host. The sampling seed is a pure function of
``(seed, step)`` too, so a resumed run draws exactly the completions an
uninterrupted one would.

Each completion's reward comes from a Python function (``rl.reward``,
``module:function`` called as ``function(prompt, completion, row)``) or from
a reward model's score. Advantages are normalised within each prompt's group:
``(r - mean) / (std + 1e-4)`` (TRL's default). The batch that the train step
gets (``llm_jax/data/batch.py``) holds prompt + completion rows, right-padded,
with ``weights`` on the completion's targets (the end-of-text that closed it
included) and the advantage and reward broadcast over the row. The train
step recomputes the log-probs (``objectives.Grpo``).
"""

import dataclasses
import importlib
import importlib.util
import math
import numbers
import os
from collections.abc import Callable, Sequence

from flax import nnx
import jax
import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import pipeline
from llm_jax.data.preference import Prompt
from llm_jax.inference import decode

ADVANTAGE_EPS = 1e-4
# Mixed into the rollout seed so it never equals the data order's.
_ROLLOUT_STREAM = 0x67727030


def rollout_seed(seed: int, step: int) -> int:
  """The int32 sampling seed of ``step``'s rollouts: a pure function of both."""
  state = np.random.SeedSequence([seed, step, _ROLLOUT_STREAM]).generate_state(1)
  return int(state[0] & 0x7FFFFFFF)


def load_reward_function(spec: str) -> Callable:
  """``module:function`` or ``path/to/file.py:function`` as a callable."""
  module_name, _, name = spec.rpartition(':')
  if not module_name or not name:
    raise UserError(f'rl.reward={spec!r} must be module:function (or '
                    'path/to/file.py:function).')
  try:
    if module_name.endswith('.py'):
      path = os.path.abspath(module_name)
      if not os.path.isfile(path):
        raise FileNotFoundError(path)
      loader = importlib.util.spec_from_file_location(
          os.path.splitext(os.path.basename(path))[0], path)
      module = importlib.util.module_from_spec(loader)
      loader.loader.exec_module(module)
    else:
      module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'rl.reward={spec!r}: cannot import {module_name} '
                    f'({type(e).__name__}: {e}); it must be importable from '
                    f'{os.getcwd()} or a path to a .py file.') from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise UserError(f'rl.reward={spec!r}: {module_name} has no function {name!r}.')
  return fn


def _check_reward(value, what: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise UserError(f'{what} returned {value!r}; a reward must be a finite number.')
  if not math.isfinite(float(value)):
    raise UserError(f'{what} returned {float(value)}; a reward must be a finite number.')
  return float(value)


@dataclasses.dataclass(frozen=True)
class FunctionReward:
  """Rewards from ``rl.reward``: ``function(prompt, completion, row) -> float``."""
  spec: str
  fn: Callable

  @classmethod
  def load(cls, spec: str) -> 'FunctionReward':
    return cls(spec, load_reward_function(spec))

  def __call__(self, prompts: Sequence[Prompt], completions: Sequence[list[int]],
               texts: Sequence[str], step: int) -> np.ndarray:
    del completions
    out = []
    for p, text in zip(prompts, texts):
      what = f'rl.reward={self.spec} on the prompt at {p.where} (step {step})'
      try:
        value = self.fn(p.row['prompt'], text, p.row)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f'{what} raised {type(e).__name__}: {e}. Fix the function; '
                        'the step was not trained.') from None
      out.append(_check_reward(value, what))
    return np.asarray(out, np.float32)


@dataclasses.dataclass(frozen=True)
class ModelReward:
  """Rewards from a reward model: its score of prompt + completion.

  ``score_fn(tokens [B, L] int32, lengths [B] int32) -> [B]`` reads the
  reward at each row's last token, as the reward model was trained to.
  """
  name: str
  score_fn: Callable
  max_len: int

  @classmethod
  def from_run(cls, name: str, run) -> 'ModelReward':
    """The reward model of a loaded run (``llm_jax.runs.workdir.Run``)."""
    score = jax.jit(lambda p, t, n: nnx.merge(run.graphdef, p).score(t, n - 1))
    return cls(name, lambda t, n: score(run.params, t, n), run.model_cfg.max_len)

  def __call__(self, prompts: Sequence[Prompt], completions: Sequence[list[int]],
               texts: Sequence[str], step: int) -> np.ndarray:
    del texts
    rows = [list(p.ids) + list(c) for p, c in zip(prompts, completions)]
    if max(map(len, rows)) > self.max_len:
      raise UserError(f'rl.reward_model={self.name}: a prompt and completion of '
                      f'{max(map(len, rows))} tokens exceed its context of '
                      f'{self.max_len}; lower rl.max_new_tokens or data.seq_len.')
    tokens = np.zeros((len(rows), self.max_len), np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)] = ids
    lengths = np.asarray([len(ids) for ids in rows], np.int32)
    rewards = np.asarray(self.score_fn(tokens, lengths), np.float32)
    for p, value in zip(prompts, rewards):
      _check_reward(value, f'rl.reward_model={self.name} on the prompt at {p.where} '
                    f'(step {step})')
    return rewards


def group_advantages(rewards: np.ndarray, group: int) -> np.ndarray:
  """``(r - mean) / (std + eps)`` within consecutive groups of ``group`` rows."""
  r = rewards.reshape(-1, group).astype(np.float64)
  std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else np.zeros_like(r)
  return ((r - r.mean(axis=1, keepdims=True)) / (std + ADVANTAGE_EPS)).reshape(-1)


def make_sampler(graphdef, unroll: Callable, params_sharding, batch_sharding, *,
                 width: int, stop_ids: tuple[int, ...], pad_id: int,
                 temperature: float) -> Callable:
  """``sample(params, tokens, lengths, seed) -> (tokens_BW, counts_B)``, jitted.

  ``params`` are the train state's, sharded as it holds them (``unroll``
  turns scanned blocks into layers, inside the jit); prompt rows are split
  over the batch axes like a train batch, and the results replicated so every
  host reads every row.
  """
  rows_sharding = jax.sharding.NamedSharding(batch_sharding.mesh,
                                             jax.sharding.PartitionSpec(batch_sharding.spec[0]))
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())

  def sample(params, tokens_BP, lengths_B, seed, temperature_now):
    return decode.decode_tokens(
        unroll(params), tokens_BP, lengths_B, width, temperature_now, 0, 1.0, seed,
        graphdef=graphdef, width=width, stop_ids=stop_ids, pad_id=pad_id)

  jitted = jax.jit(sample, in_shardings=(params_sharding, batch_sharding, rows_sharding,
                                         replicated, replicated),
                   out_shardings=(replicated, replicated))

  def run(params, tokens_BP, lengths_B, seed, greedy=False):
    put = lambda x, s: jax.make_array_from_process_local_data(s, x)
    out, counts = jitted(params, put(tokens_BP, batch_sharding),
                         put(lengths_B, rows_sharding), np.int32(seed),
                         np.float32(0.0 if greedy else temperature))
    return np.asarray(out), np.asarray(counts)

  return run


@dataclasses.dataclass
class Rollouts:
  """GRPO's batches: call with the current train state for the next step's.

  Args (fields):
    prompts: the training prompts (``preference.PromptData.train``).
    val_prompts: held-out prompts, scored greedily by ``evaluate``.
    tokenizer: the policy's.
    sampler: ``make_sampler``'s function.
    reward: a ``FunctionReward`` or ``ModelReward``.
    group: G, completions per prompt.
    rows: completions per step on this host (``train.batch_size`` over hosts).
    seq_len, max_new_tokens: the row length and the longest completion.
    seed, step: the data seed and the step the next call serves.
    template_tail: the chat template's text after ``{content}``, removed from
      a completion's end before the reward function sees it.
  """
  prompts: Sequence[Prompt]
  val_prompts: Sequence[Prompt]
  tokenizer: object
  sampler: Callable
  reward: Callable
  group: int
  rows: int
  seq_len: int
  max_new_tokens: int
  seed: int
  step: int
  template_tail: str = ''
  process_index: int = 0
  process_count: int = 1
  eval_prompts: int = 0

  def _complete(self, params, prompts: Sequence[Prompt], seed: int, greedy: bool):
    """(completion ids with their end-of-text, completion texts) per prompt."""
    width = self.seq_len - self.max_new_tokens
    tokens, lengths = decode.left_pad([p.ids for p in prompts], width,
                                      max(self.tokenizer.pad_id, 0))
    out, counts = self.sampler(params, tokens, lengths, seed, greedy=greedy)
    lo = self.process_index * len(prompts)  # Replicated out: this host's rows.
    ids, texts = [], []
    for r in range(len(prompts)):
      n = int(counts[lo + r])
      completion = out[lo + r, :n].tolist()
      text = self.tokenizer.decode(completion)
      if self.template_tail and text.endswith(self.template_tail):
        text = text[:-len(self.template_tail)]
      texts.append(text)
      # Fewer tokens than allowed: the end-of-text stopped it (and is learnt).
      ids.append(completion + ([self.tokenizer.eos_id] if n < self.max_new_tokens else []))
    return ids, texts

  def _rows(self, prompts, completions, advantages, rewards) -> dict:
    """Right-padded prompt + completion rows of the batch contract."""
    T = self.seq_len
    out = {k: np.zeros((len(prompts), T), np.int32) for k in ('inputs', 'targets')}
    out.update({k: np.zeros((len(prompts), T), np.float32)
                for k in ('weights', 'advantages', 'rewards')})
    for r, (p, c) in enumerate(zip(prompts, completions)):
      full = list(p.ids) + c
      n = len(full) - 1
      out['inputs'][r, :n], out['targets'][r, :n] = full[:-1], full[1:]
      out['weights'][r, len(p.ids) - 1:n] = 1.0
    out['advantages'][:] = np.asarray(advantages, np.float32)[:, None]
    out['rewards'][:] = np.asarray(rewards, np.float32)[:, None]
    return out

  def __call__(self, state) -> dict:
    """This host's batch for ``self.step``, sampled from ``state.params``."""
    step = self.step
    idx = pipeline.batch_indices(step, global_batch=self.rows * self.process_count // self.group,
                                 num_windows=len(self.prompts), seed=self.seed,
                                 process_index=self.process_index,
                                 process_count=self.process_count)
    prompts = [self.prompts[i] for i in idx for _ in range(self.group)]
    completions, texts = self._complete(state.params, prompts,
                                        rollout_seed(self.seed, step), greedy=False)
    rewards = self.reward(prompts, completions, texts, step)
    self.step += 1
    return self._rows(prompts, completions, group_advantages(rewards, self.group), rewards)

  def evaluate(self, params, step: int) -> dict:
    """Mean reward of greedy completions of the held-out prompts."""
    chosen = list(self.val_prompts[:self.eval_prompts or None])
    rewards, lengths = [], []
    for lo in range(0, len(chosen), self.rows):
      real = chosen[lo:lo + self.rows]
      batch = real + [real[-1]] * (self.rows - len(real))  # A fixed shape.
      completions, texts = self._complete(params, batch, 0, greedy=True)
      rewards += list(self.reward(real, completions[:len(real)], texts[:len(real)], step))
      lengths += [len(c) for c in completions[:len(real)]]
    return {'val_reward': float(np.mean(rewards)), 'val_prompts': len(chosen),
            'val_completion_length': float(np.mean(lengths))}
