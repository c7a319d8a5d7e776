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


# ---- Step by step (the export's prefill / decode_step / score signatures).

_prefill = jax.jit(decode.prefill, static_argnames='graphdef')
_step = jax.jit(decode.decode_step, static_argnames='graphdef')


def _stepwise(lm, prompts, joins, *, steps, temperature, top_k=0, top_p=1.0, seed=0):
  """Rows join a shared cache at steps ``joins`` and then step together, as a
  server's continuous batch does; returns each row's ``steps`` tokens."""
  graphdef, params = lm
  B, S = len(prompts), TINY['max_len']
  cache = np.zeros((B, 2, 2, S, 2, 8), np.float32)
  sampling = lambda rows: [np.full(rows, seed, np.int32), np.arange(B, dtype=np.int32)[:rows],
                           np.full(rows, temperature, np.float32), np.full(rows, top_k, np.int32),
                           np.full(rows, top_p, np.float32)]
  got = [[] for _ in prompts]
  t = 0
  while any(len(g) < steps for g in got):
    for r in [r for r in range(B) if joins[r] == t]:
      width = 16
      tokens = np.zeros((1, width), np.int32)
      tokens[0, :len(prompts[r])] = prompts[r]
      seed_1, index_1, *rest = sampling(B)
      out = _prefill(params, tokens, np.int32([len(prompts[r])]), seed_1[:1], index_1[r:r + 1],
                     *(x[:1] for x in rest), graphdef=graphdef)
      cache[r, :, :, :width] = np.asarray(out['cache'])[0]
      got[r].append(int(out['token'][0]))
    live = [r for r in range(B) if joins[r] < t and len(got[r]) < steps]
    if live:
      last = np.int32([got[r][-1] if r in live else 0 for r in range(B)])
      # Idle rows write their slot S-1, which a row writes before it reads.
      pos = np.int32([len(prompts[r]) + len(got[r]) - 1 if r in live else S - 1
                      for r in range(B)])
      step = np.int32([len(got[r]) for r in range(B)])
      out = _step(params, cache, last, pos, step, *sampling(B), graphdef=graphdef)
      cache[np.arange(B), :, :, pos] = np.asarray(out['kv'])  # The caller writes the slot.
      for r in live:
        got[r].append(int(out['token'][r]))
    t += 1
  return got


@pytest.mark.parametrize('sampling', [dict(temperature=0.0),
                                      dict(temperature=1.0, seed=5),
                                      dict(temperature=0.8, top_k=5, top_p=0.9, seed=2)],
                         ids=['greedy', 'sampled', 'cut'])
def test_rows_joining_a_running_batch_get_the_tokens_of_decode(llama, sampling):
  want, _, _ = _decode(llama, PROMPTS, max_new=6, width=6, **sampling)
  got = _stepwise(llama, PROMPTS, joins=[0, 2, 3], steps=6, **sampling)
  assert got == want


def test_score_gives_each_tokens_log_probability(llama):
  graphdef, params = llama
  tokens = np.zeros((2, 12), np.int32)
  tokens[0, :5], tokens[1, :9] = PROMPTS[0], PROMPTS[2]
  out = jax.jit(decode.score, static_argnames='graphdef')(params, tokens, graphdef=graphdef)
  logits = np.asarray(nnx.merge(graphdef, params)(tokens), np.float64)
  logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out['logprobs'])[:, 1:], want, atol=1e-4)
  assert (np.asarray(out['logprobs'])[:, 0] == 0).all()
  top = np.asarray(out['top_tokens'])
  assert (top[:, 1:, 0] == logprobs[:, :-1].argmax(-1)).all()
  np.testing.assert_allclose(np.asarray(out['top_logprobs'])[:, 1:, 0],
                             logprobs[:, :-1].max(-1), atol=1e-4)
