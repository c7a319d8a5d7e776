r"""Hugging Face checkpoints in and out (the command is ``python -m llm_jax.convert``).

Commands:

  import        --hf_dir=DIR --workdir=OUT [--seq_len=N]
                reads ``config.json`` and ``*.safetensors`` (one file or a
                ``model.safetensors.index.json`` shard set) of a GPT-2
                (``GPT2LMHeadModel``), LLaMA-family (``LlamaForCausalLM``,
                ``MistralForCausalLM``, ``Qwen2ForCausalLM``) or BERT/RoBERTa
                (``*ForMaskedLM``, ``*ForSequenceClassification``,
                ``*ForQuestionAnswering``; ``hf_encoders.py``) model and
                writes an llm_jax workdir: ``config.json``, the tokenizer
                (``tokenizer.model``, or ``tokenizer.json`` from
                tokenizer.json / vocab.txt / vocab.json + merges.txt) and
                ``checkpoints/0/`` (the weights, a fresh optimizer state).
  export        --workdir=RUN --out=DIR [--format=llama|qwen2|gpt2|bert|roberta] [--step=N]
                writes ``config.json`` + ``model.safetensors`` (and the
                tokenizer) that ``transformers`` loads with ``from_pretrained``.
  extend_vocab  --workdir=RUN --text=GLOB --num_pieces=N --out=OUT
                learns up to N SentencePiece pieces from the text files (or
                JSONL 'text' fields), appends those the tokenizer lacks (old
                ids unchanged) and writes OUT: the model with grown embedding
                and output rows (new rows at the mean of the old ones) and the
                merged tokenizer.model. Continue it with init_from.

Only safetensors are read or written (never pickle). A tensor the mapping does
not expect, one it expects but cannot find, or one of the wrong shape stops
the command with one line naming it. Everything is written to a temporary
directory and renamed into place, so an interrupted run leaves nothing half
written under the final name.

Layouts: torch ``nn.Linear`` stores ``[out, in]`` and GPT-2's ``Conv1D``
stores ``[in, out]``; our kernels are ``[in..., out...]`` with heads as axes
(``[D, N, H]`` for queries, ``[N, H, D]`` for the output projection). RoPE
needs no permutation: the model uses HF's rotate-half layout.
"""

import glob
import json
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from llm_jax.core import files
from llm_jax.core.configuration import base_config
from llm_jax.core.errors import UserError
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.interchange import hf_encoders
from llm_jax.model import lora
from llm_jax.model.transformer import ModelConfig, abstract_params
from llm_jax.runs import workdir as workdir_lib
from llm_jax.training.checkpoint import flatten_params, unflatten_like

SAFETENSORS_INDEX = 'model.safetensors.index.json'
SAFETENSORS_FILE = 'model.safetensors'
FORMATS = ('llama', 'qwen2', 'gpt2', *hf_encoders.FAMILIES)
_ARCHITECTURES = {
    'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2',
    **hf_encoders.ARCHITECTURES}
_MODEL_TYPES = {'gpt2': 'gpt2', 'llama': 'llama', 'mistral': 'llama',
                'qwen2': 'qwen2', 'bert': 'bert', 'roberta': 'roberta'}
# Tensors some checkpoints carry that are buffers, not weights: causal-mask
# tables of old GPT-2 files, the RoPE frequencies of old LLaMA files and the
# position / token-type id buffers of old BERT files (int64).
_BUFFER_SUFFIXES = ('.position_ids', '.token_type_ids')  # int64: never read.
_IGNORED_SUFFIXES = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq',
                     *_BUFFER_SUFFIXES)
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


# ---- Reading a HF directory.


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise UserError(f'Cannot read {path} ({e.strerror}): --hf_dir must be a '
                    'Hugging Face model directory with config.json.') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e}).') from None


