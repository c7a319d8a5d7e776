"""The Transformer in Flax NNX: LLaMA-style decoder by default, GPT-2 or BERT by config.

LLaMA style: RMSNorm, rotary positions (HF's "rotate half" convention, so HF
LLaMA checkpoints import as they are), SwiGLU MLP, grouped-query attention, no
biases. GPT-2 style: LayerNorm with bias, a learned position table, a
tanh-approximate GELU MLP, biases on dense layers, tied embeddings. Both use
pre-norm blocks, a final norm and an LM head (or the embedding transposed).

BERT/RoBERTa style (``kind='encoder'``, ``norm_position='post'``): a
LayerNorm after the summed token, position and token-type embeddings,
post-norm blocks (``norm(x + attn(x))``, ``norm(x + mlp(x))``) and no final
norm, exact GELU, a learned table read at ``position + position_offset``
(RoBERTa's padding offset, 2), and BERT's masked-LM head (``mlm_head``:
dense + GELU + LayerNorm, then the tied output with a bias). A task head
(``model.head``, ``llm_jax/model/heads.py``) replaces the LM head:
'classification' scores the first token's state, 'qa' each token as an
answer's start and end.

Parameters are stored float32 and cast to ``ModelConfig.dtype`` where they are
used; norms and the attention softmax run in float32; logits come back float32.

Every parameter carries logical axis names in its ``out_sharding`` metadata
(``eager_sharding=False`` keeps them as names only; ``llm_jax/training/sharding.py``
maps them to mesh axes through ``config.mesh.rules``):

  =====================  ===========  ==============================
  parameter              shape        logical axes
  =====================  ===========  ==============================
  embed.table            [V, D]       ('vocab', 'embed')
  pos_embed.table        [L, D]       (None, 'embed')
  type_embed.table       [Y, D]       (None, 'embed')
  attn.q.kernel          [D, N, H]    ('embed', 'heads', 'head_dim')
  attn.k/v.kernel        [D, K, H]    ('embed', 'kv_heads', 'head_dim')
  attn.o.kernel          [N, H, D]    ('heads', 'head_dim', 'embed')
  mlp.gate/up.kernel     [D, F]       ('embed', 'mlp')
  mlp.down.kernel        [F, D]       ('mlp', 'embed')
  lm_head.kernel         [D, V]       ('embed', 'vocab')
  mlm_head.dense.kernel  [D, D]       ('embed', None)
  mlm_head.bias          [V]          ('vocab',)
  head.*.kernel          [D, C]       ('embed', None)   (llm_jax/model/heads.py)
  *norm.scale/bias       [D]          ('norm',)
  q / k,v biases         [N,H]/[K,H]  ('heads'|'kv_heads', 'head_dim')
  mlp.gate/up biases     [F]          ('mlp',)
  o / down biases        [D]          ('norm',)
  =====================  ===========  ==============================

A bias takes its kernel's output axis names, except that a ``[D]`` vector is
named 'norm' like the norm scales: such vectors are tiny, so they stay
replicated rather than split over 'embed'. The LM head never has a bias.

Shape suffixes on tensor names (einsum strings use the same letters):
  B: batch                     T: query positions (tokens in this call)
  S: key/value positions       D: d_model, the residual width
  N: query heads               K: key/value heads
  G: query heads per K (N/K)   H: head_dim
  F: MLP hidden width          V: vocabulary
  L: max_len (position table)  R: rotary frequencies (H/2)
  M: flattened rows (B*T) around a 2-D matmul
  Y: token types (segments of a pair)  C: a task head's outputs
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.core.errors import UserError
from llm_jax.model import attention
from llm_jax.model import cpu_attention
from llm_jax.model import cpu_matmul
from llm_jax.model import heads
from llm_jax.model.layers import Dense, Embed, Norm

NORMS = ('rmsnorm', 'layernorm')
POSITIONS = ('rope', 'learned')
MLPS = ('swiglu', 'gelu')
# Where a block's norms sit: before each sublayer (GPT-2, LLaMA) or after
# each residual add (BERT, RoBERTa: then the embeddings are normed, and there
# is no final norm).
NORM_POSITIONS = ('pre', 'post')
GELUS = ('tanh', 'exact')  # GPT-2's tanh approximation, or BERT's erf GELU.
# What the model outputs: token logits ('lm'), or a task head's
# (llm_jax/model/heads.py): 'classification' [B, C], 'qa' [B, T, 2].
HEADS = ('lm', 'classification', 'qa')
DTYPES = ('float32', 'bfloat16')
# 'decoder': causal attention, next-token LM. 'encoder': bidirectional
# attention, masked-LM (the same blocks and head; see llm_jax/data/masking.py).
KINDS = ('decoder', 'encoder')
# What a block keeps for the backward pass: everything ('none'), only its
# input ('full': recompute the block), or its matmul outputs ('dots').
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Kernels behind one signature (llm_jax/model/attention.py); 'auto' picks per platform.
ATTENTION_BACKENDS = ('xla', 'cudnn', 'splash', 'auto')
_POSITIVE_INTS = ('num_layers', 'd_model', 'num_heads', 'num_kv_heads',
                  'head_dim', 'mlp_dim')
_POSITIVE_FLOATS = ('rope_theta', 'norm_eps', 'init_std', 'rope_scaling_factor')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A typed, validated view of ``config.model`` plus sizes set by the data.

  Attributes mirror ``config.model`` in configs/base.py, which documents them
  (no defaults here, so they live in one place); ``vocab_size`` comes from the
  tokenizer and ``max_len`` (the longest sequence, and the size of a learned
  position table) from ``data.seq_len``.
  """
  vocab_size: int
  max_len: int
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm: str
  position: str
  mlp: str
  rope_theta: float
  norm_eps: float
  tie_embeddings: bool
  use_bias: bool
  dtype: str
  init_std: float
  remat: str = 'none'
  kind: str = 'decoder'
  # Biases on the query/key/value projections only (Qwen2), when use_bias
  # (all dense layers) is off. Defaults keep configs written before them valid.
  qkv_bias: bool = False
  # Linear RoPE scaling (position interpolation): positions are divided by
  # this before the rotary angles are taken; 1.0 is plain RoPE.
  rope_scaling_factor: float = 1.0
  scan_layers: bool = False
  attention: str = 'xla'
  # BERT/RoBERTa options (defaults: the decoder's behaviour).
  norm_position: str = 'pre'
  gelu: str = 'tanh'
  type_vocab_size: int = 0  # Rows of the token-type table (0: none).
  position_offset: int = 0  # Learned positions read row position + this.
  mlm_head: bool = False  # Dense + GELU + LayerNorm before the output, and its bias.
  head: str = 'lm'
  num_labels: int = 0  # Classes of a 'classification' head.
  # Dense matmuls on CPU: 'xla', 'mkl' or 'auto' (llm_jax/model/cpu_matmul.py);
  # other than 'xla', 'xla' attention also runs fused on CPU (cpu_attention.py).
  cpu_matmul: str = 'xla'

  def __post_init__(self):
    # Validating here, not only in from_config, keeps configs built directly
    # (tests, notebooks, checkpoint import) as safe as those from a file.
    _validate(self)

  @classmethod
  def from_config(cls, model_cfg: Any, *, vocab_size: int,
                  max_len: int) -> 'ModelConfig':
    """Builds and validates a ModelConfig from ``config.model``.

    Args:
      model_cfg: the ``config.model`` ConfigDict (keys as in configs/base.py).
      vocab_size: tokens in the vocabulary (from the tokenizer).
      max_len: the longest sequence the model sees (``data.seq_len``).

    Returns:
      The frozen ModelConfig.

    Raises:
      UserError: a value is out of range or unknown; the message names the key.
    """
    if model_cfg.kind not in KINDS:
      raise UserError(f'model.kind={model_cfg.kind!r} is not one of '
                      f'{", ".join(map(repr, KINDS))}; pick one of them')
    names = [f.name for f in dataclasses.fields(cls)
             # A key added later (with a default here) may be missing from
             # the config.json of an older run: the default is what it meant.
             if f.name in model_cfg or f.default is dataclasses.MISSING]
    values = {n: model_cfg[n] for n in names if n not in ('vocab_size',
                                                         'max_len')}
    return cls(vocab_size=vocab_size, max_len=max_len, **values)

  @property
  def causal(self) -> bool:
    """Whether a token attends only to earlier ones (decoders)."""
    return self.kind == 'decoder'

  @property
  def post_norm(self) -> bool:
    """BERT's layout: norms after the residual adds, the embeddings normed."""
    return self.norm_position == 'post'

  @property
  def position_rows(self) -> int:
    """Rows of a learned position table: max_len past the offset."""
    return self.max_len + self.position_offset

  @property
  def compute_dtype(self) -> jnp.dtype:
    """The dtype activations and cast parameters are computed in."""
    return jnp.dtype(self.dtype)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Counts parameters exactly as the Transformer creates them.

    Args:
      include_embeddings: False leaves out the lookup tables (token embedding
        and learned positions). An untied LM head is still counted; a tied
        one shares the token table and goes with it.

    Returns:
      The number of scalar parameters.
    """
    d, f, h, v = self.d_model, self.mlp_dim, self.head_dim, self.vocab_size
    n, k = self.num_heads, self.num_kv_heads
    norm = d * (2 if self.norm == 'layernorm' else 1)
    attn = 2 * d * n * h + 2 * d * k * h
    mlp = (3 if self.mlp == 'swiglu' else 2) * d * f
    if self.use_bias:
      attn += n * h + 2 * k * h + d
      mlp += (2 if self.mlp == 'swiglu' else 1) * f + d
    elif self.qkv_bias:
      attn += n * h + 2 * k * h
    total = self.num_layers * (2 * norm + attn + mlp) + norm
    if self.head != 'lm':
      total += (d * d + d + d * self.num_labels + self.num_labels
                if self.head == 'classification' else 2 * d + 2)
    else:
      if not self.tie_embeddings:
        total += d * v
      if self.mlm_head:
        total += d * d + d + 2 * d + v
    if include_embeddings:
      total += v * d + self.type_vocab_size * d
      if self.position == 'learned':
        total += self.position_rows * d
    return total


def _validate(cfg: ModelConfig) -> None:
  """Raises UserError naming the first bad key of ``cfg`` and how to fix it."""
  for name in ('vocab_size', 'max_len'):
    value = getattr(cfg, name)
    if not _is_int(value) or value <= 0:
      raise UserError(f'{name}={value!r} must be a positive integer (it comes '
                      'from the tokenizer and data.seq_len)')
  for name in _POSITIVE_INTS:
    value = getattr(cfg, name)
    if not _is_int(value) or value <= 0:
      raise UserError(f'model.{name}={value!r} must be a positive integer')
  for name in _POSITIVE_FLOATS:
    value = getattr(cfg, name)
    if not isinstance(value, (int, float)) or not value > 0:
      raise UserError(f'model.{name}={value!r} must be a positive number')
  for name, valid in (('norm', NORMS), ('position', POSITIONS),
                      ('mlp', MLPS), ('dtype', DTYPES), ('kind', KINDS),
                      ('remat', tuple(REMAT_POLICIES)),
                      ('attention', ATTENTION_BACKENDS),
                      ('norm_position', NORM_POSITIONS), ('gelu', GELUS),
                      ('head', HEADS), ('cpu_matmul', cpu_matmul.BACKENDS)):
    value = getattr(cfg, name)
    if value not in valid:
      raise UserError(f'model.{name}={value!r} is not one of '
                      f'{", ".join(map(repr, valid))}; pick one of them')
  for name in ('type_vocab_size', 'position_offset', 'num_labels'):
    value = getattr(cfg, name)
    if not _is_int(value) or value < 0:
      raise UserError(f'model.{name}={value!r} must be a non-negative integer')
  if cfg.head != 'lm' and cfg.causal:
    raise UserError(f"model.head={cfg.head!r} needs model.kind='encoder' (a task head "
                    'reads the whole text at once)')
  if cfg.head == 'classification' and cfg.num_labels < 1:
    raise UserError("model.head='classification' needs model.num_labels >= 1 (set from "
                    'the task labels)')
  if not isinstance(cfg.scan_layers, bool):
    raise UserError(f'model.scan_layers={cfg.scan_layers!r} must be True or False')
  if cfg.num_heads % cfg.num_kv_heads:
    divisors = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0]
    raise UserError(
        f'model.num_heads={cfg.num_heads} is not a multiple of '
        f'model.num_kv_heads={cfg.num_kv_heads}; set model.num_kv_heads to a '
        f'divisor of num_heads: {", ".join(map(str, divisors))}')
  if cfg.position == 'rope' and cfg.head_dim % 2:
    raise UserError(f'model.head_dim={cfg.head_dim} must be even with '
                    "model.position='rope' (rotary pairs up dimensions)")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# ---- Attention.


def rope_tables(positions_BT: jax.Array, head_dim: int,
                theta: float, *, scaling_factor: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """Returns float32 ``(sin_BTH, cos_BTH)`` for rotary embeddings.

  HF LLaMA's layout: frequency ``r`` drives dimensions ``r`` and ``r + H/2``
  (not interleaved pairs), matching ``rotate_half`` in ``apply_rope``.
  ``scaling_factor`` is HF's linear ``rope_scaling`` (positions divided by it).
  """
  inv_freq_R = theta ** (-jnp.arange(0, head_dim, 2, jnp.float32) / head_dim)
  if scaling_factor != 1.0:
    inv_freq_R = inv_freq_R / scaling_factor
  angles_BTR = positions_BT.astype(jnp.float32)[..., None] * inv_freq_R
  angles_BTH = jnp.concatenate([angles_BTR, angles_BTR], axis=-1)
  return jnp.sin(angles_BTH), jnp.cos(angles_BTH)


def apply_rope(x_BTNH: jax.Array, sin_BTH: jax.Array,
               cos_BTH: jax.Array) -> jax.Array:
  """Rotates ``x_BTNH`` by its positions: ``x*cos + rotate_half(x)*sin``."""
  # Rotated in float32 and rounded once: bf16 sin/cos (3 significant digits)
  # would add their own error to the bf16 input's; it cost no step time.
  x32_BTNH = x_BTNH.astype(jnp.float32)
  x1_BTNR, x2_BTNR = jnp.split(x32_BTNH, 2, axis=-1)
  rotated_BTNH = jnp.concatenate([-x2_BTNR, x1_BTNR], axis=-1)
  y_BTNH = (x32_BTNH * cos_BTH[:, :, None, :] +
            rotated_BTNH * sin_BTH[:, :, None, :])
  return y_BTNH.astype(x_BTNH.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with grouped-query key/value heads.

  The caller's mask makes it causal (``attention.causal_mask``); ``attention.attend`` is separate
  so a KV-cache decoder can project one step and attend to its cache.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kw = dict(use_bias=cfg.use_bias, dtype=cfg.compute_dtype, rngs=rngs,
              cpu_matmul=cfg.cpu_matmul)
    qkv_kw = dict(kw, use_bias=cfg.use_bias or cfg.qkv_bias)
    self.q = Dense((D,), (N, H), ('embed', 'heads', 'head_dim'),
                   std=cfg.init_std, **qkv_kw)
    self.k = Dense((D,), (K, H), ('embed', 'kv_heads', 'head_dim'),
                   std=cfg.init_std, **qkv_kw)
    self.v = Dense((D,), (K, H), ('embed', 'kv_heads', 'head_dim'),
                   std=cfg.init_std, **qkv_kw)
    # GPT-2's residual scaling: 2 residual adds per layer feed the stream.
    self.o = Dense((N, H), (D,), ('heads', 'head_dim', 'embed'),
                   std=cfg.init_std / math.sqrt(2 * cfg.num_layers), **kw)
    self.backend = cfg.attention
    self.causal = cfg.causal  # Encoders attend both ways (splash needs to know).
    self.cpu_matmul = cfg.cpu_matmul  # 'xla' attention runs fused on CPU unless 'xla'.

  def __call__(self, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               mask_BTS: jax.Array) -> jax.Array:
    """Attends ``x_BTD`` to itself; ``rope`` is ``(sin_BTH, cos_BTH)`` or None."""
    q_BTNH, k_BTKH, v_BTKH = self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)
    if rope is not None:
      q_BTNH, k_BTKH = apply_rope(q_BTNH, *rope), apply_rope(k_BTKH, *rope)
    if self.backend == 'xla':
      return self.o(cpu_attention.attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS,
                                         causal=self.causal, backend=self.cpu_matmul))
    # Other kernels (cuDNN, splash) behind the same signature.
    return self.o(attention.attend(q_BTNH, k_BTKH, v_BTKH, mask_BTS,
                                   backend=self.backend, causal=self.causal))


# ---- MLP, block, model.


class Mlp(nnx.Module):
  """SwiGLU (``down(silu(gate(x)) * up(x))``) or GELU (``down(gelu(up(x)))``)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    D, F = cfg.d_model, cfg.mlp_dim
    kw = dict(use_bias=cfg.use_bias, dtype=cfg.compute_dtype, rngs=rngs,
              cpu_matmul=cfg.cpu_matmul)
    self.gate = (Dense((D,), (F,), ('embed', 'mlp'), std=cfg.init_std, **kw)
                 if cfg.mlp == 'swiglu' else None)
    self.up = Dense((D,), (F,), ('embed', 'mlp'), std=cfg.init_std, **kw)
    self.down = Dense((F,), (D,), ('mlp', 'embed'),
                      std=cfg.init_std / math.sqrt(2 * cfg.num_layers), **kw)
    self.tanh_gelu = cfg.gelu == 'tanh'

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    if self.gate is not None:
      h_BTF = jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD)
    else:
      # GPT-2's GELU is the tanh approximation; BERT's the exact (erf) one.
      h_BTF = jax.nn.gelu(self.up(x_BTD), approximate=self.tanh_gelu)
    return self.down(h_BTF)


