"""Alignment data: preference pairs (reward model, DPO, ORPO) and prompts (GRPO).

Pairs: each JSONL line is ``{"prompt": P, "chosen": C, "rejected": R}``. ``P``
is a string (one user message) or a list of ``{"role", "content"}`` messages;
``C`` and ``R`` are a string (one assistant message) or a list of messages
(the turn(s) that answer ``P``). Both sides are rendered with
``config.sft.template`` exactly as SFT renders a conversation
(``llm_jax/data/sft.py``): the prompt's tokens are the same in both, and the
weight of a target is 1 only in the response's assistant content (and the
template text after it) and on the end-of-text that closes it.

Rows follow the batch contract's pair keys (``llm_jax/data/batch.py``): the
chosen side in ``inputs``/``targets``/``weights``, the rejected side in
``rejected_*``, one pair per row, padded on the right. A side longer than
``data.seq_len + 1`` tokens keeps its start (it is *cut*); a pair with a side
that keeps no response token is *dropped*. Both are counted and logged. The
held-out split is by prompt (its hash), so a held-out prompt was never seen
in training, with any response.

Prompts: each JSONL line is ``{"prompt": P, ...}``; ``P`` as above. The
rendered prompt ends with the assistant's header (the template's text before
``{content}``), so the policy continues as the assistant. The whole line goes
to the reward function with each completion (e.g. an ``"answer"`` to check).

Batches are a pure function of ``(seed, step)`` (``pipeline.batch_indices``),
as in pre-training and SFT: resume is exact.
"""

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np

from llm_jax.core.errors import UserError
from llm_jax.data import batch as batch_lib
from llm_jax.data import clean, pipeline, sft, sources
from llm_jax.data import tokenizer as tokenizer_lib

Log = Callable[[str], None]
PAIR_FORM = ('{"prompt": ..., "chosen": ..., "rejected": ...} (each a string, or a '
             'list of {"role": str, "content": str} messages)')


# ---- Reading JSONL.


def _load_line(line: str, where: str) -> dict:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise UserError(f'{where} is not valid JSON ({e.msg}).') from None
  if not isinstance(obj, dict):
    raise UserError(f'{where}: expected a JSON object, got {type(obj).__name__}.')
  return obj


def _as_messages(value, role: str, where: str, key: str) -> list[dict]:
  """A string as one ``role`` message, or a checked list of messages."""
  if isinstance(value, str):
    return [{'role': role, 'content': value}]
  ok = isinstance(value, list) and value and all(
      isinstance(m, dict) and isinstance(m.get('role'), str)
      and isinstance(m.get('content'), str) for m in value)
  if not ok:
    raise UserError(f'{where}: "{key}" must be a string or a non-empty list of '
                    '{"role": str, "content": str} messages.')
  return [{'role': m['role'], 'content': m['content']} for m in value]


def parse_pair(line: str, where: str) -> dict:
  """``{'prompt', 'chosen', 'rejected'}`` message lists of one JSONL line."""
  obj = _load_line(line, where)
  missing = [k for k in ('prompt', 'chosen', 'rejected') if k not in obj]
  if missing:
    raise UserError(f'{where}: missing {", ".join(map(json.dumps, missing))}; a '
                    f'preference line is {PAIR_FORM}.')
  pair = {'prompt': _as_messages(obj['prompt'], 'user', where, 'prompt')}
  for key in ('chosen', 'rejected'):
    pair[key] = _as_messages(obj[key], sft.ASSISTANT, where, key)
    if not any(m['role'] == sft.ASSISTANT for m in pair[key]):
      raise UserError(f'{where}: "{key}" has no {sft.ASSISTANT!r} message: '
                      'nothing to prefer.')
  return pair


def _jsonl_lines(paths: str, source: str) -> Iterator[tuple[str, str]]:
  """(line, 'file:line') of every non-blank line of the JSONL globs."""
  for path in sources.expand_globs(paths, source):
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          yield line, f'{path}:{n}'


def read_pairs(paths: str) -> list[dict]:
  """Every pair of the JSONL globs (see ``parse_pair``)."""
  pairs = [parse_pair(line, where) for line, where in _jsonl_lines(paths, 'preference')]
  if not pairs:
    raise UserError(f'data.paths={paths!r} holds no preference pairs; give JSONL '
                    f'files of {PAIR_FORM} lines.')
  return pairs


# ---- Rendering and rows.


def render_pair(pair: dict, template: str, tokenizer) -> tuple[tuple, tuple]:
  """``((ids, weights) chosen, (ids, weights) rejected)``: only responses weigh."""
  n = len(pair['prompt'])
  return tuple(sft.render(pair['prompt'] + pair[side], template, tokenizer, learn_from=n)
               for side in ('chosen', 'rejected'))