def hf_family(hf: dict) -> str:
  """'gpt2', 'llama' or 'qwen2' from the config's architectures / model_type."""
  for arch in hf.get('architectures') or []:
    if arch in _ARCHITECTURES:
      return _ARCHITECTURES[arch]
  if hf.get('model_type') in _MODEL_TYPES:
    return _MODEL_TYPES[hf['model_type']]
  raise UserError(
      f'Unsupported model: architectures={hf.get("architectures")}, '
      f'model_type={hf.get("model_type")!r}. convert reads '
      f'{", ".join(_ARCHITECTURES)}.')


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint by name (shards included), memory-mapped.

  Values keep their stored dtype (bfloat16 through ml_dtypes, which
  ``safetensors.numpy`` cannot read); the mapping casts to float32.
  """
  index_path = os.path.join(hf_dir, SAFETENSORS_INDEX)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)['weight_map']
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(os.path.basename(p) for p in
                   glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    pickles = ([p for p in os.listdir(hf_dir) if p.endswith(('.bin', '.pt', '.pth'))]
               if os.path.isdir(hf_dir) else [])
    hint = (f' It has {", ".join(pickles)}: pickle files are never loaded; '
            'convert them with transformers (save_pretrained(..., '
            'safe_serialization=True)) first.') if pickles else ''
    raise UserError(f'No *.safetensors in {hf_dir}.{hint}')
  tensors = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    if not os.path.exists(path):
      raise UserError(f'{SAFETENSORS_INDEX} names the shard {name}, which is '
                      f'missing from {hf_dir}.')
    tensors.update(_map_safetensors(path))
  return tensors


def _map_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of one .safetensors file as read-only memory maps."""
  dtypes = {'F32': np.float32, 'F16': np.float16, 'F64': np.float64,
            'BF16': ml_dtypes.bfloat16}
  try:
    with open(path, 'rb') as f:
      (size,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(size))
    data = np.memmap(path, np.uint8, 'r', offset=8 + size)
  except (OSError, ValueError, struct.error) as e:
    raise UserError(f'{path} is not a readable safetensors file ({e}).') from None
  out = {}
  for key, info in header.items():
    if key == '__metadata__' or key.endswith(_BUFFER_SUFFIXES):
      continue
    if info['dtype'] not in dtypes:
      raise UserError(f'Tensor {key!r} in {path} is {info["dtype"]}; only float '
                      f'tensors ({", ".join(dtypes)}) can be imported (dequantize '
                      'the checkpoint first).')
    start, end = info['data_offsets']
    out[key] = data[start:end].view(dtypes[info['dtype']]).reshape(info['shape'])
  return out


# ---- HF config <-> our config.model.


