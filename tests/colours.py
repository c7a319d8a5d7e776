"""A generated alignment task: say the colour the question states.

"What color is the apple? It is red." is answered "The apple is red.". The
SFT data can be noisy (some answers name the next colour instead), the
preference pairs prefer the right colour over another, and the GRPO prompts
carry the right answer for an exact-match reward. tests/test_preference.py,
tests/test_grpo.py and benchmarks/alignment.py use it.
"""

import json
import random

COLOURS = ['red', 'green', 'blue', 'black', 'white', 'yellow', 'purple', 'orange']
THINGS = ['apple', 'car', 'house', 'bird', 'shirt', 'door', 'cup', 'book', 'lamp',
          'chair', 'boat', 'kite']


def _question(rng):
  thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
  return thing, colour, f'What color is the {thing}? It is {colour}.'


def wrong(colour: str) -> str:
  """The colour a noisy answer names instead: the next one in the list."""
  return COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]


def _write(path, rows):
  with open(path, 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(path)


def write_sft(path, n=240, seed=0, noise=0.0):
  """SFT pairs; a share ``noise`` of the answers names ``wrong(colour)``."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    thing, colour, prompt = _question(rng)
    said = wrong(colour) if rng.random() < noise else colour
    rows.append({'prompt': prompt, 'response': f'The {thing} is {said}.'})
  return _write(path, rows)


def write_pairs(path, n=300, seed=1):
  """Preference pairs: the stated colour over ``wrong(colour)``."""
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    thing, colour, prompt = _question(rng)
    chosen, rejected = f'The {thing} is {colour}.', f'The {thing} is {wrong(colour)}.'
    if i % 2:  # Both JSONL forms: strings, and chat messages.
      rows.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
    else:
      rows.append({'prompt': [{'role': 'user', 'content': prompt}],
                   'chosen': [{'role': 'assistant', 'content': chosen}],
                   'rejected': [{'role': 'assistant', 'content': rejected}]})
  return _write(path, rows)


def write_prompts(path, n=300, seed=2):
  """GRPO prompts with the answer an exact match wants."""
  rng = random.Random(seed)
  rows = []
  for _ in range(n):
    thing, colour, prompt = _question(rng)
    rows.append({'prompt': prompt, 'answer': f'The {thing} is {colour}.'})
  return _write(path, rows)


def exact_answer(prompt, completion, row) -> float:
  """1 if the completion is the answer (surrounding space aside), else 0."""
  del prompt
  return float(completion.strip() == row['answer'])


def length_reward(prompt, completion, row) -> float:
  """A reward that varies between samples (tests of mechanics, not learning)."""
  del prompt, row
  return len(completion) / 10.0


def raising_reward(prompt, completion, row) -> float:
  del prompt, completion
  return 1.0 / len(row['no_such_field'])


def nan_reward(prompt, completion, row) -> float:
  del prompt, completion, row
  return float('nan')
