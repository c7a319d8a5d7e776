"""Attention kernels behind one signature: plain XLA, cuDNN flash (GPU), splash (TPU).

``attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, backend=...)`` returns ``[B, T, N, H]``
whatever the backend (``config.model.attention``):

  xla     ``xla_attend``: einsums and a float32 softmax; runs anywhere and
          takes any mask (the reference the others are tested against).
  cudnn   ``jax.nn.dot_product_attention(implementation='cudnn')``: fused
          flash attention on NVIDIA GPUs (bf16/fp16 inputs).
  splash  Pallas splash attention on TPUs (``jax.experimental.pallas.ops.tpu``):
          block-sparse causal attention that never materialises [T, S] scores.
          It takes the causal structure (and segment ids) rather than a dense
          mask: ``causal`` and ``segment_ids_BT`` describe the mask.
  auto    splash on TPU, cudnn on GPU, xla elsewhere.

Letters as in ``llm_jax/model/transformer.py``.
"""

import jax
import jax.numpy as jnp

from llm_jax.core.errors import UserError

BACKENDS = ('xla', 'cudnn', 'splash', 'auto')


def causal_mask(T: int) -> jax.Array:
  """``[1, T, T]`` bool: query ``t`` sees keys ``s <= t`` (token order)."""
  return jnp.tril(jnp.ones((T, T), jnp.bool_))[None]


def attention_mask(segment_ids_BT: jax.Array | None, causal: bool, *,
                   length: int | None = None) -> jax.Array:
  """Which keys each query may attend to, ``[B, T, T]`` bool.

  Packed examples (several per row, told apart by ``segment_ids_BT``) never
  attend to each other; with ``causal`` a query also sees only keys at or
  before it in the row. Padding takes its own id (0 by convention) and so sees
  only other padding, which keeps every softmax row non-empty. Without segment
  ids the mask is ``[1, T, T]`` (the same for every row).

  Args:
    segment_ids_BT: int ids of packed sequences; None: one sequence per row.
    causal: also require key position <= query position (decoders).
    length: T, needed when ``segment_ids_BT`` is None.
  """
  T = length if segment_ids_BT is None else segment_ids_BT.shape[1]
  mask_BTS = causal_mask(T) if causal else jnp.ones((1, T, T), jnp.bool_)
  if segment_ids_BT is not None:
    mask_BTS = mask_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
  return mask_BTS


def xla_attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           mask_BTS: jax.Array) -> jax.Array:
  """Plain XLA attention with grouped-query heads; returns ``[B, T, N, H]``.

  Each of the K key/value heads serves G = N/K query heads: reshaping the
  queries to ``[B, T, K, G, H]`` avoids materialising repeated keys and values.

  Args:
    q_BTNH: queries, already rotated (and in the compute dtype).
    k_BSKH: keys, already rotated.
    v_BSKH: values.
    mask_BTS: True where query t may attend to key s; B may be 1.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = (q_BTNH * H**-0.5).reshape(B, T, K, N // K, H)
  # Scores and softmax in float32: bf16 logits would blur the distribution.
  scores_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS,
                           jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(B, T, N, H)



def resolve(backend: str, platform: str | None = None) -> str:
  """The concrete backend for ``backend`` on ``platform`` (default: jax's)."""
  if backend not in BACKENDS:
    raise UserError(f'model.attention={backend!r} is not one of '
                    f'{", ".join(map(repr, BACKENDS))}; pick one of them.')
  platform = platform or jax.devices()[0].platform
  if backend == 'auto':
    return {'tpu': 'splash', 'gpu': 'cudnn', 'cuda': 'cudnn'}.get(platform, 'xla')
  needs = {'cudnn': ('gpu', 'cuda'), 'splash': ('tpu',)}.get(backend)
  if needs and platform not in needs:
    raise UserError(
        f"model.attention={backend!r} needs a {needs[0].upper()} but this run's "
        f"devices are {platform!r}; use model.attention='xla' (any device) or "
        "'auto' (the best this platform has).")
  return backend


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
           mask_BTS: jax.Array, *, backend: str = 'xla', causal: bool = True,
           segment_ids_BT: jax.Array | None = None,
           platform: str | None = None) -> jax.Array:
  """Grouped-query attention of queries over keys/values; returns ``[B, T, N, H]``.

  Args:
    q_BTNH: queries, already rotated, in the compute dtype.
    k_BSKH: keys, already rotated; K divides N.
    v_BSKH: values.
    mask_BTS: True where query t may attend to key s (B may be 1); used as
      is by 'xla' and 'cudnn'.
    backend: one of ``BACKENDS``.
    causal: whether ``mask_BTS`` is (at least) causal; 'splash' builds its
      mask from this and ``segment_ids_BT`` instead of reading ``mask_BTS``.
    segment_ids_BT: packed-sequence ids, for 'splash' (others read the mask).
    platform: the platform to resolve 'auto' for (default: jax's devices).

  Raises:
    UserError: the backend is unknown or this platform lacks it.
  """
  backend = resolve(backend, platform)
  if backend == 'xla':
    return xla_attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  if backend == 'cudnn':
    return _cudnn(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  if segment_ids_BT is None and mask_BTS.shape[0] != 1:
    # A per-row mask means packed sequences; splash needs their ids.
    raise UserError("model.attention='splash' cannot read packed sequences "
                    "(segment ids) here yet; use model.attention='xla' for them.")
  return _splash(q_BTNH, k_BSKH, v_BSKH, causal=causal,
                 segment_ids_BT=segment_ids_BT)


def _cudnn(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
  """cuDNN's fused attention; JAX's layout [B, T, N, H] is ours, GQA native."""
  B, T, _, _ = q_BTNH.shape
  mask_B1TS = jnp.broadcast_to(mask_BTS[:, None], (B, 1, T, k_BSKH.shape[1]))
  return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, implementation='cudnn')


def _splash_kernel(num_heads: int, T: int, S: int, causal: bool):
  """A splash-attention kernel for ``num_heads`` query heads (import guarded)."""
  try:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # pylint: disable=g-import-not-at-top
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"model.attention='splash' needs jax's Pallas TPU ops ({e}); "
                    "use model.attention='xla'.") from e
  one = sm.CausalMask((T, S)) if causal else sm.FullMask((T, S))
  mask = sm.MultiHeadMask([one] * num_heads)
  return sk, sk.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1)


def _splash(q_BTNH, k_BSKH, v_BSKH, *, causal, segment_ids_BT):
  """Pallas splash attention: per example, heads first ([N, T, H])."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  sk, kernel = _splash_kernel(N, T, S, causal)
  # The kernel wants every query head paired with its own key/value head.
  k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
  v_BSNH = jnp.repeat(v_BSKH, N // K, axis=2)
  q_BNTH = (q_BTNH * H**-0.5).transpose(0, 2, 1, 3)
  k_BNSH, v_BNSH = k_BSNH.transpose(0, 2, 1, 3), v_BSNH.transpose(0, 2, 1, 3)
  if segment_ids_BT is None:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BNSH, v_BNSH)
  else:
    ids = sk.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BNSH, v_BNSH, segment_ids=ids)
  return out_BNTH.transpose(0, 2, 1, 3).astype(q_BTNH.dtype)
