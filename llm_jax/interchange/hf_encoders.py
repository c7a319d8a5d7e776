"""BERT and RoBERTa checkpoints in and out: the encoder half of ``interchange/hf.py``.

Reads and writes ``BertForMaskedLM`` / ``RobertaForMaskedLM`` (and
``BertForPreTraining`` files, whose next-sentence head and pooler are left
behind), ``*ForSequenceClassification`` and ``*ForQuestionAnswering``. What
they need of the model (``configs/base.py``, ``model.*``): post-norm blocks
(``norm_position='post'``), a token-type table, learned positions read past
RoBERTa's padding offset (``position_offset = pad_token_id + 1``), exact
GELU (``gelu='exact'``), their LayerNorm epsilon, and BERT's masked-LM head
(``mlm_head``) or a task head (``head``: 'classification', 'qa';
``llm_jax/model/heads.py``).

Layouts as in hf.py: ``nn.Linear`` is ``[out, in]``; our kernels are
``[in..., out...]`` with heads as axes. The tied MLM decoder is the token
table (a file may carry a copy; it is checked for shape and left out).
"""

import numpy as np

from llm_jax.core.errors import UserError

FAMILIES = ('bert', 'roberta')
_HEADS = {'ForMaskedLM': 'lm', 'ForPreTraining': 'lm',
          'ForSequenceClassification': 'classification', 'ForQuestionAnswering': 'qa'}
ARCHITECTURES = {f'{name}{suffix}': family
                 for family, name in (('bert', 'Bert'), ('roberta', 'Roberta'))
                 for suffix in _HEADS}
_EXACT_GELU, _TANH_GELUS = 'gelu', ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
# What a classification/QA file keeps beside the body, and an MLM file's
# prefixes of heads it does not use (next-sentence prediction, the pooler).
OUTSIDE_BODY = ('cls.', 'classifier.', 'qa_outputs.')
_UNUSED_BY_MLM = ('cls.seq_relationship.', 'pooler.')


def head_of(hf: dict) -> str:
  """'lm', 'classification' or 'qa' from the config's architectures."""
  for arch in hf.get('architectures') or []:
    for suffix, head in _HEADS.items():
      if arch.endswith(suffix):
        return head
  return 'lm'


def labels_of(hf: dict) -> list[str]:
  """A classifier's label names in id order (``LABEL_0``, ... if unnamed)."""
  id2label = hf.get('id2label') or {}
  n = hf.get('num_labels') or len(id2label) or 2
  return [str(id2label.get(str(i), id2label.get(i, f'LABEL_{i}'))) for i in range(n)]


def model_settings(hf: dict, family: str) -> tuple[dict, int, int]:
  """(our config.model values, context length, vocab size) for a BERT/RoBERTa config."""
  act = hf.get('hidden_act', 'gelu')
  if act != _EXACT_GELU and act not in _TANH_GELUS:
    raise UserError(f'hidden_act={act!r} is not supported: BERT/RoBERTa import reads '
                    f"'gelu' (exact) and the tanh GELUs ({', '.join(_TANH_GELUS)}).")
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise UserError(f'position_embedding_type={hf["position_embedding_type"]!r} is not '
                    "supported: only 'absolute' (a learned table).")
  if hf.get('is_decoder') or hf.get('add_cross_attention'):
    raise UserError('This BERT/RoBERTa is configured as a decoder (is_decoder / '
                    'add_cross_attention); only encoders import.')
  d, n = hf['hidden_size'], hf['num_attention_heads']
  head = head_of(hf)
  offset = int(hf.get('pad_token_id', 1)) + 1 if family == 'roberta' else 0
  model = dict(kind='encoder', num_layers=hf['num_hidden_layers'], d_model=d,
               num_heads=n, num_kv_heads=n, head_dim=d // n,
               mlp_dim=hf['intermediate_size'], norm='layernorm', norm_position='post',
               position='learned', mlp='gelu',
               gelu='exact' if act == _EXACT_GELU else 'tanh',
               norm_eps=float(hf.get('layer_norm_eps', 1e-12)),
               tie_embeddings=bool(hf.get('tie_word_embeddings', True)), use_bias=True,
               qkv_bias=False, type_vocab_size=int(hf.get('type_vocab_size', 2)),
               position_offset=offset, mlm_head=head == 'lm', head=head,
               num_labels=len(labels_of(hf)) if head == 'classification' else 0)
  return model, hf['max_position_embeddings'] - offset, hf['vocab_size']


