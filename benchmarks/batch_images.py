"""Images/s of a batch job (jobs.run_job, --batch_size) against a loop of single-image calls.

    python -m benchmarks.batch_images --n_images=16 --max_decode_len=16 --json=out/batch.json

Both sides do the whole per-image work: decode an image file (640x480 JPEG), preprocess,
prefill, decode `max_decode_len` tokens. The batch side is the real job path: decoding in
threads ahead of the device, one fsync'ed JSON line per result. Compilation is done before
timing for both shapes (batch B and batch 1). The model has random weights: `small` is
ViT 384 wide x 6 deep (6 heads, mlp 1536, patch 14, 224 px) and Gemma 1024 wide x 8 deep
(8 heads, 1 kv head, head dim 128, mlp 4096, vocab 257152); `tiny` is the embedded demo.
"""
import argparse
import json
import os
import platform
import tempfile
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paligemma_jax import demo, jobs  # noqa: E402
from benchmarks import decode as bench
from paligemma_jax.model import paligemma  # noqa: E402
from tests.specs import spec_config
from paligemma_jax.data.image import load_image  # noqa: E402
from paligemma_jax.pipeline import PaliGemmaPipeline  # noqa: E402
from paligemma_jax.data.tokenizer import Tokenizer, train_tiny_tokenizer  # noqa: E402


# The `small` of benchmarks/decode.py, and the embedded demo's architecture.
PRESETS = {"small": lambda: spec_config(bench.PRESETS["small"]), "tiny": demo.demo_config}


def write_images(folder: str, n: int, seed: int = 0) -> list:
  rng = np.random.default_rng(seed)
  paths = []
  y, x = np.mgrid[0:480, 0:640]
  for i in range(n):
    base = np.stack([(x + 40 * i) % 256, (y + 25 * i) % 256, (x + y) % 256], -1)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    paths.append(os.path.join(folder, f"img{i:04d}.jpg"))
    Image.fromarray(noisy).save(paths[-1], quality=90)
  return paths


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
  ap.add_argument("--n_images", type=int, default=16)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--max_decode_len", type=int, default=16)
  ap.add_argument("--prompt", default="caption en")
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args()

  work = tempfile.mkdtemp(prefix="pg_bench_")
  config = PRESETS[args.preset]()
  t0 = time.perf_counter()
  params = paligemma.init_params(config, seed=0)
  if args.dtype != "float32":
    from paligemma_jax.options import as_dtype
    params = jax.tree_util.tree_map(lambda a: a.astype(as_dtype(args.dtype)), params)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  tokenizer = Tokenizer(train_tiny_tokenizer(os.path.join(work, "tok")))
  pipe = PaliGemmaPipeline(config, params, tokenizer, dtype=args.dtype)
  folder = os.path.join(work, "images")
  os.makedirs(folder)
  paths = write_images(folder, args.n_images)
  print(f"{args.preset}: {sum(a.size for a in jax.tree_util.tree_leaves(params)) / 1e6:.0f}M "
        f"params (random, {init_s:.1f}s to draw), {args.n_images} images, "
        f"batch {args.batch_size}, {args.max_decode_len} tokens, {jax.devices()[0]}", flush=True)

  # Compile both shapes outside the timings.
  warm = load_image(paths[0])
  t0 = time.perf_counter()
  for b in (args.batch_size, 1):
    pipe.generate([warm] * b, [args.prompt] * b, max_decode_len=args.max_decode_len)
  print(f"compiled batch {args.batch_size} and batch 1 in {time.perf_counter() - t0:.1f}s",
        flush=True)

  out = os.path.join(work, "out.jsonl")
  t0 = time.perf_counter()
  summary = jobs.run_job(lambda: pipe, folder, args.prompt, out, batch_size=args.batch_size,
                         max_decode_len=args.max_decode_len, progress=False, log=lambda m: None)
  batched_s = time.perf_counter() - t0
  assert summary["results"] == args.n_images, summary
  batched_tokens = sum(len(json.loads(line)["tokens"]) for line in open(out))

  t0 = time.perf_counter()
  single_tokens = 0
  for p in paths:
    [r] = pipe.generate([load_image(p)], [args.prompt], max_decode_len=args.max_decode_len)
    single_tokens += len(r.tokens)
  single_s = time.perf_counter() - t0

  result = dict(
      preset=args.preset, n_images=args.n_images, batch_size=args.batch_size,
      max_decode_len=args.max_decode_len, dtype=args.dtype, device=str(jax.devices()[0]),
      jax=jax.__version__, machine=platform.machine(), cpu_count=os.cpu_count(),
      batched=dict(seconds=batched_s, images_per_s=args.n_images / batched_s,
                   generated_tokens=batched_tokens),
      single_loop=dict(seconds=single_s, images_per_s=args.n_images / single_s,
                       generated_tokens=single_tokens),
      ratio=single_s / batched_s)
  print(f"batch {args.batch_size}: {result['batched']['images_per_s']:.2f} images/s "
        f"({batched_s:.1f}s)   single-image loop: {result['single_loop']['images_per_s']:.2f} "
        f"images/s ({single_s:.1f}s)   ratio {result['ratio']:.2f}x")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
