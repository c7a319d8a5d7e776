"""Generation with a KV cache: prefill, then single-token steps in one while loop.

``decode_tokens`` is a pure function of the parameters and the request (no
Python control flow on values), so the same code runs under ``jax.jit`` here
and inside the exported SavedModel (llm_jax/deploy/saved_model.py).

Layout of a request (all rows padded to the same prompt width P):

* Prompts are **left-padded**: row b's ``lengths_B[b]`` real tokens sit in
  columns ``P - lengths_B[b] .. P-1``. The last prompt token of every row is
  then in column P-1, so one prefill gives every row's first next-token logits.
* Positions start at 0 at each row's first real token; padded columns are
  masked out of attention, so a row's output does not depend on the padding
  (tests/test_decode.py checks it against the row alone).
* The cache has ``P + W`` slots (W, the output width, is static); slot
  ``P + j`` holds new token j, at position ``lengths_B[b] + j``.

Outputs: ``tokens_BW`` int32, row b's new tokens in columns
``0 .. counts_B[b]-1`` and ``pad_id`` after; the stop token that ended a row
is not counted and not written. A row stops at a stop token, after
``max_new_tokens`` tokens, or when its sequence fills the context
(``lengths + counts == max_len``): generation never runs positions past the
model's context, it stops there (documented clamping).

Sampling: ``temperature <= 0`` is greedy (argmax); otherwise the logits are
divided by the temperature, cut to the ``top_k`` most likely tokens
(``top_k <= 0``: no cut) and then to the smallest set whose probability
reaches ``top_p`` (``top_p >= 1``: no cut), and sampled. Row b at step j
draws with ``fold_in(fold_in(PRNGKey(seed), j), b)``, so a row's sample does
not depend on the other rows in the batch.

Shape letters as in model.py, plus P: prompt width, W: output width,
S: cache slots (P + W).
"""

import functools
from typing import Any
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.model import attention
from llm_jax.model import layers
from llm_jax.model import transformer as model_lib
from llm_jax.core.errors import UserError


# ---- The cached forward pass (drives the Transformer's own submodules).


def _logits(model, x_BTD: jax.Array) -> jax.Array:
  x_BTD = model.final_norm(x_BTD)
  if model.lm_head is None:
    return model.embed.attend(x_BTD).astype(jnp.float32)
  return model.lm_head(x_BTD).astype(jnp.float32)


def _embed(model, tokens_BT, positions_BT):
  """Token (plus learned position) embeddings and the rotary tables or None."""
  x_BTD = model.embed(tokens_BT)
  if model.pos_embed is not None:
    return x_BTD + model.pos_embed(positions_BT), None
  return x_BTD, model_lib.rope_tables(positions_BT, model.cfg.head_dim,
                                      model.cfg.rope_theta,
                                      scaling_factor=model.cfg.rope_scaling_factor)


def _attend_block(block, x_BTD, rope, keys_fn):
  """One block on T new tokens; ``keys_fn(k_BTKH, v_BTKH)`` gives the keys,
  values and mask ``[B, T, S]`` they attend to (the cache with them in it).

  Same arithmetic as ``model.Block`` (pre-norm attention then MLP), with the
  attention reading the cache instead of only the new tokens. Returns the
  block's output, the new tokens' keys and values, and what keys_fn gave.
  """
  attn = block.attn
  h_BTD = block.attn_norm(x_BTD)
  q_BTNH, k_BTKH, v_BTKH = attn.q(h_BTD), attn.k(h_BTD), attn.v(h_BTD)
  if rope is not None:
    q_BTNH = model_lib.apply_rope(q_BTNH, *rope)
    k_BTKH = model_lib.apply_rope(k_BTKH, *rope)
  k_BSKH, v_BSKH, mask_BTS = keys_fn(k_BTKH, v_BTKH)
  x_BTD = x_BTD + attn.o(attention.xla_attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS))
  x_BTD = x_BTD + block.mlp(block.mlp_norm(x_BTD))
  return x_BTD, (k_BTKH, v_BTKH), (k_BSKH, v_BSKH)