def hf_config(c, family: str, tokenizer=None, labels=()) -> dict:
  """The HF ``config.json`` of our encoder in ``family``'s format."""
  name = 'Bert' if family == 'bert' else 'Roberta'
  suffix = {'lm': 'ForMaskedLM', 'classification': 'ForSequenceClassification',
            'qa': 'ForQuestionAnswering'}[c.head]
  pad = (c.position_offset - 1 if family == 'roberta' else
         max(tokenizer.pad_id, 0) if tokenizer is not None else 0)
  out = dict(architectures=[name + suffix], model_type=family, vocab_size=c.vocab_size,
             hidden_size=c.d_model, num_hidden_layers=c.num_layers,
             num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
             hidden_act='gelu' if c.gelu == 'exact' else 'gelu_new',
             max_position_embeddings=c.position_rows, type_vocab_size=c.type_vocab_size,
             layer_norm_eps=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
             position_embedding_type='absolute', pad_token_id=pad, torch_dtype='float32')
  if tokenizer is not None and family == 'roberta':
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  if c.head == 'classification':
    names = list(labels) or [f'LABEL_{i}' for i in range(c.num_labels)]
    out.update(num_labels=c.num_labels, id2label=dict(enumerate(names)),
               label2id={n: i for i, n in enumerate(names)})
  return out


