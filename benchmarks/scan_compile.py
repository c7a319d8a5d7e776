"""Compile time of the train step, unrolled against scanned layers, alternated.

    PYTHONPATH=. python benchmarks/scan_compile.py [--layers=24] [--remat=full] [--rounds=3]

Builds configs/base.py with the given depth and remat policy on one device and
times lower + compile of the whole train step (abstract state, nothing run)
with model.scan_layers False then True, ROUNDS times, so both see the same
machine load. Prints each round and the medians (benchmarks/README.md).
"""

import argparse
import statistics
import time

from llm_jax.perf import measure as bench
from llm_jax.core import configuration


def compile_seconds(layers: int, remat: str, scan: bool) -> tuple[float, float]:
  c = configuration.load_preset('base')
  c.mesh.data = 1
  c.model.num_layers, c.model.remat, c.model.scan_layers = layers, remat, scan
  tr = bench.build_trainer(c)
  state, batch = tr.abstract_state(), bench.random_batch(tr, c)
  t0 = time.perf_counter()
  lowered = tr.step_fn.lower(state, batch)
  t1 = time.perf_counter()
  lowered.compile()
  return t1 - t0, time.perf_counter() - t1


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--layers', type=int, default=24)
  parser.add_argument('--remat', default='full')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  totals = {False: [], True: []}
  for _ in range(args.rounds):
    for scan in (False, True):
      lower, comp = compile_seconds(args.layers, args.remat, scan)
      totals[scan].append(lower + comp)
      print(f'scan_layers={scan}: lower {lower:.2f} s + compile {comp:.2f} s', flush=True)
  unrolled, scanned = (statistics.median(totals[s]) for s in (False, True))
  print(f'median: unrolled {unrolled:.2f} s, scanned {scanned:.2f} s: '
        f'{unrolled / scanned:.1f}x faster to compile')


if __name__ == '__main__':
  main()