def _block(block, x_BTD, rope, k_BSKH, v_BSKH, slot, mask_BTS):
  """One block on T new tokens; their keys/values go into the cache at ``slot``."""

  def into_cache(k_BTKH, v_BTKH):
    return (jax.lax.dynamic_update_slice_in_dim(
        k_BSKH, k_BTKH.astype(k_BSKH.dtype), slot, axis=1),
            jax.lax.dynamic_update_slice_in_dim(
                v_BSKH, v_BTKH.astype(v_BSKH.dtype), slot, axis=1), mask_BTS)

  x_BTD, _, (k_BSKH, v_BSKH) = _attend_block(block, x_BTD, rope, into_cache)
  return x_BTD, k_BSKH, v_BSKH


def forward_cached(model, tokens_BT, positions_BT, cache, slot, valid_BS, last_B=None):
  """Runs T new tokens through the model, reading and extending the cache.

  Args:
    model: the NNX Transformer.
    tokens_BT: token ids of the new tokens.
    positions_BT: their positions (0 at each row's first real token).
    cache: list over layers of ``(k_BSKH, v_BSKH)``.
    slot: int scalar, the cache slot of the first new token.
    valid_BS: bool, False for slots holding left padding.
    last_B: if given, each row's one token whose logits are wanted (a prefill
      samples from one position: the LM head then runs on B rows, not B x T).

  Returns:
    ``(logits_BTV float32, new cache)``; T is 1 with ``last_B``.
  """
  T, S = tokens_BT.shape[1], valid_BS.shape[1]
  # Query t (slot slot+t) sees real slots up to its own.
  causal_TS = jnp.arange(S)[None, :] <= slot + jnp.arange(T)[:, None]
  mask_BTS = causal_TS[None] & valid_BS[:, None, :]
  x_BTD, rope = _embed(model, tokens_BT, positions_BT)
  new_cache = []
  for block, (k_BSKH, v_BSKH) in zip(model.blocks, cache):
    x_BTD, k_BSKH, v_BSKH = _block(block, x_BTD, rope, k_BSKH, v_BSKH, slot,
                                   mask_BTS)
    new_cache.append((k_BSKH, v_BSKH))
  if last_B is not None:
    x_BTD = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
  return _logits(model, x_BTD), new_cache


