"""Tests of llm_jax/inference/decode.py: the KV cache against full recompute, padding, sampling."""

import jax
import numpy as np
import pytest
from flax import nnx

from llm_jax.inference import decode
from llm_jax.model import transformer as model

TINY = dict(vocab_size=61, max_len=24, num_layers=2, d_model=32, num_heads=4,
            num_kv_heads=2, head_dim=8, mlp_dim=64, dtype='float32',
            # A wide init spreads the logits: random models at 0.02 give
            # near-ties that rounding order alone could flip.
            init_std=0.5)
STYLES = {
    'llama': dict(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
                  tie_embeddings=False, rope_theta=10_000.0, norm_eps=1e-6),
    'gpt2': dict(norm='layernorm', position='learned', mlp='gelu', use_bias=True,
                 tie_embeddings=True, rope_theta=10_000.0, norm_eps=1e-5),
}
EOS = 3


def _make(style):
  cfg = model.ModelConfig(**TINY, **STYLES[style])
  return nnx.split(model.Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def lm(request):
  """Both position schemes: the cache paths of rotary and learned positions."""
  return _make(request.param)


@pytest.fixture(scope='module')
def llama():
  """One style for the sampling and bookkeeping tests (each compile costs)."""
  return _make('llama')


def _decode(lm, prompts, *, width=8, max_new=8, temperature=0.0, top_k=0,
            top_p=1.0, seed=0, stop_ids=(), pad_to=None):
  graphdef, params = lm
  tokens, lengths = decode.left_pad(prompts, pad_to or max(map(len, prompts)), 0)
  out, counts = decode.decode_jit(params, tokens, lengths, max_new, temperature,
                                  top_k, top_p, seed, graphdef=graphdef,
                                  width=width, stop_ids=stop_ids, pad_id=0)
  out, counts = np.asarray(out), np.asarray(counts)
  return [out[r, :counts[r]].tolist() for r in range(len(prompts))], out, counts


PROMPTS = [[5, 9, 11, 40, 7], [12], [30, 31, 32, 33, 34, 35, 36, 37, 38]]


def test_cached_greedy_equals_full_recompute(lm):
  got, _, counts = _decode(lm, PROMPTS)
  assert counts.tolist() == [8, 8, 8]
  for prompt, row in zip(PROMPTS, got):
    assert row == decode.full_recompute_greedy(*lm, prompt, 8)


def test_left_padding_does_not_change_a_row(lm):
  alone = [_decode(lm, [p])[0][0] for p in PROMPTS]
  batched, _, _ = _decode(lm, PROMPTS, pad_to=14)
  assert batched == alone
  # Sampling too: each row draws from its own key (keyed by its row index).
  first = _decode(lm, [PROMPTS[0]], temperature=1.0, seed=4)[0][0]
  sampled = _decode(lm, PROMPTS, temperature=1.0, seed=4)[0]
  assert sampled[0] == first
  assert _decode(lm, PROMPTS, temperature=1.0, seed=4, pad_to=14)[0] == sampled


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
  lm = llama
  a = _decode(lm, PROMPTS, temperature=1.0, seed=1)[0]
  assert _decode(lm, PROMPTS, temperature=1.0, seed=1)[0] == a
  b = _decode(lm, PROMPTS, temperature=1.0, seed=2)[0]
  assert a != b
  assert a != _decode(lm, PROMPTS)[0]  # Sampling is not greedy here.


def test_top_k_1_and_tiny_top_p_equal_greedy(llama):
  lm = llama
  greedy = _decode(lm, PROMPTS)[0]
  assert _decode(lm, PROMPTS, temperature=1.0, top_k=1, seed=3)[0] == greedy
  assert _decode(lm, PROMPTS, temperature=1.0, top_p=1e-6, seed=3)[0] == greedy


def test_top_k_keeps_samples_in_the_top_k():
  logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  key = jax.random.PRNGKey(0)
  sample = jax.jit(decode.sample)  # One compile; eager dispatch is slow.
  for step in range(20):
    drawn = np.asarray(sample(logits, key, step, 1.0, 3, 1.0))
    assert all(d in top3[r] for r, d in enumerate(drawn))
  # top_p 0.5: only the tokens whose predecessors hold < 0.5 of the mass.
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)
  for step in range(20):
    drawn = np.asarray(sample(logits, key, step, 1.0, 0, 0.5))
    for r, d in enumerate(drawn):
      rank = list(order[r]).index(d)
      assert probs[r, order[r, :rank]].sum() < 0.5


def test_stop_tokens_end_rows_and_counts(llama):
  lm = llama
  greedy, _, _ = _decode(lm, PROMPTS)
  # Make the third greedy token of row 0 a stop token: row 0 ends before it.
  stop = greedy[0][2]
  cut = greedy[0].index(stop)
  got, out, counts = _decode(lm, PROMPTS, stop_ids=(stop,))
  assert got[0] == greedy[0][:cut] and counts[0] == cut <= 2
  assert (out[0, cut:] == 0).all()
  for row, full in zip(got, greedy):
    assert row == (full[:full.index(stop)] if stop in full else full)


def test_max_new_tokens_is_a_runtime_limit_and_context_clamps(llama):
  lm = llama
  got, out, counts = _decode(lm, PROMPTS, max_new=3)
  assert counts.tolist() == [3, 3, 3] and (out[:, 3:] == 0).all()
  assert got == [r[:3] for r in _decode(lm, PROMPTS)[0]]
  # max_len 24: a 20-token prompt has room for 4 new tokens only.
  long_prompt = list(range(5, 25))
  _, _, counts = _decode(lm, [long_prompt, [7]], width=10, max_new=10)
  assert counts.tolist() == [4, 10]


def test_generate_helper_cuts_at_eos(llama):
  lm = llama
  graphdef, params = lm
  full = _decode(lm, PROMPTS)[0]
  got = decode.generate(graphdef, params, PROMPTS, max_new_tokens=8,
                        temperature=0.0, seed=0, max_len=24, pad_id=0,
                        eos_id=full[1][1])
  assert got[1] == full[1][:1]
  assert got[0] == (full[0][:full[0].index(full[1][1])] if full[1][1] in full[0]
                    else full[0])
