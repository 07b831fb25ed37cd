#!/usr/bin/env python
"""Where a decode step's time goes: a device trace of our compiled prefill + decode, summed by
kernel, next to micro-measurements of memory bandwidth and of the decode's matrix-vector shapes.

    python -m benchmarks.profile_decode --preset=3b --dtype=bfloat16 --max_decode_len=32

Reads the trace with `jax.profiler.ProfileData` (no TensorBoard needed). On the CPU backend
the "kernels" are XLA's thunks on the host threads, which is less telling.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
from benchmarks import decode as bench  # (benchmarks/decode.py: presets, weights, `Ours`)
from benchmarks import roofline

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def timed(fn, *args):
  """Seconds per call of jitted `fn`: median of 5 samples of 20 calls dispatched back to back."""
  return roofline.median_time(lambda: fn(*args), reps=5, inner=20)


def matvecs(dtype):
  """GB/s of weight reads for the decode step's products at batch 1 (rows: out-major w (O, I)
  times x; cols: stored w (I, O))."""
  rng = np.random.default_rng(0)
  out = {}
  for o, i in ((2048, 2048), (512, 2048), (2 * 16384, 2048), (2048, 16384), (257152, 2048)):
    w = jnp.asarray(rng.standard_normal((o, i), np.float32), dtype)
    x = jnp.asarray(rng.standard_normal((1, i), np.float32), dtype)
    rows = jax.jit(lambda x, w: jnp.einsum("XI,OI->XO", x, w, preferred_element_type=jnp.float32))
    wt = w.T.copy()
    cols = jax.jit(lambda x, w: jnp.einsum("XI,IO->XO", x, w, preferred_element_type=jnp.float32))
    nbytes = w.size * w.dtype.itemsize
    out[f"{o}x{i}"] = dict(out_major_GBps=nbytes / timed(rows, x, w) / 1e9,
                           stored_GBps=nbytes / timed(cols, x, wt) / 1e9)
    del w, wt
  return out


def kernel_table(trace_dir, top):
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  data = jax.profiler.ProfileData.from_file(files[0])
  planes = [p for p in data.planes if p.name.startswith("/device:GPU")] or \
      [p for p in data.planes if p.name.startswith("/host:CPU")]
  by_name = collections.defaultdict(lambda: [0, 0.0])
  spans = []
  lines = [(p, line) for p in planes for line in p.lines]
  streams = [(p, line) for p, line in lines if "Stream" in line.name]
  # On a GPU the summary lines (XLA ops, modules) repeat the streams' kernels.
  for _, line in streams or lines:
    for ev in line.events:
      by_name[ev.name][0] += 1
      by_name[ev.name][1] += ev.duration_ns
      spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  busy = sum(v[1] for v in by_name.values())
  first, last = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (0, 0)
  rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  return dict(planes=[p.name for p in planes], kernels=sum(v[0] for v in by_name.values()),
              busy_ms=busy / 1e6, span_ms=(last - first) / 1e6,
              top=[(name[:90], n, t / 1e6) for name, (n, t) in rows])


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--preset", choices=sorted(bench.PRESETS), default="3b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch_size", type=int, default=1)
  ap.add_argument("--max_decode_len", type=int, default=32)
  ap.add_argument("--out_major", choices=["true", "false"], default="true")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--skip_micro", action="store_true")
  args = ap.parse_args()
  if not args.skip_micro:
    print("read GB/s:", {k: round(v / 1e9, 1) for k, v in roofline.measure_bandwidth().items()},
          flush=True)
    for shape, r in matvecs(jnp.dtype(args.dtype)).items():
      print(f"matvec {shape}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)

  spec = bench.PRESETS[args.preset]
  config = bench.spec_config(spec)
  params = bench.init_params_lean(config, jnp.dtype(args.dtype))
  b, n, t = args.batch_size, args.max_decode_len, 16
  ours = bench.Ours(config, params, args.dtype, args.dtype, b, t, n, args.out_major == "true")
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (b, config.image_size, config.image_size, 3)).astype(np.float32)
  text = rng.integers(3, spec["vocab"], (b, t)).astype(np.int32)
  for _ in range(2):
    timing, _ = ours.run(images, text)
  print(f"untraced: prefill {timing['prefill_s'] * 1e3:.2f} ms, decode "
        f"{timing['decode_s'] / (n - 1) * 1e3:.3f} ms/step", flush=True)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    timing, _ = ours.run(images, text)
    jax.profiler.stop_trace()
    table = kernel_table(d, args.top)
  steps = n - 1
  print(f"traced: prefill {timing['prefill_s'] * 1e3:.2f} ms, decode {timing['decode_s'] * 1e3:.2f}"
        f" ms ({timing['decode_s'] / steps * 1e3:.3f} ms/step); planes {table['planes']}")
  print(f"{table['kernels']} kernels, busy {table['busy_ms']:.2f} ms of a {table['span_ms']:.2f} ms"
        f" span (prefill + decode; {table['kernels'] / steps:.0f} kernels per decode step)")
  for name, count, ms in table["top"]:
    print(f"{ms:9.3f} ms {count:6d}x {ms / count * 1e3:8.1f} us  {name}")


if __name__ == "__main__":
  main()