def init_cache(cfg: model_lib.ModelConfig, batch, slots) -> list:
  """Zeros ``[B, S, K, H]`` keys and values per layer, in the compute dtype."""
  shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
  return [(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
          for _ in range(cfg.num_layers)]


# ---- Sampling.


def _cut(scaled_BV, top_k, top_p):
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf."""
  V = scaled_BV.shape[-1]
  # One descending sort serves both cuts; the kept set is every token whose
  # logit reaches a per-row threshold (ties at the threshold are kept).
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  k = jnp.where(top_k <= 0, V, jnp.clip(top_k, 1, V))
  in_top_k_V = jnp.arange(V) < k
  sorted_BV = jnp.where(in_top_k_V, sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  # Keep a token if the tokens before it hold less than top_p; the first is
  # always kept (even with top_p <= 0), so the set is never empty.
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = in_top_k_V & ((before_BV < top_p) | (top_p >= 1.0)
                          | (jnp.arange(V) == 0))
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1,
                         keepdims=True)
  return jnp.where(scaled_BV >= threshold_B1, scaled_BV, -jnp.inf)


def sample(logits_BV, key, step, temperature, top_k, top_p):
  """One token per row: greedy, or temperature / top-k / top-p sampling.

  Args:
    logits_BV: float32 logits.
    key: the request's PRNG key (raw uint32 key data).
    step: int scalar, the index of the token being drawn.
    temperature, top_k, top_p: scalars, see the module docstring.

  Returns:
    int32 ``[B]`` token ids.
  """
  B = logits_BV.shape[0]

  def greedy(logits_BV):
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def draw(logits_BV):
    scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6).astype(jnp.float32)
    # The sort behind the cuts costs more than the rest of a small model's
    # step on CPU: skip it when neither cut is asked for.
    cut_BV = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                          lambda s: _cut(s, top_k, top_p), lambda s: s, scaled_BV)
    step_key = jax.random.fold_in(key, step)
    keys_B = jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(B))
    return jax.vmap(jax.random.categorical)(keys_B, cut_BV).astype(jnp.int32)

  return jax.lax.cond(temperature <= 0, greedy, draw, logits_BV)


# ---- The whole request.


def _multi_axis_dense(model) -> list:
  """``(path, Dense)`` of the plain Dense layers whose kernel has more than 2 axes.

  LoRA and pruning wrappers run their own products and keep their kernels;
  scanned blocks (kernels stacked ``[layers, ...]``) are left alone.
  """
  if model.cfg.scan_layers:
    return []
  return [(path, module) for path, module in nnx.iter_modules(model)
          if type(module) is layers.Dense  # pylint: disable=unidiomatic-typecheck
          and module.kernel.ndim > 2]


def _flatten_kernels(model) -> None:
  """Dense kernels as 2-D matrices before a decode loop (``Dense.flatten_kernel``).

  ``model`` is the caller's own merged copy; the parameters passed in are untouched.
  """
  for _, module in _multi_axis_dense(model):
    module.flatten_kernel()


def kernel_matrices(graphdef, params) -> dict[str, int]:
  """``{parameter name: input axes}`` of the kernels ``_flatten_kernels`` reshapes.

  Names as ``deploy.quantize`` writes them (``blocks/0/attn/q/kernel``); the
  export stores these kernels 2-D (``quantize.flatten_params(matrices=)``).
  """
  return {'/'.join(map(str, path + ('kernel',))): module.num_in_axes
          for path, module in _multi_axis_dense(nnx.merge(graphdef, params))}


def decode_tokens(params, tokens_BP, lengths_B, max_new_tokens, temperature,
                  top_k, top_p, seed, *, graphdef, width: int,
                  stop_ids: Sequence[int] = (), pad_id: int = 0,
                  on_token: Callable[..., None] | None = None):
  """Generates up to ``min(max_new_tokens, width)`` tokens per row.

  Pure and jittable; shapes of batch B and prompt width P may be symbolic
  (export), ``width`` and ``stop_ids`` are static.

  Args:
    params: the model's parameter state (as in ``TrainState.params``).
    tokens_BP: int32 left-padded prompts.
    lengths_B: int32 real prompt tokens per row, 1..P.
    max_new_tokens: int32 scalar, at most ``width`` are produced.
    temperature: float32 scalar; <= 0 is greedy.
    top_k: int32 scalar; <= 0 disables.
    top_p: float32 scalar; >= 1 disables.
    seed: int32 scalar.
    graphdef: the model's nnx graph definition.
    width: W, the static output width.
    stop_ids: token ids that end a row (e.g. end-of-text).
    pad_id: what fills the output after a row's last token.
    on_token: for streaming on the host only (not exportable): called as
      ``on_token(j, tokens_B, counts_B)`` after step j; row b produced
      ``tokens_B[b]`` iff ``counts_B[b] > j``.

  Returns:
    ``(tokens_BW int32, counts_B int32)``.
  """
  chex.assert_rank([tokens_BP, lengths_B], [2, 1])  # Symbolic sizes are fine.
  model = nnx.merge(graphdef, params)
  _flatten_kernels(model)  # Once, outside the loop below.
  cfg = model.cfg
  B, P = tokens_BP.shape
  lengths_B = lengths_B.astype(jnp.int32)
  max_new = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), width)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  key = jax.random.PRNGKey(jnp.asarray(seed, jnp.int32))
  pad_B = P - lengths_B
  # Slots 0..P-1 hold the prompt (real from pad_B on), P.. the new tokens.
  valid_BS = jnp.arange(P + width)[None, :] >= pad_B[:, None]
  positions_BP = jnp.maximum(jnp.arange(P)[None, :] - pad_B[:, None], 0)
  cache = init_cache(cfg, B, P + width)
  # Every row's last prompt token is in column P-1 (= pad_B + lengths_B - 1).
  logits_B1V, cache = forward_cached(model, tokens_BP, positions_BP, cache, 0,
                                     valid_BS, last_B=pad_B + lengths_B - 1)
  stop_V = jnp.zeros((cfg.vocab_size,), jnp.bool_)
  for s in stop_ids:
    stop_V = stop_V.at[s].set(True)
  # At most max_len - length new tokens: the whole sequence fits the context.
  room_B = jnp.clip(cfg.max_len - lengths_B, 0, None)

  def record(j, logits_BV, out_BW, counts_B, done_B):
    token_B = sample(logits_BV, key, j, temperature, top_k, top_p)
    done_B = done_B | stop_V[token_B]
    out_BW = out_BW.at[:, j].set(jnp.where(done_B, pad_id, token_B))
    counts_B = counts_B + (~done_B).astype(jnp.int32)
    done_B = done_B | (counts_B >= max_new) | (counts_B >= room_B)
    if on_token is not None:
      jax.debug.callback(on_token, j, out_BW[:, j], counts_B, ordered=True)
    return token_B, out_BW, counts_B, done_B

  out_BW = jnp.full((B, width), pad_id, jnp.int32)
  counts_B = jnp.zeros((B,), jnp.int32)
  done_B = (room_B <= 0) | (max_new <= 0)
  token_B, out_BW, counts_B, done_B = record(0, logits_B1V[:, 0], out_BW,
                                             counts_B, done_B)

  def cond(carry):
    j, _, _, _, _, done_B = carry
    return (j < max_new) & ~jnp.all(done_B)

  def body(carry):
    j, cache, token_B, out_BW, counts_B, done_B = carry
    # Feed token j-1 (slot P+j-1, position length+j-1); draw token j.
    positions_B1 = (lengths_B + j - 1)[:, None]
    logits_B1V, cache = forward_cached(model, token_B[:, None], positions_B1,
                                       cache, P + j - 1, valid_BS)
    token_B, out_BW, counts_B, done_B = record(j, logits_B1V[:, 0], out_BW,
                                               counts_B, done_B)
    return j + 1, cache, token_B, out_BW, counts_B, done_B

  carry = (jnp.int32(1), cache, token_B, out_BW, counts_B, done_B)
  _, _, _, out_BW, counts_B, _ = jax.lax.while_loop(cond, body, carry)
  return out_BW, counts_B


# ---- Step by step: the cache in the caller's hands (the export's prefill,
# decode_step and score signatures; a server batches rows that started at
# different times into one step).
#
# Every row owns its cache row and starts at slot 0: the token at position p
# sits in slot p, so rows need no common offset. The cache travels as one
# array ``cache_BLCSKH`` [batch, layers, 2 (keys, values), slots, kv heads,
# head dim]; ``decode_step`` only reads it and returns the new slot. Sampling takes per-row settings; row b draws step j with
# ``fold_in(fold_in(PRNGKey(seed_B[b]), j), index_B[b])``, the key
# ``decode_tokens`` gives row ``index`` of a batch with that seed, so a request
# reproduces ``generate`` whatever else shares the step.

TOP_LOGPROBS = 5  # Alternatives reported per token (OpenAI's limit for completions).


def stack_cache(cache: list) -> jax.Array:
  """Per-layer ``(k_BSKH, v_BSKH)`` pairs -> ``cache_BLCSKH``."""
  return jnp.stack([jnp.stack(kv, axis=1) for kv in cache], axis=1)


def _prompt_logits(model, tokens_BT, last_B=None):
  """Logits of right-padded rows starting at position 0, and their cache."""
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
  cache = init_cache(model.cfg, B, T)
  # Causal attention alone keeps padding (after a row's tokens) out of them.
  return forward_cached(model, tokens_BT, positions_BT, cache, 0,
                        jnp.ones((B, T), jnp.bool_), last_B=last_B)


def sample_rows(logits_BV, seed_B, step_B, index_B, temperature_B, top_k_B, top_p_B):
  """One token per row, each with its own sampling settings (as ``sample``)."""

  def draw(logits_BV):
    scaled_BV = logits_BV / jnp.maximum(temperature_B, 1e-6)[:, None]
    cut_row = lambda s_V, k, p: _cut(s_V[None], k, p)[0]
    cut_BV = jax.lax.cond(jnp.any((top_k_B > 0) | (top_p_B < 1.0)),
                          lambda s: jax.vmap(cut_row)(s, top_k_B, top_p_B),
                          lambda s: s, scaled_BV)
    keys_B = jax.vmap(lambda s, j, i: jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(s), j), i))(seed_B, step_B, index_B)
    drawn_B = jax.vmap(jax.random.categorical)(keys_B, cut_BV).astype(jnp.int32)
    return jnp.where(temperature_B <= 0, jnp.argmax(logits_BV, -1).astype(jnp.int32),
                     drawn_B)

  # All-greedy batches skip the sampling (the sort behind the cuts is costly).
  return jax.lax.cond(jnp.all(temperature_B <= 0),
                      lambda l: jnp.argmax(l, -1).astype(jnp.int32), draw, logits_BV)


def top_k_by_argmax(x_XV, k: int):
  """``(values, int32 ids)`` of the k largest along the last axis, best first.

  k argmax passes instead of ``lax.top_k``, whose StableHLO composite the
  exporting jax writes and TensorFlow 2.21's XlaCallModule cannot read.
  """
  V = x_XV.shape[-1]
  values, ids = [], []
  for _ in range(k):
    i_X = jnp.argmax(x_XV, axis=-1)
    values.append(jnp.take_along_axis(x_XV, i_X[..., None], -1)[..., 0])
    ids.append(i_X.astype(jnp.int32))
    x_XV = jnp.where(jnp.arange(V) == i_X[..., None], -jnp.inf, x_XV)
  return jnp.stack(values, -1), jnp.stack(ids, -1)


def _sampled(logits_BV, sampling) -> dict:
  """The drawn token, its log-probability and the likeliest alternatives."""
  token_B = sample_rows(logits_BV, *sampling)
  logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  top_BK, top_ids_BK = top_k_by_argmax(logprobs_BV, TOP_LOGPROBS)
  return {'token': token_B,
          'logprob': jnp.take_along_axis(logprobs_BV, token_B[:, None], -1)[:, 0],
          'top_tokens': top_ids_BK, 'top_logprobs': top_BK}


def prefill(params, tokens_BP, lengths_B, seed_B, index_B, temperature_B, top_k_B,
            top_p_B, *, graphdef) -> dict:
  """Runs right-padded prompts; draws each row's first new token (step 0).

  Returns:
    ``cache`` [B, L, 2, P, K, H] (slots past a row's length hold padding that
    later steps overwrite before reading) and ``_sampled``'s outputs.
  """
  model = nnx.merge(graphdef, params)
  logits_B1V, cache = _prompt_logits(model, tokens_BP, last_B=lengths_B - 1)
  last_BV = logits_B1V[:, 0]
  sampling = (seed_B, jnp.zeros_like(seed_B), index_B, temperature_B, top_k_B, top_p_B)
  return {'cache': stack_cache(cache), **_sampled(last_BV, sampling)}


def decode_step(params, cache_BLCSKH, tokens_B, positions_B, step_B, seed_B, index_B,
                temperature_B, top_k_B, top_p_B, *, graphdef) -> dict:
  """Feeds each row's last token at its own position; draws step ``step_B``.

  The cache is only read: row b attends to its slots below ``positions_B[b]``
  and to the new token itself, so what a longer or shorter neighbour left in
  the other slots never reaches it. The new token's keys and values come
  back as ``kv`` for the caller to write into slot ``positions_B[b]`` (a
  step then moves one slot per row, not the whole cache).

  Returns:
    ``kv`` [B, L, 2, K, H] and ``_sampled``'s outputs.
  """
  model = nnx.merge(graphdef, params)
  S = cache_BLCSKH.shape[3]
  mask_B1S = jnp.concatenate([jnp.arange(S)[None] < positions_B[:, None],
                              jnp.ones_like(positions_B[:, None], jnp.bool_)], 1)[:, None]
  x_B1D, rope = _embed(model, tokens_B[:, None], positions_B[:, None])
  kv = []
  for l, block in enumerate(model.blocks):
    cached = cache_BLCSKH[:, l]

    def with_new(k_B1KH, v_B1KH, cached=cached):
      return (jnp.concatenate([cached[:, 0], k_B1KH.astype(cached.dtype)], 1),
              jnp.concatenate([cached[:, 1], v_B1KH.astype(cached.dtype)], 1), mask_B1S)

    x_B1D, (k_B1KH, v_B1KH), _ = _attend_block(block, x_B1D, rope, with_new)
    kv.append(jnp.stack([k_B1KH[:, 0], v_B1KH[:, 0]], 1).astype(cached.dtype))
  sampling = (seed_B, step_B, index_B, temperature_B, top_k_B, top_p_B)
  return {'kv': jnp.stack(kv, 1), **_sampled(_logits(model, x_B1D)[:, 0], sampling)}


def score(params, tokens_BT, *, graphdef) -> dict:
  """Log-probability of every token given those before it (right-padded rows).

  Returns:
    ``logprobs`` [B, T] (column 0, which nothing predicts, is 0),
    ``top_tokens`` / ``top_logprobs`` [B, T, TOP_LOGPROBS]: the likeliest
    tokens at each position (zeros in column 0).
  """
  logits_BTV, _ = _prompt_logits(nnx.merge(graphdef, params), tokens_BT)
  logprobs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
  top_BTK, ids_BTK = top_k_by_argmax(logprobs_BTV, TOP_LOGPROBS)
  # Position t predicts token t+1. Gathers, not slices, shift by one: the
  # export's T is symbolic, and T-1 columns cannot be proven non-empty.
  T = tokens_BT.shape[1]
  t_T = jnp.arange(T)
  next_BT = jnp.take(tokens_BT, jnp.minimum(t_T + 1, T - 1), axis=1)
  got_BT = jnp.take_along_axis(logprobs_BTV, next_BT[..., None], -1)[..., 0]

  def from_previous(x):  # Column t gets column t-1's value; column 0 gets 0.
    x = jnp.take(x, jnp.maximum(t_T - 1, 0), axis=1)
    first = (t_T == 0).reshape((1, T) + (1,) * (x.ndim - 2))
    return jnp.where(first, jnp.zeros_like(x), x)

  return {'logprobs': from_previous(got_BT),
          'top_tokens': from_previous(ids_BTK),
          'top_logprobs': from_previous(top_BTK)}


decode_jit = jax.jit(decode_tokens, static_argnames=(
    'graphdef', 'width', 'stop_ids', 'pad_id', 'on_token'))


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _full_logits(params, tokens_BL, *, graphdef):
  return nnx.merge(graphdef, params)(tokens_BL)


def full_recompute_greedy(graphdef, params, prompt: Sequence[int],
                          num_tokens: int) -> list[int]:
  """Greedy tokens by rerunning the whole sequence each step (the reference).

  The sequence is right-padded to ``max_len`` (causal attention: the padding
  after a token cannot change it), so one compile serves every step.
  """
  max_len = nnx.merge(graphdef, params).cfg.max_len
  seq = list(prompt)
  for _ in range(num_tokens):
    tokens = np.zeros((1, max_len), np.int32)
    tokens[0, :len(seq)] = seq
    logits = _full_logits(params, tokens, graphdef=graphdef)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


# ---- Host-side helpers: padding, buckets, the trainer's samples.


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n, else n rounded up to a multiple of 64."""
  for b in sorted(buckets):
    if b >= n:
      return b
  return -(-n // 64) * 64


def left_pad(prompts: Sequence[Sequence[int]], width: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [B, width] int32, lengths [B] int32)``, prompts right-aligned."""
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in enumerate(prompts):
    if p:
      tokens[row, width - len(p):] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def generate(graphdef, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float, seed: int, max_len: int, pad_id: int,
             eos_id: int, top_k: int = 0, top_p: float = 1.0,
             width: int | None = None) -> list[list[int]]:
  """New tokens for each prompt, ended at the first end-of-text (not included).

  Host-side convenience over ``decode_jit`` (used for the samples printed
  after training). Prompts longer than ``max_len - 1`` keep their last
  tokens; an empty prompt starts from end-of-text (a document boundary).
  ``temperature == 0`` means greedy.

  Args:
    width: the static output width (default ``max_new_tokens``).
  """
  max_new_tokens = max(0, min(max_new_tokens, max_len - 1))
  prompts = [list(p)[-(max_len - 1):] or [eos_id] for p in prompts]
  tokens, lengths = left_pad(prompts, max(map(len, prompts)), pad_id)
  out, counts = decode_jit(
      params, tokens, lengths, np.int32(max_new_tokens), np.float32(temperature),
      np.int32(top_k), np.float32(top_p), np.int32(seed), graphdef=graphdef,
      width=max(1, width or max_new_tokens), stop_ids=(eos_id,), pad_id=pad_id)
  out, counts = np.asarray(out), np.asarray(counts)
  return [out[row, :counts[row]].tolist() for row in range(len(prompts))]


# ---- Generation for a run read back by llm_jax.workdir (CLI, export, bench).


# Prompt widths are padded up to one of these (each width compiles once).
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def check_prompts(prompts: list[list[int]], max_len: int, vocab_size: int) -> None:
  """Raises UserError for an empty, too long, or out-of-vocabulary prompt."""
  for i, p in enumerate(prompts):
    if not p:
      raise UserError(f'prompt {i + 1} is empty; give at least one token.')
    if len(p) >= max_len:
      raise UserError(
          f'prompt {i + 1} has {len(p)} tokens but the model\'s context is '
          f'{max_len} tokens and must leave room for a new one; shorten it to at '
          f'most {max_len - 1} tokens.')
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise UserError(f'prompt {i + 1} has token id {bad[0]} outside the '
                      f'vocabulary [0, {vocab_size}); use ids the tokenizer gives.')


def generate_for_run(run, prompts: list[list[int]], *, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, width: int | None = None,
                     prompt_width: int | None = None,
                     on_token=None) -> tuple[np.ndarray, np.ndarray]:
  """Generates for a batch of token-id prompts; the reference for the export.

  Args:
    run: a ``workdir.Run``.
    prompts: token ids per prompt (checked with ``check_prompts``).
    max_new_tokens: new tokens per row at most.
    temperature, top_k, top_p, seed: sampling, as in decode_tokens.
    width: the static output width (default ``max_new_tokens``).
    prompt_width: the padded prompt width (default: the next bucket).
    on_token: streaming callback (see ``decode.decode_tokens``).

  Returns:
    ``(tokens [B, width] int32, counts [B] int32)`` as the SavedModel's
    ``serving_default`` returns them.
  """
  cfg = run.model_cfg
  check_prompts(prompts, cfg.max_len, cfg.vocab_size)
  longest = max(map(len, prompts))
  prompt_width = prompt_width or min(bucket(longest, prompt_buckets(cfg.max_len)),
                                     cfg.max_len)
  tokens, lengths = left_pad(prompts, prompt_width, pad_id_of(run))
  out, counts = decode_jit(
      run.params, tokens, lengths, np.int32(max_new_tokens),
      np.float32(temperature), np.int32(top_k), np.float32(top_p), np.int32(seed),
      graphdef=run.graphdef, width=max(1, width or max_new_tokens),
      stop_ids=stop_ids(run), pad_id=pad_id_of(run), on_token=on_token)
  return np.asarray(out), np.asarray(counts)


def stop_ids(run) -> tuple[int, ...]:
  """End-of-text ends a row (when the run has a tokenizer that defines one)."""
  tok = run.tokenizer
  return (tok.eos_id,) if tok is not None and tok.eos_id >= 0 else ()


def pad_id_of(run) -> int:
  tok = run.tokenizer
  return max(tok.pad_id, 0) if tok is not None else 0


def prompt_buckets(max_len: int) -> list[int]:
  """Prompt widths below the context from PROMPT_BUCKETS, then the context."""
  return [b for b in PROMPT_BUCKETS if b < max_len] + [max_len]


def nbytes(tree: Any) -> int:
  """Bytes of the arrays in a pytree."""
  return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree))
