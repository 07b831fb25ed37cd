#!/usr/bin/env python
"""bfloat16 prefill on the CPU: the GEMM kernel (`cpu_kernels.gemm`) against XLA's own dots.

    python -m benchmarks.bf16_prefill --preset=3b --pairs=4

`ab_revisions.py` builds two parameter trees, which does not fit for 3b beside XLA's float32
copies in 23 GiB. Here one tree serves both prefills: one compiled as the pipeline compiles it,
one compiled while `cpu_kernels.available()` answers False (XLA widens every bfloat16 weight).
Reported: their logits' agreement, each side's peak resident memory after its first run, the
medians and the per-pair time ratio kernel / XLA (order flipped every pair).
"""
import argparse
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import decode as bench  # (benchmarks/decode.py: presets, lean 3b weights)
from paligemma_jax.sample import decode  # noqa: E402
from paligemma_jax.model import layouts, paligemma  # noqa: E402
from paligemma_jax.backends import cpu, cpu_kernels  # noqa: E402
from tests.specs import spec_config  # noqa: E402


def peak_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
  ap.add_argument("--pairs", type=int, default=6)
  args = ap.parse_args()
  if jax.default_backend() != "cpu" or not cpu_kernels.available():
    sys.exit("needs the CPU backend and the cpu_matvec kernel")
  spec = bench.PRESETS[args.preset]
  config = spec_config(spec)
  tree = layouts.unstacked(bench.init_params_lean(config, jnp.bfloat16), out_major=True)
  model = paligemma.PaliGemma(config, jnp.bfloat16, scan_layers=False)
  rng = np.random.default_rng(1)
  s, t = config.image_size, 16
  inputs = (jnp.asarray(rng.uniform(-1, 1, (1, s, s, 3)).astype(np.float32)),
            jnp.asarray(rng.integers(3, spec["vocab"], (1, t)).astype(np.int32)),
            jnp.ones((1, t), bool), jnp.zeros((1, t), jnp.int32))
  cache = config.num_image_tokens + t + 8

  def compiled():
    fn = decode.jit_prefill(model, cache_size=cache, cache_dtype=jnp.bfloat16)
    with cpu.install():
      return fn.lower(tree, *inputs).compile()

  fast = cpu_kernels.gemm_is_fast
  cpu_kernels.gemm_is_fast = lambda: True  # measured here whatever the CPU decides
  try:
    sides = {"kernel": compiled()}
  finally:
    cpu_kernels.gemm_is_fast = fast
  available = cpu_kernels.available
  cpu_kernels.available = lambda: False
  try:
    sides["xla"] = compiled()
  finally:
    cpu_kernels.available = available
  assert cpu_kernels.GEMM_TARGET in sides["kernel"].as_text()
  assert cpu_kernels.GEMM_TARGET not in sides["xla"].as_text()

  logits = {}
  for name, fn in sides.items():  # the kernel first: XLA's copies would raise its peak
    logits[name] = np.asarray(fn(tree, *inputs)[0], np.float32)
    print(f"{name}: peak resident memory after its first run {peak_gib():.1f} GiB")
  diff = np.abs(logits["kernel"] - logits["xla"]).max()
  same = (logits["kernel"].argmax(-1) == logits["xla"].argmax(-1)).all()
  print(f"logits max |diff| {diff:.3g} (of max {np.abs(logits['xla']).max():.3g}); "
        f"same argmax: {same}")
  times = {name: [] for name in sides}
  for i in range(args.pairs):
    for name in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(sides[name](tree, *inputs))
      times[name].append(time.perf_counter() - t0)
  k, x = np.array(times["kernel"]), np.array(times["xla"])
  r = k / x
  print(f"{args.preset} bfloat16 prefill: kernel {np.median(k) * 1e3:.0f} ms, XLA "
        f"{np.median(x) * 1e3:.0f} ms; kernel / XLA per pair: median {np.median(r):.3f} "
        f"[quartiles {np.percentile(r, 25):.3f}, {np.percentile(r, 75):.3f}], {len(r)} pairs")


if __name__ == "__main__":
  main()