class Block(nnx.Module):
  """A Transformer block, pre-norm: ``x + attn(norm(x))``, ``x + mlp(norm(x))``.

  Post-norm (``norm_position='post'``, BERT): ``norm(x + attn(x))``, then
  ``norm(x + mlp(x))``; the norms keep their names (attn_norm, mlp_norm).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.post_norm = cfg.post_norm

  def __call__(self, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               mask_BTS: jax.Array) -> jax.Array:
    if self.post_norm:
      x_BTD = self.attn_norm(x_BTD + self.attn(x_BTD, rope, mask_BTS))
      return self.mlp_norm(x_BTD + self.mlp(x_BTD))
    x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rope, mask_BTS)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Transformer(nnx.Module):
  """The language model: tokens ``[B, T]`` to logits ``[B, T, V]`` (or a task head's)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg, ('vocab', 'embed'), rngs=rngs)
    # Optional parts are assigned once, module or None: flax 0.12 makes an
    # attribute first set to None static and then refuses a module in it.
    self.pos_embed = (Embed(cfg.position_rows, cfg, (None, 'embed'), rngs=rngs)
                      if cfg.position == 'learned' else None)
    self.type_embed = (Embed(cfg.type_vocab_size, cfg, (None, 'embed'), rngs=rngs)
                       if cfg.type_vocab_size else None)
    self.embed_norm = Norm(cfg) if cfg.post_norm else None
    # nnx.List, not a plain list: flax 0.12 refuses modules in a plain list
    # attribute; nnx.List puts them in the state as blocks/0, blocks/1, ...
    if cfg.scan_layers:
      # One Block whose parameters carry a leading 'layers' axis; __call__
      # runs it under lax.scan (see stack_blocks for the layout).
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs)
                              for _ in range(cfg.num_layers)])
    # Post-norm blocks end normed: no final norm (BERT has none).
    self.final_norm = None if cfg.post_norm else Norm(cfg)
    lm = cfg.head == 'lm'
    self.mlm_head = heads.MlmHead(cfg, rngs=rngs) if lm and cfg.mlm_head else None
    # Logits stay float32 as they leave the matmul, never rounded to bf16:
    # better for the loss, and on XLA:CPU the step was ~10% faster than with
    # a bf16 [M, V] result cast up afterwards.
    self.lm_head = None if cfg.tie_embeddings or not lm else Dense(
        (cfg.d_model,), (cfg.vocab_size,), ('embed', 'vocab'),
        std=cfg.init_std, use_bias=False, dtype=cfg.compute_dtype, rngs=rngs,
        out_dtype=jnp.float32, cpu_matmul=cfg.cpu_matmul)
    if lm:
      self.head = None
    else:
      self.head = heads.task_head(cfg, rngs=rngs)

  def __call__(self, tokens_BT: jax.Array,
               positions_BT: jax.Array | None = None, *,
               segment_ids_BT: jax.Array | None = None,
               token_types_BT: jax.Array | None = None,
               return_hidden: bool = False) -> jax.Array:
    """Returns float32 logits ``[B, T, V]`` (or the task head's outputs).

    A decoder (``kind='decoder'``) attends causally and predicts the next
    token; an encoder attends both ways and predicts the token at each
    (masked) position. With a task head (``model.head``) the result is the
    head's: ``[B, C]`` class logits, or ``[B, T, 2]`` start/end logits.

    Args:
      tokens_BT: int token ids, ``T <= max_len``.
      positions_BT: the position of each token (for RoPE or the learned
        table); defaults to ``0..T-1`` in every row. A decoder with left
        padding or packed sequences passes its own. Values must be below
        ``max_len`` for learned positions.
      segment_ids_BT: with packed sequences, the example each token belongs
        to; a token then attends only within its own segment
        (``attention_mask``); padding takes 0. None: one sequence per row.
      token_types_BT: which text of a pair each token belongs to (0 or 1),
        for a model with a token-type table; None means all 0.
      return_hidden: return the hidden states ``[B, T, D]`` (compute dtype)
        the LM head reads, instead of logits, for a loss that applies the
        head itself in chunks (``lm_head_DV``, ``lm_head_bias_V``); with a
        task head, the encoder's last states.
    """
    x_BTD = self.encode(tokens_BT, positions_BT, segment_ids_BT=segment_ids_BT,
                        token_types_BT=token_types_BT)
    if self.head is not None:
      return x_BTD if return_hidden else self.head(x_BTD)
    if self.mlm_head is not None:
      x_BTD = self.mlm_head(x_BTD)
    if return_hidden:
      return x_BTD
    if self.lm_head is None:
      logits_BTV = self.embed.attend(x_BTD)
    else:
      logits_BTV = self.lm_head(x_BTD)
    if self.mlm_head is not None:
      logits_BTV = logits_BTV + self.mlm_head.bias[...]
    return logits_BTV.astype(jnp.float32)

  def encode(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, *,
             segment_ids_BT: jax.Array | None = None,
             token_types_BT: jax.Array | None = None) -> jax.Array:
    """The last hidden states ``[B, T, D]`` (final-normed), before any head."""
    B, T = tokens_BT.shape
    if T > self.cfg.max_len:
      raise ValueError(f'sequence length {T} exceeds max_len={self.cfg.max_len}')
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD = self.embed(tokens_BT)
    rope = None
    if self.pos_embed is not None:
      x_BTD = x_BTD + self.pos_embed(positions_BT + self.cfg.position_offset)
    else:
      rope = rope_tables(positions_BT, self.cfg.head_dim, self.cfg.rope_theta,
                         scaling_factor=self.cfg.rope_scaling_factor)
    if self.type_embed is not None:
      if token_types_BT is None:
        token_types_BT = jnp.zeros_like(tokens_BT)
      x_BTD = x_BTD + self.type_embed(token_types_BT)
    if self.embed_norm is not None:
      x_BTD = self.embed_norm(x_BTD)
    mask_BTS = attention.attention_mask(segment_ids_BT, self.cfg.causal, length=T)
    if self.cfg.scan_layers:
      x_BTD = self._scan_blocks(x_BTD, rope, mask_BTS)
    for block in ([] if self.cfg.scan_layers else self.blocks):
      if self.cfg.remat == 'none':
        x_BTD = block(x_BTD, rope, mask_BTS)
      else:
        # Activations inside the block are recomputed in the backward pass
        # instead of held: memory per layer drops to (about) its input.
        x_BTD = nnx.remat(lambda blk, x: blk(x, rope, mask_BTS),
                          policy=REMAT_POLICIES[self.cfg.remat])(block, x_BTD)
    return x_BTD if self.final_norm is None else self.final_norm(x_BTD)

  def lm_head_DV(self) -> jax.Array:
    """The LM head as a ``[D, V]`` matrix in the compute dtype (tied: the table)."""
    if self.lm_head is None:
      return self.embed.table[...].astype(self.cfg.compute_dtype).T
    return self.lm_head.kernel[...].astype(self.cfg.compute_dtype)

  def lm_head_bias_V(self) -> jax.Array | None:
    """The output bias ``[V]`` of BERT's masked-LM head, or None."""
    return None if self.mlm_head is None else self.mlm_head.bias[...]

  def _scan_blocks(self, x_BTD: jax.Array, rope, mask_BTS: jax.Array) -> jax.Array:
    """Runs the stacked blocks as one ``lax.scan``: one block body to compile."""
    graphdef, stacked = nnx.split(self.blocks)

    def body(x_BTD, layer):
      return nnx.merge(graphdef, layer)(x_BTD, rope, mask_BTS), None

    if self.cfg.remat != 'none':
      # As unrolled: each layer keeps (about) its input for the backward pass.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.cfg.remat],
                            prevent_cse=False)
    x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
    return x_BTD


