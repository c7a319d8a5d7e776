r"""Generation benchmark behind ``python -m llm_jax.bench decode``: JAX against the SavedModel.

Exports the run three times (float32, ``--quantize=int8`` and ``int4``, lowered for cpu only)
into a temporary directory, then times, per batch size, the same greedy
requests through ``decode.decode_jit`` (jitted, compiled before timing) and
through the SavedModel's ``serving_default`` (TF2 loader, warmed up):

* prefill: a request with ``max_new_tokens=1`` (prefill plus one sample);
* per-token latency: (full request - prefill) / (steps - 1);
* tokens/s: new tokens of the whole batch / full request time.

Stop tokens are off (the export is made with ``stop_ids=()``), so every row
produces exactly ``max_new_tokens`` tokens in both. Prints a Markdown table,
writes JSON. A measurement, not a test: figures vary with machine load.
"""

import os
import platform
import tempfile
import time

import jax
import numpy as np

from llm_jax.core import tfhost
from llm_jax.core.errors import UserError
from llm_jax.core.tfhost import tf
from llm_jax.deploy import saved_model as export
from llm_jax.inference import decode
from llm_jax.runs import workdir as workdir_lib


def _best(fn, repeats: int) -> float:
  """The fastest of ``repeats`` runs of ``fn`` (seconds); fn blocks."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def _measure(run_fn, batch: int, max_new: int, repeats: int) -> dict:
  run_fn(1)  # Compile / warm up this shape (max_new_tokens is a runtime value).
  run_fn(max_new)
  prefill = _best(lambda: run_fn(1), repeats)
  full = _best(lambda: run_fn(max_new), repeats)
  return {'prefill_ms': 1000 * prefill,
          'per_token_ms': 1000 * (full - prefill) / max(1, max_new - 1),
          'tokens_per_sec': batch * max_new / full, 'request_s': full}


def _export_sizes(run, tmp: str, width: int, log) -> dict:
  """Exports float32, int8 and int4 (cpu, no stop tokens); returns dirs and sizes."""
  result = {}
  for quantize in ('none', 'int8', 'int4'):
    out = os.path.join(tmp, quantize)
    # No stop tokens: every row runs the full width, as the JAX side does.
    info = export.export(run.workdir, out, quantize=quantize, max_new_tokens=width,
                         platforms=('cpu',), batch_buckets=(1,),
                         # The int4 export measures all three perplexities.
                         eval_batches=4 if quantize == 'int4' else 0,
                         stop_ids=(), log=log)
    result[quantize] = {'dir': out, 'saved_model_bytes': info['saved_model_bytes'],
                        'variables_bytes': export.dir_bytes(os.path.join(out, 'variables')),
                        'param_bytes': info['param_bytes'],
                        'perplexity': info.get('perplexity')}
  return result


def bench(workdir: str, batches: list[int], prompt_len: int, max_new: int,
          repeats: int, log=print) -> dict:
  """Runs the benchmark; returns the results dict (see the module docstring)."""
  tfhost.import_text()  # The text signature's ops, before loading the export.

  run = workdir_lib.load(workdir)
  cfg = run.model_cfg
  if prompt_len + max_new > cfg.max_len:
    raise UserError(f'--prompt_len={prompt_len} plus --max_new_tokens={max_new} exceed '
                    f'the context max_len={cfg.max_len}; lower one of them.')
  results = {'workdir': run.workdir, 'step': run.step, 'prompt_len': prompt_len,
             'max_new_tokens': max_new, 'params': cfg.num_params(),
             'machine': f'{platform.node()}: {os.cpu_count()} CPU cores, '
                        f'{platform.processor() or platform.machine()}',
             'jax': jax.__version__, 'tensorflow': tf.__version__, 'rows': []}
  with tempfile.TemporaryDirectory() as tmp:
    exports = _export_sizes(run, tmp, max_new, log)
    results['sizes'] = {k: {kk: vv for kk, vv in v.items() if kk != 'dir'}
                        for k, v in exports.items()}
    models = {k: tf.saved_model.load(v['dir']).signatures['serving_default']
              for k, v in exports.items()}
    rng = np.random.default_rng(0)
    for batch in batches:
      tokens = rng.integers(4, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
      lengths = np.full((batch,), prompt_len, np.int32)

      def jax_fn(n, tokens=tokens, lengths=lengths):
        out = decode.decode_jit(run.params, tokens, lengths, np.int32(n), np.float32(0),
                                np.int32(0), np.float32(1), np.int32(0),
                                graphdef=run.graphdef, width=max_new, stop_ids=(),
                                pad_id=0)
        jax.block_until_ready(out)

      def tf_fn(n, sig, tokens=tokens, lengths=lengths):
        out = sig(tokens=tf.constant(tokens), lengths=tf.constant(lengths),
                  max_new_tokens=tf.constant(n, tf.int32),
                  temperature=tf.constant(0.0), top_k=tf.constant(0),
                  top_p=tf.constant(1.0), seed=tf.constant(0))
        out['tokens'].numpy()

      for name, fn in (('JAX (jit)', jax_fn),
                       ('SavedModel float32', lambda n: tf_fn(n, models['none'])),
                       ('SavedModel int8', lambda n: tf_fn(n, models['int8'])),
                       ('SavedModel int4', lambda n: tf_fn(n, models['int4']))):
        row = {'engine': name, 'batch': batch, **_measure(fn, batch, max_new, repeats)}
        results['rows'].append(row)
        log(f'{name:20s} batch {batch}: {row["tokens_per_sec"]:8.1f} tokens/s')
  return results


def markdown(r: dict) -> str:
  """The results as a Markdown table plus the sizes."""
  lines = [f'Model: {r["params"]:,} parameters, prompt {r["prompt_len"]} tokens, '
           f'{r["max_new_tokens"]} new tokens per row, greedy; {r["machine"]}; '
           f'jax {r["jax"]}, tensorflow {r["tensorflow"]}.', '',
           '| engine | batch | prefill (ms) | per token (ms) | tokens/s |',
           '| --- | ---: | ---: | ---: | ---: |']
  for row in r['rows']:
    lines.append(f'| {row["engine"]} | {row["batch"]} | {row["prefill_ms"]:.1f} | '
                 f'{row["per_token_ms"]:.2f} | {row["tokens_per_sec"]:.0f} |')
  s = r['sizes']
  lines += ['', '| SavedModel | total size | variables/ |', '| --- | ---: | ---: |']
  for name, key in (('float32', 'none'), ('int8', 'int8'), ('int4', 'int4')):
    lines.append(f'| {name} | {s[key]["saved_model_bytes"] / 2**20:.2f} MiB | '
                 f'{s[key]["variables_bytes"] / 2**20:.2f} MiB |')
  ppl = s['int4'].get('perplexity')
  if ppl:
    lines += ['', f'Validation perplexity over {ppl["tokens"]:,} tokens: '
              f'{ppl["float32"]:.3f} (float32), ' + ', '.join(
                  f'{ppl[k]:.3f} ({k}, {100 * (ppl[k] / ppl["float32"] - 1):+.3f}%)'
                  for k in ('int8', 'int4')) + '.']
  return '\n'.join(lines)
