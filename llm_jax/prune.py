r"""Prune a trained run into a new one: ``python -m llm_jax.prune``.

    python -m llm_jax.prune --workdir=RUN --out=RUN_pruned --sparsity=0.5 \
        [--pattern=unstructured|2:4|rows|mlp_units|heads] [--scope=layer|global] \
        [--targets=mlp/*]

Magnitude pruning (unstructured, N:M such as 2:4, rows) zeroes weights of the
dense kernels in the Transformer blocks (attention q/k/v/o, MLP gate/up/down;
embeddings, LM head and norms are kept) and writes a run whose config sets
``prune.keep_zeros`` and whose ``prune_mask.safetensors`` holds the masks.
``--pattern=mlp_units`` removes the least important MLP hidden units of every
block (activations on --calibration_batches training batches times the down
projection's weights) and writes a smaller run (``model.mlp_dim`` smaller);
``--pattern=heads`` removes query heads the same way, as many from each
key/value group (``model.num_heads`` smaller).

Recover the lost quality by fine-tuning from the pruned run; zeros stay zero:

    python -m llm_jax.train --config=configs/continued.py:RUN_pruned \
        --config.train.steps=200 --workdir=RUN_recovered

docs/compression.md has the measured trade-offs. Bad input exits 2 with one
line; ``--help`` exits 0.
"""

from absl import flags

from llm_jax import cli
from llm_jax.compression import prune, structured

PROG = 'python -m llm_jax.prune'
FLAGS = cli.flag_values()
flags.DEFINE_string('workdir', None, 'The run to prune.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'The pruned run directory to create.', flag_values=FLAGS)
flags.DEFINE_float('sparsity', None, 'Share of the weights (or MLP units) to remove, in '
                   '[0, 1); implied by N:M.', flag_values=FLAGS)
flags.DEFINE_string('pattern', 'unstructured', "'unstructured', 'N:M' (e.g. 2:4), "
                    "'rows' (whole output channels); 'mlp_units' or 'heads' (a smaller "
                    "model).", flag_values=FLAGS)
flags.DEFINE_string('scope', 'layer', "unstructured: 'layer' (each kernel loses the "
                    "same share) or 'global' (one threshold over all).", flag_values=FLAGS)
flags.DEFINE_string('targets', '', "Comma-separated kernels to prune, e.g. 'mlp/*' or "
                    "'blocks/0/attn/q' (default: every block kernel).", flag_values=FLAGS)
flags.DEFINE_integer('calibration_batches', 8, 'mlp_units, heads: training batches '
                     'the importance is measured on.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step (default: newest).', flag_values=FLAGS)
flags.mark_flags_as_required(['workdir', 'out'], flag_values=FLAGS)


def _main() -> dict:
  if FLAGS.pattern in ('mlp_units', 'heads'):
    remove = (structured.remove_mlp_units if FLAGS.pattern == 'mlp_units' else
              structured.remove_heads)
    result = remove(FLAGS.workdir, FLAGS.out, share=FLAGS.sparsity,
                    calibration=FLAGS.calibration_batches, step=FLAGS.step)
    key = 'mlp_dim' if FLAGS.pattern == 'mlp_units' else 'num_heads'
    what = (f'{key} {result[key + "_before"]} -> {result[key]}, '
            f'{result["params"]:,} parameters')
  else:
    result = prune.prune(FLAGS.workdir, FLAGS.out, sparsity_share=FLAGS.sparsity,
                         pattern=FLAGS.pattern, scope=FLAGS.scope,
                         targets=FLAGS.targets, step=FLAGS.step)
    what = (f'{result["prunable_zeros"]:,} of {result["prunable_params"]:,} block kernel '
            f'weights zero ({100 * result["sparsity"]:.1f}%) in {result["kernels"]} '
            f'kernels; {result["params_nonzero"]:,} of {result["params"]:,} parameters '
            'non-zero')
  print(f'Wrote {result["out"]} ({FLAGS.pattern}): {what}.')
  print(f'Evaluate: python -m llm_jax.evaluate --workdir={result["out"]}\n'
        f'Recover:  python -m llm_jax.train --config=configs/continued.py:{result["out"]} '
        f'--workdir={result["out"]}_recovered')
  return result


def main(argv: list[str] | None = None) -> dict:
  """Runs the command on ``argv`` (default: the process's arguments)."""
  return cli.run(_main, FLAGS, argv, doc=__doc__, prog=PROG)


if __name__ == '__main__':
  main()
