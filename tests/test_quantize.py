"""Weight-only quantization (llm_jax/deploy/quantize.py): int4 packing, error bounds, sizes."""

import jax
import numpy as np
import pytest

from llm_jax.core.errors import UserError
from llm_jax.deploy import quantize

# Shapes as the model has them: [D, N, H] queries, [N, H, D] attention output
# (two input axes), [F, D] down, an embedding table (quantized along D), a
# kernel whose 37 inputs are no multiple of the group (padded), a norm scale.
SHAPES = {'blocks/0/attn/q/kernel': (64, 4, 16), 'blocks/0/attn/o/kernel': (4, 16, 64),
          'blocks/0/mlp/down/kernel': (192, 64), 'embed/table': (100, 64),
          'head/kernel': (37, 5), 'blocks/0/attn_norm/scale': (64,)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  flat = {name: (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)
          for name, shape in SHAPES.items()}
  flat['blocks/0/mlp/down/kernel'][::3] = 0.0  # Pruned weights must stay zero.
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(int(p) if p.isdigit() else p, {})
    node[leaf] = value
  return tree, flat


@pytest.mark.parametrize('group', [64, 16, 128])
def test_int4_error_is_at_most_half_a_step_of_its_group(group):
  tree, flat = _params()
  specs, arrays, treedef = quantize.flatten_params(tree, 'int4', group,
                                                   int4_embeddings=True)
  restored = quantize.unflatten_params(specs, arrays, treedef)
  stored = iter(arrays)
  for spec in specs:
    w = flat[spec.name]
    if spec.reduce_axes is None:
      np.testing.assert_array_equal(next(stored), w)  # Norms stay float32.
      continue
    packed, scale_gC = next(stored), next(stored)
    assert packed.dtype == np.uint8 and scale_gC.dtype == np.float32
    # Two weights a byte, plus the padding to whole groups.
    rows_RC, _ = quantize._as_rows(w, spec.reduce_axes)  # pylint: disable=protected-access
    assert packed.size == -(-rows_RC.shape[0] // spec.group) * spec.group * rows_RC.shape[1] // 2
    node = restored
    for part in spec.name.split('/'):
      node = node[int(part) if part.isdigit() else part]
    got_RC, _ = quantize._as_rows(np.asarray(node), spec.reduce_axes)  # pylint: disable=protected-access
    padded = np.pad(rows_RC, ((0, scale_gC.shape[0] * spec.group - rows_RC.shape[0]), (0, 0)))
    # Each group's own scale is its largest |w| / 7; the error is at most half of it.
    amax_gC = np.abs(padded.reshape(-1, spec.group, padded.shape[1])).max(axis=1)
    np.testing.assert_allclose(scale_gC, np.maximum(amax_gC, 1e-12) / 7, rtol=1e-6)
    bound_RC = np.repeat(scale_gC, spec.group, axis=0)[:rows_RC.shape[0]] / 2
    assert (np.abs(got_RC - rows_RC) <= bound_RC * (1 + 1e-5) + 1e-12).all(), spec.name
    np.testing.assert_array_equal(got_RC[rows_RC == 0], 0.0)


def test_int4_is_about_a_seventh_of_float32_and_half_of_int8():
  tree, _ = _params()
  sizes = {q: quantize.param_bytes(tree, q, 64, int4_embeddings=True)
           for q in quantize.FORMATS}
  assert 0.13 < sizes['int4'] / sizes['none'] < 0.2, sizes
  assert 0.5 < sizes['int4'] / sizes['int8'] < 0.65, sizes
  # By default the embedding table stays int8: in between.
  mixed = quantize.param_bytes(tree, 'int4', 64)
  table = 100 * 64
  assert mixed - sizes['int4'] == table - table // 2  # One scale a row either way.


def test_int4_keeps_embeddings_and_the_lm_head_int8_by_default():
  tree, flat = _params()
  tree['lm_head'] = {'kernel': flat['blocks/0/mlp/down/kernel'].T.copy()}
  specs, arrays, treedef = quantize.flatten_params(tree, 'int4', 64)
  bits = {s.name: s.bits for s in specs if s.reduce_axes is not None}
  assert bits.pop('embed/table') == 8 and bits.pop('lm_head/kernel') == 8
  assert set(bits.values()) == {4}
  restored = quantize.unflatten_params(specs, arrays, treedef)
  q, scale = quantize.quantize_int8(flat['embed/table'], (1,))
  np.testing.assert_array_equal(np.asarray(restored['embed']['table']),
                                q.astype(np.float32) * scale)


def test_int4_needs_an_even_group():
  tree, _ = _params()
  for group in (0, 7):
    with pytest.raises(UserError, match=f'--group_size={group}: int4 packs two'):
      quantize.flatten_params(tree, 'int4', group)


@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_expand_lays_out_the_dequantised_leaves_as_a_float32_export_stores_them(fmt):
  """What a served quantized export fills its float32 copies with (deploy.saved_model)."""
  tree, _ = _params()
  matrices = {'blocks/0/attn/q/kernel': 1, 'blocks/0/attn/o/kernel': 2}
  specs, arrays, treedef = quantize.flatten_params(tree, fmt, 16, matrices=matrices)
  float_specs, values = quantize.expand(specs, arrays, matrices)
  want_specs, want = quantize.flatten_params(
      quantize.dequantized(tree, fmt, 16), 'none', matrices=matrices)[:2]
  assert float_specs == want_specs
  assert [v.shape for v in values] == [w.shape for w in want]
  assert values[[s.name for s in specs].index('blocks/0/attn/q/kernel')].shape == (64, 64)
  for got, ref in zip(values, want):
    np.testing.assert_array_equal(np.asarray(got), ref)
  # Both rebuild the same params.
  again = quantize.unflatten_params(float_specs, values, treedef)
  for got, ref in zip(jax.tree.leaves(again), jax.tree.leaves(
      quantize.unflatten_params(specs, arrays, treedef))):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