def pair_rows(rendered: list[tuple[tuple, tuple]], seq_len: int, *,
              pad_id: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Rows ``[R, seq_len]`` of the pair keys, and counts of cut/dropped pairs."""
  kept, cut, dropped = [], 0, 0
  for sides in rendered:
    if any(len(ids) > seq_len + 1 for ids, _ in sides):
      cut += 1
      sides = tuple((ids[:seq_len + 1], w[:seq_len + 1]) for ids, w in sides)
    if all(w[1:].any() for _, w in sides):
      kept.append(sides)
    else:
      dropped += 1  # A response cut away entirely: nothing to compare.
  shape = (len(kept), seq_len)
  out = {'inputs': np.full(shape, pad_id, np.int32),
         'targets': np.zeros(shape, np.int32), 'weights': np.zeros(shape, np.float32),
         'rejected_inputs': np.full(shape, pad_id, np.int32),
         'rejected_targets': np.zeros(shape, np.int32),
         'rejected_weights': np.zeros(shape, np.float32)}
  for r, sides in enumerate(kept):
    for prefix, (ids, w) in zip(('', 'rejected_'), sides):
      n = len(ids) - 1
      out[prefix + 'inputs'][r, :n] = ids[:-1]
      out[prefix + 'targets'][r, :n] = ids[1:]
      out[prefix + 'weights'][r, :n] = w[1:]
  return batch_lib.check(out, 'preference rows'), {'cut': cut, 'dropped': dropped}


def _fixed_batches(rows: dict, *, global_batch: int, num_batches: int,
                   process_index: int, process_count: int, zero: tuple[str, ...]):
  """Every row once (wrapping round to fill); repeated rows get 0 in ``zero``."""
  num_rows = len(rows['inputs'])
  per_host = global_batch // process_count
  lo = process_index * per_host
  if num_batches <= 0:
    num_batches = -(-num_rows // global_batch)
  num_batches = min(num_batches, -(-num_rows // global_batch))
  batches = []
  for k in range(num_batches):
    positions = k * global_batch + lo + np.arange(per_host)
    batch = {key: v[positions % num_rows] for key, v in rows.items()}
    for key in zero:  # Rows repeated only to fill the last batch count nothing.
      batch[key] = batch[key] * (positions < num_rows)[:, None]
    batches.append(batch)
  return batches


@dataclasses.dataclass(frozen=True)
class PreferenceData:
  """Pair rows for training and validation, and what checkpoints record."""
  tokenizer: tokenizer_lib.Tokenizer
  train_rows: dict
  val_rows: dict
  manifest: dict

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_windows(self) -> int:
    """Training pairs per epoch (the name the training log uses)."""
    return len(self.train_rows['inputs'])

  def train_batches(self, *, global_batch: int, seed: int, start_step: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless batches for steps ``start_step, ...``: this host's pairs."""
    step = start_step
    while True:
      idx = pipeline.batch_indices(step, global_batch=global_batch,
                                   num_windows=self.num_windows, seed=seed,
                                   process_index=process_index,
                                   process_count=process_count)
      yield {k: v[idx] for k, v in self.train_rows.items()}
      step += 1

  def eval_batches(self, *, global_batch: int, num_batches: int,
                   process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Fixed validation batches: every held-out pair once (0: all of them)."""
    return eval_batches(self.val_rows, global_batch=global_batch,
                        num_batches=num_batches, process_index=process_index,
                        process_count=process_count)


def eval_batches(rows: dict, *, global_batch: int, num_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """Batches holding each pair of ``rows`` once; filler pairs weigh nothing."""
  return _fixed_batches(rows, global_batch=global_batch, num_batches=num_batches,
                        process_index=process_index, process_count=process_count,
                        zero=('weights', 'rejected_weights'))


def _tokenizer(config):
  if not config.tokenizer.path:
    raise UserError(f'objective={config.objective!r} reads conversations and needs '
                    'the tokenizer of the model it starts from: set init_from (its '
                    'tokenizer.model is used) or --config.tokenizer.path.')
  return tokenizer_lib.load(config.tokenizer.path)


def rows_of(pairs: list[dict], config, tokenizer, log: Log, name: str) -> dict:
  """Rendered, truncated pair rows of ``pairs``, with a log line of the counts."""
  seq_len = config.data.seq_len
  rendered = [render_pair(p, config.sft.template, tokenizer) for p in pairs]
  rows, counts = pair_rows(rendered, seq_len, pad_id=max(tokenizer.pad_id, 0))
  log(f'Preference {name}: {len(rows["inputs"])} pairs in rows of {seq_len} tokens '
      f'({counts["cut"]} cut to data.seq_len+1 tokens, {counts["dropped"]} dropped: '
      'a response with no token left; raise data.seq_len to keep them).')
  return rows


def prepare(config, log: Log = logging.info) -> PreferenceData:
  """Reads, renders and splits ``data.paths`` into pair rows (held out by prompt)."""
  tokenizer = _tokenizer(config)
  pairs = read_pairs(config.data.paths)
  by_prompt = {}
  for p in pairs:
    by_prompt.setdefault(json.dumps(p['prompt'], sort_keys=True, ensure_ascii=False),
                         []).append(p)
  train_keys, val_keys = clean.split_by_hash(list(by_prompt), config.data.val_fraction)
  if not val_keys:
    raise UserError(f'No held-out prompt among {len(by_prompt)}: raise '
                    '--config.data.val_fraction or add pairs.')
  splits = {}
  for name, keys in (('train', train_keys), ('val', val_keys)):
    splits[name] = rows_of([p for k in keys for p in by_prompt[k]], config,
                           tokenizer, log, name)
    if not len(splits[name]['inputs']):
      raise UserError(f'No {name} pair has a response token within data.seq_len='
                      f'{config.data.seq_len}; raise it.')
  content = hashlib.sha256(json.dumps(
      [pairs, config.sft.template, config.data.seq_len, config.data.val_fraction],
      sort_keys=True).encode()).hexdigest()
  manifest = {'content_sha256': content, 'pairs': len(pairs),
              'tokenizer_sha256': tokenizer.sha256}
  return PreferenceData(tokenizer=tokenizer, train_rows=splits['train'],
                        val_rows=splits['val'], manifest=manifest)


# ---- Prompts for on-policy RL.


def render_prompt(messages: list[dict], template: str, tokenizer) -> list[int]:
  """Token ids of ``messages`` then the assistant's header: where a reply starts.

  Pieces are encoded as ``sft.render`` encodes them, so a prompt plus a reply
  is tokenized as the same conversation would be in SFT.
  """
  ids, _ = sft.render(messages, template, tokenizer)
  head = template.replace('{role}', sft.ASSISTANT).split('{content}')[0]
  return ids[:-1].tolist() + (tokenizer.encode(head) if head else [])


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt: its ids, the JSONL line it came from, and where that was."""
  ids: tuple[int, ...]
  row: dict
  where: str


@dataclasses.dataclass(frozen=True)
class PromptData:
  """Training and held-out prompts, and what checkpoints record."""
  tokenizer: tokenizer_lib.Tokenizer
  train: tuple[Prompt, ...]
  val: tuple[Prompt, ...]
  manifest: dict

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_windows(self) -> int:
    """Training prompts per epoch (the name the training log uses)."""
    return len(self.train)


def read_prompts(paths: str, template: str, tokenizer, max_tokens: int,
                 log: Log = logging.info) -> list[Prompt]:
  """Every prompt of the JSONL globs with at most ``max_tokens`` tokens."""
  prompts, too_long = [], 0
  for line, where in _jsonl_lines(paths, 'prompts'):
    obj = _load_line(line, where)
    if 'prompt' not in obj:
      raise UserError(f'{where}: missing "prompt"; a prompt line is {{"prompt": '
                      '..., <any fields the reward function reads>}.')
    ids = render_prompt(_as_messages(obj['prompt'], 'user', where, 'prompt'),
                        template, tokenizer)
    if len(ids) > max_tokens:
      too_long += 1
      continue
    prompts.append(Prompt(ids=tuple(ids), row=obj, where=where))
  if too_long:
    log(f'Warning: {too_long} prompts are longer than {max_tokens} tokens '
        '(data.seq_len - rl.max_new_tokens) and were dropped.')
  if not prompts:
    raise UserError(f'data.paths={paths!r} holds no prompt of at most {max_tokens} '
                    'tokens; give JSONL lines of {"prompt": ...} or raise data.seq_len.')
  return prompts


def prepare_prompts(config, log: Log = logging.info) -> PromptData:
  """Reads ``data.paths`` as prompts and holds some out by their hash."""
  tokenizer = _tokenizer(config)
  max_tokens = config.data.seq_len - config.rl.max_new_tokens
  if max_tokens < 1:
    raise UserError(f'rl.max_new_tokens={config.rl.max_new_tokens} leaves no room for '
                    f'a prompt in data.seq_len={config.data.seq_len}; lower it.')
  prompts = read_prompts(config.data.paths, config.sft.template, tokenizer,
                         max_tokens, log)
  keyed = {json.dumps(p.row, sort_keys=True, ensure_ascii=False): p for p in prompts}
  train_keys, val_keys = clean.split_by_hash(list(keyed), config.data.val_fraction)
  if not val_keys:
    raise UserError(f'No held-out prompt among {len(keyed)}: raise '
                    '--config.data.val_fraction or add prompts.')
  log(f'Prompts: {len(train_keys)} for training, {len(val_keys)} held out '
      f'(at most {max_tokens} tokens each).')
  content = hashlib.sha256(json.dumps(
      [sorted(keyed), config.sft.template, config.data.seq_len,
       config.data.val_fraction]).encode()).hexdigest()
  return PromptData(tokenizer=tokenizer, train=tuple(keyed[k] for k in train_keys),
                    val=tuple(keyed[k] for k in val_keys),
                    manifest={'content_sha256': content, 'prompts': len(keyed),
                              'tokenizer_sha256': tokenizer.sha256})
