"""Preference metrics of a trained run on held-out pairs (``evaluate --preferences``).

The pairs are JSONL lines of ``{"prompt", "chosen", "rejected"}``
(``llm_jax/data/preference.py``), rendered with the run's own template and
tokenizer. What is measured depends on the run:

* a reward model: ``reward_accuracy`` (the chosen response scored above the
  rejected one) and ``reward_margin`` (the mean score difference);
* a DPO run: the same for its implicit reward ``beta * log pi/ref`` against
  its reference (the frozen copy in its checkpoint, or with LoRA the base);
  an ORPO run for ``beta`` times the mean response log-prob;
* every decoder run (SFT, DPO, ORPO, pre-training): ``logp_accuracy`` and
  ``logp_margin``, the policy's own preference (summed response log-probs),
  which needs no reference and so compares an SFT start with its alignment.
"""

import functools

import jax

from llm_jax.core.errors import UserError
from llm_jax.data import preference
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training import objectives, steps, trainer


def _metrics(run, objective, batches, prefix: str) -> dict:
  fn = jax.jit(functools.partial(steps.pair_eval_step, graphdef=run.graphdef,
                                 objective=objective))
  out = trainer.pair_metrics([fn(run.params, run.ref_params, b) for b in batches])
  return {f'{prefix}_{k.removeprefix("val_").removesuffix("_reward")}': v
          for k, v in out.items() if k not in ('val_loss', 'val_pairs', 'val_nll')}


def evaluate_preferences(run, paths: str, *, batch_size: int | None = None,
                         log=print) -> dict:
  """Reward and log-prob accuracy and margins of ``run`` on the pairs at ``paths``.

  Raises:
    UserError: no pairs, a malformed line (file:line), or no tokenizer.
  """
  tokenizer = workdir_lib.require_tokenizer(run)
  if not run.model_cfg.causal:
    raise UserError('--preferences needs a decoder run (an encoder does not '
                    'score responses).')
  rows = preference.rows_of(preference.read_pairs(paths), run.config, tokenizer, log,
                            'pairs')
  if not len(rows['inputs']):
    raise UserError(f'No pair of {paths} has a response token within the run\'s '
                    f'data.seq_len={run.config.data.seq_len}.')
  batches = preference.eval_batches(rows, global_batch=batch_size or
                                    run.config.train.batch_size)
  name = objectives.objective_of(run.config)
  out = {'preferences': paths, 'pairs': int(len(rows['inputs'])), 'objective': name}
  if name in ('reward', 'dpo', 'orpo'):
    out.update(_metrics(run, objectives.from_config(run.config), batches, 'reward'))
  if name != 'reward':
    out.update(_metrics(run, objectives.LogProbPreference(), batches, 'logp'))
  return out
