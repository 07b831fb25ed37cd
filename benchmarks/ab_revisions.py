#!/usr/bin/env python
"""Two revisions of paligemma_jax in one process: prefill and decode times, paired.

    python -m benchmarks.ab_revisions --base=HEAD~2 [--preset=small --batch_size=1 --pairs=20]

On a shared machine the speed moves by tens of percent from minute to minute, so two runs of
`decode.py` cannot tell a 5% change. Here the base revision's package is exported with
`git archive` under another name (`paligemma_jax_base`), both are built from the same random
weights, and their compiled prefill and decode run alternately (the order flips every pair).
Reported: medians, and the median and quartiles of the per-pair ratio working tree / base.
The base must accept the calls in `build`: any revision since the out-major layout (session 4),
with the model's out_major flag or with model/ and backends/ (session 8 on).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BASE_NAME = "paligemma_jax_base"


def export_base(rev: str, into: str) -> str:
  """`git archive` of paligemma_jax/ at rev, renamed to BASE_NAME (imports rewritten)."""
  tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "paligemma_jax"], check=True,
                       capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", into], input=tar, check=True)
  pkg = os.path.join(into, BASE_NAME)
  os.rename(os.path.join(into, "paligemma_jax"), pkg)
  for folder, _, names in os.walk(pkg):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        with open(path) as f:
          text = re.sub(r"\bpaligemma_jax\b", BASE_NAME, f.read())
          # Its own FFI target names for the CPU kernels: a second registration of one name fails.
          text = text.replace('"paligemma_bf16_', '"paligemma_base_bf16_')
        with open(path, "w") as f:
          f.write(text)
  return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", rev], check=True,
                        capture_output=True, text=True).stdout.strip()


def _import_base(into: str):
  """Imports the exported base package by its location; its submodules resolve through it."""
  pkg = os.path.join(into, BASE_NAME)
  spec = importlib.util.spec_from_file_location(
      BASE_NAME, os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
  module = importlib.util.module_from_spec(spec)
  sys.modules[BASE_NAME] = module
  spec.loader.exec_module(module)


def build(pkg: str, config, params, dtype, text_len, max_decode_len):
  """-> (prefill, decode, params) of one revision's package `pkg`, each traced and run under
  that revision's one-device speed path: `backends.select` (model/ and backends/ since
  session 8), else the model's own out_major flag (sessions 4-7)."""
  import jax
  new = importlib.util.find_spec(f"{pkg}.backends") is not None
  decode = importlib.import_module(f"{pkg}.decode")
  paligemma = importlib.import_module(f"{pkg}.model.paligemma" if new else f"{pkg}.paligemma")
  cfg = paligemma.PaliGemmaConfig(vit=paligemma.vit_lib.ViTConfig(**vars(config.vit)),
                                  llm=paligemma.gemma_lib.GemmaConfig(**vars(config.llm)))
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  if new:
    layouts = importlib.import_module(f"{pkg}.model.layouts")
    install = importlib.import_module(f"{pkg}.backends").select(
        bfloat16=dtype == jax.numpy.bfloat16).install
    tree = layouts.unstacked(params, out_major=True)
    model = paligemma.PaliGemma(cfg, dtype, scan_layers=False)
  else:
    install = contextlib.nullcontext
    tree = paligemma.unstacked(params, out_major=True)
    model = paligemma.PaliGemma(cfg, dtype, scan_layers=False, out_major=True)
  prompt_len = config.num_image_tokens + text_len
  prefill = decode.jit_prefill(model, cache_size=prompt_len + max_decode_len,
                               cache_dtype=dtype)
  # Greedy, eos (id 1) forbidden: exactly max_decode_len tokens, as benchmarks/decode.py.
  dec = decode.jit_decode(model, prompt_len=prompt_len, max_decode_len=max_decode_len,
                          sampler=decode.Sampler(), eos_id=1, pad_id=0, forbidden_ids=(1,))

  def under(fn):
    def run(*args):
      with install():
        return fn(*args)
    return run
  return under(prefill), under(dec), tree


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
  ap.add_argument("--preset", default="small")
  ap.add_argument("--batch_size", type=int, default=1)
  ap.add_argument("--dtype", default="float32", help="weights, compute and cache")
  ap.add_argument("--max_decode_len", type=int, default=16)
  ap.add_argument("--pairs", type=int, default=20)
  args = ap.parse_args()

  tmp = tempfile.mkdtemp(prefix="ab_base_")
  rev = export_base(args.base, tmp)
  _import_base(tmp)
  import jax
  import jax.numpy as jnp
  from tests.specs import spec_config
  from benchmarks import decode as bench  # (benchmarks/decode.py: the presets)
  from paligemma_jax.model import paligemma

  spec = bench.PRESETS[args.preset]
  config = spec_config(spec)
  params = paligemma.init_params(config, 0)
  b, t, n = args.batch_size, 16, args.max_decode_len
  rng = np.random.default_rng(1)
  s = config.image_size
  images = jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32))
  text = jnp.asarray(rng.integers(3, spec["vocab"], (b, t)).astype(np.int32))
  mask, mask_ar = jnp.ones((b, t), bool), jnp.zeros((b, t), jnp.int32)
  dtype = jnp.dtype(args.dtype)
  sides = {f"base {rev}": build(BASE_NAME, config, params, dtype, t, n),
           "working tree": build("paligemma_jax", config, params, dtype, t, n)}

  def run(side):
    prefill, dec, tree = side
    t0 = time.perf_counter()
    out = jax.block_until_ready(prefill(tree, images, text, mask, mask_ar))
    t1 = time.perf_counter()
    tokens = np.asarray(dec(tree, *out, jax.random.PRNGKey(0)).tokens)
    return t1 - t0, time.perf_counter() - t1, np.asarray(out[0]), tokens

  first = {name: run(side) for name, side in sides.items()}  # compiles, warms up
  (base_logits, base_tokens), (new_logits, new_tokens) = [v[2:] for v in first.values()]
  print(f"{args.preset} {args.dtype} B={b} N={n}: prefill logits max |diff| "
        f"{np.abs(new_logits - base_logits).max():.3g} (of max {np.abs(base_logits).max():.3g}); "
        f"greedy tokens identical: {np.array_equal(new_tokens, base_tokens)}")
  times = {name: [] for name in sides}
  for i in range(args.pairs):
    for name in (list(sides) if i % 2 else list(sides)[::-1]):
      times[name].append(run(sides[name])[:2])
  for name, v in times.items():
    pre, dec = np.array(v).T
    print(f"{name:>14}: prefill median {np.median(pre) * 1e3:7.1f} ms, decode median "
          f"{np.median(dec) / (n - 1) * 1e3:7.2f} ms/step")
  (base, new) = (np.array(v) for v in times.values())
  for j, what in enumerate(("prefill", "decode")):
    r = new[:, j] / base[:, j]
    print(f"working tree / base, {what} time per pair: median {np.median(r):.3f} "
          f"[quartiles {np.percentile(r, 25):.3f}, {np.percentile(r, 75):.3f}], {len(r)} pairs")


if __name__ == "__main__":
  main()