def wanted(c, family: str) -> dict:
  """The model settings ``family``'s format needs (export checks each)."""
  out = dict(kind='encoder', norm='layernorm', norm_position='post', position='learned',
             mlp='gelu', use_bias=True, qkv_bias=False, num_kv_heads=c.num_heads,
             head_dim=c.d_model // c.num_heads)
  if c.type_vocab_size < 1:
    out['type_vocab_size'] = 1 if family == 'roberta' else 2
  if c.head == 'lm':
    out['mlm_head'] = True
  if family == 'roberta' and c.position_offset < 1:
    out['position_offset'] = 2
  return out


# ---- Tensor mappings.


def _linear(src, name: str, shape_in_out: tuple[int, int]) -> np.ndarray:
  """An ``nn.Linear`` weight as our ``[in, out]`` kernel."""
  d_in, d_out = shape_in_out
  return src.take(f'{name}.weight', (d_out, d_in)).T


def _norm_from(src, out: dict, ours: str, theirs: str, D: int) -> None:
  out[f'{ours}/scale'] = src.take(f'{theirs}.weight', (D,))
  out[f'{ours}/bias'] = src.take(f'{theirs}.bias', (D,))


def from_hf(src, c, family: str) -> dict[str, np.ndarray]:
  """Our flat params from a BERT/RoBERTa file (``src`` is hf.py's ``_Source``)."""
  D, N, H, F, V = c.d_model, c.num_heads, c.head_dim, c.mlp_dim, c.vocab_size
  out = {'embed/table': src.take('embeddings.word_embeddings.weight', (V, D)),
         'pos_embed/table': src.take('embeddings.position_embeddings.weight',
                                     (c.position_rows, D)),
         'type_embed/table': src.take('embeddings.token_type_embeddings.weight',
                                      (c.type_vocab_size, D))}
  _norm_from(src, out, 'embed_norm', 'embeddings.LayerNorm', D)
  for i in range(c.num_layers):
    h, b = f'encoder.layer.{i}.', f'blocks/{i}/'
    for ours, theirs in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      out[f'{b}attn/{ours}/kernel'] = _linear(
          src, f'{h}attention.self.{theirs}', (D, N * H)).reshape(D, N, H)
      out[f'{b}attn/{ours}/bias'] = src.take(
          f'{h}attention.self.{theirs}.bias', (N * H,)).reshape(N, H)
    out[f'{b}attn/o/kernel'] = _linear(
        src, f'{h}attention.output.dense', (N * H, D)).reshape(N, H, D)
    out[f'{b}attn/o/bias'] = src.take(f'{h}attention.output.dense.bias', (D,))
    _norm_from(src, out, f'{b}attn_norm', f'{h}attention.output.LayerNorm', D)
    out[f'{b}mlp/up/kernel'] = _linear(src, f'{h}intermediate.dense', (D, F))
    out[f'{b}mlp/up/bias'] = src.take(f'{h}intermediate.dense.bias', (F,))
    out[f'{b}mlp/down/kernel'] = _linear(src, f'{h}output.dense', (F, D))
    out[f'{b}mlp/down/bias'] = src.take(f'{h}output.dense.bias', (D,))
    _norm_from(src, out, f'{b}mlp_norm', f'{h}output.LayerNorm', D)
  {'lm': _mlm_from_hf, 'classification': _classifier_from_hf,
   'qa': _qa_from_hf}[c.head](src, c, family, out)
  return out


def _mlm_names(family: str) -> dict[str, str]:
  if family == 'bert':
    return dict(dense='cls.predictions.transform.dense',
                norm='cls.predictions.transform.LayerNorm', bias='cls.predictions.bias',
                decoder='cls.predictions.decoder')
  return dict(dense='lm_head.dense', norm='lm_head.layer_norm', bias='lm_head.bias',
              decoder='lm_head.decoder')


def _mlm_from_hf(src, c, family: str, out: dict) -> None:
  D, V = c.d_model, c.vocab_size
  names = _mlm_names(family)
  out['mlm_head/dense/kernel'] = _linear(src, names['dense'], (D, D))
  out['mlm_head/dense/bias'] = src.take(f'{names["dense"]}.bias', (D,))
  _norm_from(src, out, 'mlm_head/norm', names['norm'], D)
  out['mlm_head/bias'] = src.take(names['bias'], (V,))
  decoder = f'{names["decoder"]}.weight'
  if not c.tie_embeddings:
    out['lm_head/kernel'] = src.take(decoder, (V, D)).T
  elif src.has(decoder):
    src.take(decoder, (V, D))  # A copy of the token table.
  if src.has(f'{names["decoder"]}.bias'):
    src.take(f'{names["decoder"]}.bias', (V,))  # A copy of the bias.
  src.skip(_UNUSED_BY_MLM)


def _classifier_from_hf(src, c, family: str, out: dict) -> None:
  D, C = c.d_model, c.num_labels
  pool, final = (('pooler.dense', 'classifier') if family == 'bert' else
                 ('classifier.dense', 'classifier.out_proj'))
  out['head/pool/kernel'] = _linear(src, pool, (D, D))
  out['head/pool/bias'] = src.take(f'{pool}.bias', (D,))
  out['head/out/kernel'] = _linear(src, final, (D, C))
  out['head/out/bias'] = src.take(f'{final}.bias', (C,))


def _qa_from_hf(src, c, family: str, out: dict) -> None:
  del family
  out['head/out/kernel'] = _linear(src, 'qa_outputs', (c.d_model, 2))
  out['head/out/bias'] = src.take('qa_outputs.bias', (2,))


def to_hf(p: dict, c, family: str) -> dict[str, np.ndarray]:
  """The HF tensors of our flat params (the inverse of ``from_hf``)."""
  D, N, H = c.d_model, c.num_heads, c.head_dim
  e = f'{family}.'
  out = {f'{e}embeddings.word_embeddings.weight': p['embed/table'],
         f'{e}embeddings.position_embeddings.weight': p['pos_embed/table'],
         f'{e}embeddings.token_type_embeddings.weight': p['type_embed/table'],
         f'{e}embeddings.LayerNorm.weight': p['embed_norm/scale'],
         f'{e}embeddings.LayerNorm.bias': p['embed_norm/bias']}

  def linear(name: str, kernel: np.ndarray, bias: np.ndarray, d_in: int):
    out[f'{name}.weight'] = kernel.reshape(d_in, -1).T
    out[f'{name}.bias'] = bias.reshape(-1)

  def norm(name: str, ours: str):
    out[f'{name}.weight'], out[f'{name}.bias'] = p[f'{ours}/scale'], p[f'{ours}/bias']

  for i in range(c.num_layers):
    h, b = f'{e}encoder.layer.{i}.', f'blocks/{i}/'
    for ours, theirs in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      linear(f'{h}attention.self.{theirs}', p[f'{b}attn/{ours}/kernel'],
             p[f'{b}attn/{ours}/bias'], D)
    linear(f'{h}attention.output.dense', p[f'{b}attn/o/kernel'], p[f'{b}attn/o/bias'], N * H)
    norm(f'{h}attention.output.LayerNorm', f'{b}attn_norm')
    linear(f'{h}intermediate.dense', p[f'{b}mlp/up/kernel'], p[f'{b}mlp/up/bias'], D)
    linear(f'{h}output.dense', p[f'{b}mlp/down/kernel'], p[f'{b}mlp/down/bias'],
           c.mlp_dim)
    norm(f'{h}output.LayerNorm', f'{b}mlp_norm')
  if c.head == 'lm':
    names = _mlm_names(family)
    linear(names['dense'], p['mlm_head/dense/kernel'], p['mlm_head/dense/bias'], D)
    norm(names['norm'], 'mlm_head/norm')
    out[names['bias']] = p['mlm_head/bias']
    if not c.tie_embeddings:
      out[f'{names["decoder"]}.weight'] = p['lm_head/kernel'].T
  elif c.head == 'classification':
    pool, final = ((f'{e}pooler.dense', 'classifier') if family == 'bert' else
                   ('classifier.dense', 'classifier.out_proj'))
    linear(pool, p['head/pool/kernel'], p['head/pool/bias'], D)
    linear(final, p['head/out/kernel'], p['head/out/bias'], D)
  else:
    linear('qa_outputs', p['head/out/kernel'], p['head/out/bias'], D)
  return out