def _rope_settings(hf: dict) -> tuple[float, float]:
  """(theta, linear scaling factor) from old or new style HF configs."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  theta = params.get('rope_theta', hf.get('rope_theta', 10_000.0))
  kind = (params.get('rope_type') or scaling.get('rope_type')
          or scaling.get('type') or 'default')
  if kind == 'default':
    return float(theta), 1.0
  if kind == 'linear':
    factor = params.get('factor', scaling.get('factor'))
    return float(theta), float(factor)
  raise UserError(
      f'RoPE scaling type {kind!r} in config.json is not supported: only '
      "'linear' (and none) are. Import a model without it, or add that scaling "
      'to llm_jax/model/transformer.py rope_tables.')


def model_settings(hf: dict) -> tuple[str, dict, int, int]:
  """Our ``config.model`` values for a HF config.

  Returns:
    (family, model overrides, the model's context length, vocab size).
  """
  family = hf_family(hf)
  if family in hf_encoders.FAMILIES:
    return family, *hf_encoders.model_settings(hf, family)
  if family == 'gpt2':
    d, n = hf['n_embd'], hf['n_head']
    act = hf.get('activation_function', 'gelu_new')
    if act not in _TANH_GELUS:
      raise UserError(f'GPT-2 activation_function={act!r} is not supported: the '
                      f'model uses the tanh GELU ({", ".join(_TANH_GELUS)}).')
    if hf.get('scale_attn_by_inverse_layer_idx') or not hf.get('scale_attn_weights', True):
      raise UserError('GPT-2 attention scaling other than 1/sqrt(head_dim) '
                      '(scale_attn_by_inverse_layer_idx, scale_attn_weights) is '
                      'not supported.')
    model = dict(num_layers=hf['n_layer'], d_model=d, num_heads=n, num_kv_heads=n,
                 head_dim=d // n, mlp_dim=hf.get('n_inner') or 4 * d,
                 norm='layernorm', position='learned', mlp='gelu',
                 norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
                 tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
                 use_bias=True, qkv_bias=False)
    return family, model, hf['n_positions'], hf['vocab_size']
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'hidden_act={hf["hidden_act"]!r} is not supported: the '
                    "LLaMA-family import needs 'silu' (SwiGLU).")
  d, n = hf['hidden_size'], hf['num_attention_heads']
  theta, factor = _rope_settings(hf)
  attention_bias, mlp_bias = hf.get('attention_bias', False), hf.get('mlp_bias', False)
  if attention_bias != mlp_bias:
    raise UserError(
        f'attention_bias={attention_bias}, mlp_bias={mlp_bias}: the model has '
        'biases on every dense layer or none (or on q/k/v only, as Qwen2).')
  model = dict(num_layers=hf['num_hidden_layers'], d_model=d, num_heads=n,
               num_kv_heads=hf.get('num_key_value_heads') or n,
               head_dim=hf.get('head_dim') or d // n, mlp_dim=hf['intermediate_size'],
               norm='rmsnorm', position='rope', mlp='swiglu', rope_theta=theta,
               rope_scaling_factor=factor, norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
               tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
               use_bias=bool(attention_bias), qkv_bias=family == 'qwen2')
  context = hf.get('max_position_embeddings', 2048)
  window = hf.get('sliding_window')
  if window and hf.get('use_sliding_window', True) and window < context:
    # Within the window, sliding-window attention is plain causal attention.
    context = window
  return family, model, context, hf['vocab_size']


def hf_config(model_cfg, family: str, tokenizer=None, labels=()) -> dict:
  """The HF ``config.json`` of our model in ``family``'s format."""
  c = model_cfg
  if family in hf_encoders.FAMILIES:
    return hf_encoders.hf_config(c, family, tokenizer, labels)
  common = dict(vocab_size=c.vocab_size, torch_dtype='float32',
                tie_word_embeddings=c.tie_embeddings)
  if tokenizer is not None:
    common.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  if family == 'gpt2':
    return dict(common, architectures=['GPT2LMHeadModel'], model_type='gpt2',
                n_embd=c.d_model, n_head=c.num_heads, n_layer=c.num_layers,
                n_positions=c.max_len, n_inner=c.mlp_dim,
                activation_function='gelu_new', layer_norm_epsilon=c.norm_eps,
                scale_attn_weights=True, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0)
  arch = 'Qwen2ForCausalLM' if family == 'qwen2' else 'LlamaForCausalLM'
  out = dict(common, architectures=[arch], model_type=family,
             hidden_size=c.d_model, intermediate_size=c.mlp_dim,
             num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
             num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
             hidden_act='silu', rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
             max_position_embeddings=c.max_len)
  if c.rope_scaling_factor != 1.0:
    out['rope_scaling'] = {'rope_type': 'linear', 'type': 'linear',
                           'factor': c.rope_scaling_factor}
  if family == 'llama':
    out.update(attention_bias=c.use_bias, mlp_bias=c.use_bias)
  return out


def export_family(model_cfg, requested: str = '') -> str:
  """The HF format our model fits (checking ``requested`` if given)."""
  c = model_cfg
  natural = (('roberta' if c.position_offset else 'bert') if not c.causal else
             'gpt2' if c.position == 'learned' else
             'qwen2' if c.qkv_bias and not c.use_bias else 'llama')
  family = requested or natural
  if family not in FORMATS:
    raise UserError(f'--format={family!r}: use one of {", ".join(FORMATS)}.')
  if family in hf_encoders.FAMILIES:
    wanted = hf_encoders.wanted(c, family)
  elif family == 'gpt2':
    wanted = dict(norm='layernorm', position='learned', mlp='gelu', use_bias=True,
                  num_kv_heads=c.num_heads, head_dim=c.d_model // c.num_heads)
  elif family == 'qwen2':
    wanted = dict(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
                  qkv_bias=True)
  else:
    wanted = dict(norm='rmsnorm', position='rope', mlp='swiglu', qkv_bias=False)
  for key, value in wanted.items():
    if getattr(c, key) != value:
      raise UserError(
          f'This model has model.{key}={getattr(c, key)!r}; the {family} format '
          f'needs {value!r}' +
          (f'. Try --format={natural}.' if natural != family else '.'))
  return family


# ---- Tensor mappings. Ours are flat 'blocks/0/attn/q/kernel' paths.


class _Source:
  """HF tensors by name; ``take`` checks shapes and records what was used."""

  def __init__(self, tensors: dict[str, np.ndarray], prefix: str):
    self.tensors = tensors
    self.prefix = prefix
    self.used = set()

  def has(self, name: str) -> bool:
    return self._key(name) in self.tensors

  def _key(self, name: str) -> str:
    if name.startswith(('lm_head', *hf_encoders.OUTSIDE_BODY)):
      return name  # Beside the body, not in it.
    # Files saved from the bare model (GPT2Model) lack the 'transformer.' prefix.
    full = self.prefix + name
    return name if full not in self.tensors and name in self.tensors else full

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    key = self._key(name)
    if key not in self.tensors:
      raise UserError(f'The checkpoint has no tensor {key!r} '
                      f'(expected shape {list(shape)}); is config.json from the '
                      'same model as the safetensors files?')
    value = self.tensors[key]
    if tuple(value.shape) != tuple(shape):
      raise UserError(f'Tensor {key!r} has shape {list(value.shape)}, but '
                      f'config.json implies {list(shape)}.')
    self.used.add(key)
    return np.asarray(value, np.float32)

  def skip(self, prefixes: tuple[str, ...]) -> None:
    """Marks tensors under ``prefixes`` (in or beside the body) as left out."""
    full = (*prefixes, *(self.prefix + p for p in prefixes))
    self.used.update(k for k in self.tensors if k.startswith(full))

  def check_all_used(self) -> None:
    extra = sorted(k for k in self.tensors if k not in self.used
                   and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
      raise UserError(f'The checkpoint has {len(extra)} tensor(s) the model does '
                      f'not use, first {extra[0]!r} (shape '
                      f'{list(self.tensors[extra[0]].shape)}); does config.json '
                      'describe these weights?')


def _gpt2_from_hf(src: _Source, c) -> dict[str, np.ndarray]:
  D, N, H, F, V = c.d_model, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size
  out = {'embed/table': src.take('wte.weight', (V, D)),
         'pos_embed/table': src.take('wpe.weight', (c.max_len, D)),
         'final_norm/scale': src.take('ln_f.weight', (D,)),
         'final_norm/bias': src.take('ln_f.bias', (D,))}
  for i in range(c.num_layers):
    h, b = f'h.{i}.', f'blocks/{i}/'
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      out[f'{b}{ours}/scale'] = src.take(f'{h}{theirs}.weight', (D,))
      out[f'{b}{ours}/bias'] = src.take(f'{h}{theirs}.bias', (D,))
    # Conv1D is [in, out]; c_attn's outputs are q, k, v side by side.
    qkv = src.take(f'{h}attn.c_attn.weight', (D, 3 * D))
    qkv_bias = src.take(f'{h}attn.c_attn.bias', (3 * D,))
    for j, name in enumerate('qkv'):
      out[f'{b}attn/{name}/kernel'] = qkv[:, j * D:(j + 1) * D].reshape(D, N, H)
      out[f'{b}attn/{name}/bias'] = qkv_bias[j * D:(j + 1) * D].reshape(N, H)
    out[f'{b}attn/o/kernel'] = src.take(f'{h}attn.c_proj.weight', (D, D)).reshape(N, H, D)
    out[f'{b}attn/o/bias'] = src.take(f'{h}attn.c_proj.bias', (D,))
    out[f'{b}mlp/up/kernel'] = src.take(f'{h}mlp.c_fc.weight', (D, F))
    out[f'{b}mlp/up/bias'] = src.take(f'{h}mlp.c_fc.bias', (F,))
    out[f'{b}mlp/down/kernel'] = src.take(f'{h}mlp.c_proj.weight', (F, D))
    out[f'{b}mlp/down/bias'] = src.take(f'{h}mlp.c_proj.bias', (D,))
  _lm_head_from_hf(src, c, out)
  return out


def _lm_head_from_hf(src: _Source, c, out: dict) -> None:
  if not c.tie_embeddings:
    out['lm_head/kernel'] = src.take('lm_head.weight', (c.vocab_size, c.d_model)).T
  elif src.has('lm_head.weight'):
    src.take('lm_head.weight', (c.vocab_size, c.d_model))  # A copy of the table.


def _gpt2_to_hf(p: dict, c) -> dict[str, np.ndarray]:
  D = c.d_model
  out = {'transformer.wte.weight': p['embed/table'],
         'transformer.wpe.weight': p['pos_embed/table'],
         'transformer.ln_f.weight': p['final_norm/scale'],
         'transformer.ln_f.bias': p['final_norm/bias']}
  for i in range(c.num_layers):
    h, b = f'transformer.h.{i}.', f'blocks/{i}/'
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      out[f'{h}{theirs}.weight'] = p[f'{b}{ours}/scale']
      out[f'{h}{theirs}.bias'] = p[f'{b}{ours}/bias']
    out[f'{h}attn.c_attn.weight'] = np.concatenate(
        [p[f'{b}attn/{n}/kernel'].reshape(D, D) for n in 'qkv'], axis=1)
    out[f'{h}attn.c_attn.bias'] = np.concatenate(
        [p[f'{b}attn/{n}/bias'].reshape(D) for n in 'qkv'])
    out[f'{h}attn.c_proj.weight'] = p[f'{b}attn/o/kernel'].reshape(D, D)
    out[f'{h}attn.c_proj.bias'] = p[f'{b}attn/o/bias']
    out[f'{h}mlp.c_fc.weight'] = p[f'{b}mlp/up/kernel']
    out[f'{h}mlp.c_fc.bias'] = p[f'{b}mlp/up/bias']
    out[f'{h}mlp.c_proj.weight'] = p[f'{b}mlp/down/kernel']
    out[f'{h}mlp.c_proj.bias'] = p[f'{b}mlp/down/bias']
  if not c.tie_embeddings:
    out['lm_head.weight'] = p['lm_head/kernel'].T
  return out


def _llama_from_hf(src: _Source, c) -> dict[str, np.ndarray]:
  D, N, K, H, F, V = (c.d_model, c.num_heads, c.num_kv_heads, c.head_dim,
                      c.mlp_dim, c.vocab_size)
  out = {'embed/table': src.take('embed_tokens.weight', (V, D)),
         'final_norm/scale': src.take('norm.weight', (D,))}
  for i in range(c.num_layers):
    h, b = f'layers.{i}.', f'blocks/{i}/'
    out[f'{b}attn_norm/scale'] = src.take(f'{h}input_layernorm.weight', (D,))
    out[f'{b}mlp_norm/scale'] = src.take(f'{h}post_attention_layernorm.weight', (D,))
    # nn.Linear is [out, in]: transpose, then split the out axis into heads.
    for name, heads in (('q', N), ('k', K), ('v', K)):
      w = src.take(f'{h}self_attn.{name}_proj.weight', (heads * H, D))
      out[f'{b}attn/{name}/kernel'] = w.T.reshape(D, heads, H)
      if c.use_bias or c.qkv_bias:
        out[f'{b}attn/{name}/bias'] = src.take(
            f'{h}self_attn.{name}_proj.bias', (heads * H,)).reshape(heads, H)
    out[f'{b}attn/o/kernel'] = src.take(
        f'{h}self_attn.o_proj.weight', (D, N * H)).T.reshape(N, H, D)
    for name, shape in (('gate', (F, D)), ('up', (F, D)), ('down', (D, F))):
      out[f'{b}mlp/{name}/kernel'] = src.take(f'{h}mlp.{name}_proj.weight', shape).T
    if c.use_bias:
      out[f'{b}attn/o/bias'] = src.take(f'{h}self_attn.o_proj.bias', (D,))
      for name, size in (('gate', F), ('up', F), ('down', D)):
        out[f'{b}mlp/{name}/bias'] = src.take(f'{h}mlp.{name}_proj.bias', (size,))
  _lm_head_from_hf(src, c, out)
  return out


def _llama_to_hf(p: dict, c) -> dict[str, np.ndarray]:
  D, N, K, H = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
  out = {'model.embed_tokens.weight': p['embed/table'],
         'model.norm.weight': p['final_norm/scale']}
  for i in range(c.num_layers):
    h, b = f'model.layers.{i}.', f'blocks/{i}/'
    out[f'{h}input_layernorm.weight'] = p[f'{b}attn_norm/scale']
    out[f'{h}post_attention_layernorm.weight'] = p[f'{b}mlp_norm/scale']
    for name, heads in (('q', N), ('k', K), ('v', K)):
      out[f'{h}self_attn.{name}_proj.weight'] = p[f'{b}attn/{name}/kernel'].reshape(
          D, heads * H).T
      if c.use_bias or c.qkv_bias:
        out[f'{h}self_attn.{name}_proj.bias'] = p[f'{b}attn/{name}/bias'].reshape(-1)
    out[f'{h}self_attn.o_proj.weight'] = p[f'{b}attn/o/kernel'].reshape(N * H, D).T
    for name in ('gate', 'up', 'down'):
      out[f'{h}mlp.{name}_proj.weight'] = p[f'{b}mlp/{name}/kernel'].T
    if c.use_bias:
      out[f'{h}self_attn.o_proj.bias'] = p[f'{b}attn/o/bias']
      for name in ('gate', 'up', 'down'):
        out[f'{h}mlp.{name}_proj.bias'] = p[f'{b}mlp/{name}/bias']
  if not c.tie_embeddings:
    out['lm_head.weight'] = p['lm_head/kernel'].T
  return out


_FROM_HF: dict[str, tuple[str, Callable]] = {
    'gpt2': ('transformer.', _gpt2_from_hf), 'llama': ('model.', _llama_from_hf),
    'qwen2': ('model.', _llama_from_hf),
    **{f: (f'{f}.', lambda src, c, f=f: hf_encoders.from_hf(src, c, f))
       for f in hf_encoders.FAMILIES}}
_TO_HF = {'gpt2': _gpt2_to_hf, 'llama': _llama_to_hf, 'qwen2': _llama_to_hf,
          **{f: lambda p, c, f=f: hf_encoders.to_hf(p, c, f) for f in hf_encoders.FAMILIES}}


def params_from_hf(family: str, tensors: dict[str, np.ndarray], model_cfg) -> dict:
  """Our nested params (numpy float32) from HF tensors; UserError on a misfit."""
  prefix, from_hf = _FROM_HF[family]
  src = _Source(tensors, prefix)
  flat = from_hf(src, model_cfg)
  src.check_all_used()
  like = abstract_params(model_cfg)
  expected = flatten_params(like)
  for path, spec in expected.items():
    # The mapping and the model are both ours, so a mismatch here is a bug.
    assert path in flat and flat[path].shape == spec.shape, (path, spec.shape)
  assert set(flat) == set(expected), sorted(set(flat) ^ set(expected))
  return unflatten_like({k: np.ascontiguousarray(v, np.float32)
                         for k, v in flat.items()}, like)


def params_to_hf(family: str, params: dict, model_cfg) -> dict[str, np.ndarray]:
  flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
  extra = sorted(k for k in flat if '/lora_' in k)
  if extra:
    raise UserError(f'The parameters still hold LoRA adapters ({extra[0]}); '
                    'merge them first (llm_jax.model.lora.merge).')
  return {k: np.ascontiguousarray(v) for k, v in
          _TO_HF[family](flat, model_cfg).items()}


# ---- Workdirs.


def build_config(model: dict, seq_len: int, vocab_size: int, name: str, labels=()):
  """A full config (configs/base.py) for an imported model."""
  config = base_config()
  config.name = name
  for key, value in model.items():
    config.model[key] = value
  config.data.seq_len = seq_len
  config.tokenizer.vocab_size = vocab_size
  if labels:  # An imported classifier's label names, in id order.
    config.task.labels = ','.join(labels)
  return config


def import_tokenizer(hf_dir: str):
  """The HF directory's tokenizer, or None if it has none.

  A SentencePiece ``tokenizer.model`` first (tensorflow-text runs it inside
  exports), else ``tokenizer.json``, ``vocab.json`` + ``merges.txt`` or
  ``vocab.txt`` through the Hugging Face backend.
  """
  sp_path = os.path.join(hf_dir, tokenizer_lib.SENTENCEPIECE_FILE)
  if os.path.exists(sp_path):
    return tokenizer_lib.Tokenizer.load(
        sp_path, fix='move it out of --hf_dir to import without a tokenizer')
  if any(os.path.exists(os.path.join(hf_dir, n))
         for n in ('tokenizer.json', 'vocab.json', 'vocab.txt')):
    return tokenizer_lib.load(hf_dir)
  return None


def import_hf(hf_dir: str, workdir: str, seq_len: int = 0) -> str:
  """Imports a HF checkpoint directory into a new llm_jax workdir.

  Args:
    hf_dir: holds config.json and *.safetensors (and maybe tokenizer.model).
    workdir: the run directory to create (must not exist or be empty).
    seq_len: the context to train with; 0 means the model's own
      (``n_positions`` / ``max_position_embeddings``, capped at a sliding
      window). A learned position table (GPT-2) needs its own length.

  Returns:
    The absolute workdir path.
  """
  hf = read_hf_config(hf_dir)
  family, model, context, vocab_size = model_settings(hf)
  if seq_len and model['position'] == 'learned' and seq_len != context:
    raise UserError(f'--seq_len={seq_len}: this model has a learned table of '
                    f'{context} positions; leave --seq_len out.')
  seq_len = seq_len or context
  labels = hf_encoders.labels_of(hf) if model.get('head') == 'classification' else ()
  config = build_config(model, seq_len, vocab_size,
                        os.path.basename(os.path.abspath(workdir)), labels)
  model_cfg = ModelConfig.from_config(config.model, vocab_size=vocab_size,
                                      max_len=context if model['position'] == 'learned'
                                      else seq_len)
  params = params_from_hf(family, read_safetensors(hf_dir), model_cfg)
  tokenizer = import_tokenizer(hf_dir)
  source = dict(hf_dir=os.path.abspath(hf_dir), family=family,
                architectures=hf.get('architectures'))
  return workdir_lib.write(workdir, config, params, vocab_size=vocab_size,
                         tokenizer=tokenizer, source=source, protect=(hf_dir,))


def export_hf(workdir: str, out_dir: str, fmt: str = '', step: int | None = None) -> str:
  """Writes a run's parameters as a HF directory (config + model.safetensors).

  ``out_dir`` must not be, hold or lie inside the run (checked before
  anything is read), and an existing non-empty ``out_dir`` is refused.
  """
  guard = dict(protect=(os.path.abspath(workdir),), what='Hugging Face export')
  files.check_replaceable(os.path.abspath(out_dir), marker=None, **guard)
  run = workdir_lib.load(workdir, step)
  params = run.params
  if any('/lora_' in k for k in flatten_params(params)):
    params = lora.merge(params, run.config.lora)
  family = export_family(run.model_cfg, fmt)
  tensors = params_to_hf(family, params, run.model_cfg)
  with files.atomic_dir(out_dir, **guard) as tmp:
    save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE), metadata={'format': 'pt'})
    labels = [n for n in run.config.task.labels.split(',') if n]
    files.atomic_write_json(os.path.join(tmp, 'config.json'),
                            hf_config(run.model_cfg, family, run.tokenizer, labels))
    for name, data in (run.tokenizer.files() if run.tokenizer is not None else {}).items():
      files.atomic_write(os.path.join(tmp, name), data)
  return os.path.abspath(out_dir)