class RewardModel(Transformer):
  """The decoder with a scalar reward head read at a response's last token.

  ``reward_head.kernel`` is ``[D, 1]`` with logical axes ``('embed', None)``,
  no bias (a Bradley-Terry loss cannot see one). The LM head stays (unused by
  the reward), so a reward model starts from any SFT run's parameters.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.reward_head = heads.reward_head(cfg, rngs=rngs)

  def score(self, tokens_BT: jax.Array, last_B: jax.Array,
            positions_BT: jax.Array | None = None) -> jax.Array:
    """float32 rewards ``[B]``: the head on row b's hidden state at ``last_B[b]``.

    Rows are right-padded (causal attention: what follows ``last_B`` cannot
    change it); ``last_B`` is the position of the last token of the response.
    """
    hidden_BTD = self(tokens_BT, positions_BT, return_hidden=True)
    hidden_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], axis=1)[:, 0]
    return self.reward_head(hidden_BD)[:, 0]


def model_class(objective: str) -> type[Transformer]:
  """The module a run of ``config.objective`` trains."""
  return RewardModel if objective == 'reward' else Transformer


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """``num_layers`` Blocks as one, each parameter stacked on a 'layers' axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return Block(cfg, rngs=rngs)

  return make(rngs)


def stack_blocks(params: dict) -> dict:
  """Unrolled params (``blocks/0/...``, ``blocks/1/...``) to the scanned layout.

  Args:
    params: a pure dict of parameters of a ``scan_layers=False`` model.

  Returns:
    The same dict with ``blocks`` one tree whose leaves are stacked along a new
    leading axis (layer 0 first), as a ``scan_layers=True`` model holds them.
  """
  blocks = params['blocks']
  layers = [blocks[i] for i in sorted(blocks, key=int)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, 'blocks': stacked}


def unstack_blocks(params: dict) -> dict:
  """The scanned layout back to ``blocks/0/...``: the inverse of ``stack_blocks``."""
  stacked = params['blocks']
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  blocks = {i: jax.tree.map(lambda x, i=i: x[i], stacked)
            for i in range(num_layers)}
  return {**params, 'blocks': blocks}


def with_xla_matmuls(graphdef, params):
  """``graphdef`` with every matmul on XLA's dot (``model.cpu_matmul='xla'``).

  For what leaves the process: a SavedModel or ``jax.export`` artifact cannot
  carry the oneMKL custom call (llm_jax/model/cpu_matmul.py), and XLA's dot
  gives the same numbers.

  Args:
    graphdef: the model's graph definition (``nnx.split``).
    params: its parameters (a pure dict or state), needed to rebuild it.

  Returns:
    The new graph definition; the parameters are unchanged.
  """
  model = nnx.merge(graphdef, params)
  for _, module in nnx.iter_modules(model):
    if hasattr(module, 'cpu_matmul'):
      module.cpu_matmul = 'xla'
  return nnx.split(model)[0]


def abstract_params(model_cfg) -> dict:
  """Shapes of the model's parameters (no memory), as a pure nested dict."""
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  return nnx.to_pure_dict(state)
