"""Roofline arithmetic for PaliGemma prefill/decode, and in-process machine measurements.

Used by benchmarks/decode.py. Everything here is counted from the shapes of a spec (the
dict layout of tests/bv_fixtures.py), not from the model code, so it also serves as an
independent check of what the model has to read and compute.

* decode floor: every decode step must read all language-model weights once (the layers
  plus the embedding, which is the tied logits head) and the valid part of the KV cache;
  at the machine's memory bandwidth that takes  bytes / bandwidth  seconds per step.
* prefill floor: the matmul FLOPs of the ViT over the image and of Gemma over image+prompt
  (the logits head only for the last token) at the machine's dense matmul rate.
"""
from __future__ import annotations

import statistics
import time

import numpy as np


# ---------------------------------------------------------------------------
# Counting.

def llm_param_count(spec: dict) -> dict:
  """Parameter counts of the Gemma decoder by part (elements, not bytes)."""
  d, n, k, h, f, v = (spec["llm_width"], spec["llm_heads"], spec["llm_kv_heads"],
                      spec["head_dim"], spec["llm_mlp"], spec["vocab"])
  norms = (4 if spec["gemma2"] else 2) * d
  per_layer = dict(q=n * d * h, kv=2 * k * d * h, out=n * h * d, mlp=3 * d * f, norms=norms)
  return dict(embedding=v * d, layers=spec["llm_depth"] * sum(per_layer.values()),
              final_norm=d, per_layer=per_layer)


def decode_bytes_per_step(spec: dict, batch: int, context: float, weight_itemsize: int,
                          cache_itemsize: int) -> dict:
  """Bytes one decode step must read: all LLM weights (incl. the embedding / logits head)
  and the keys and values of `context` cache slots per row."""
  counts = llm_param_count(spec)
  weights = (counts["embedding"] + counts["layers"] + counts["final_norm"]) * weight_itemsize
  kv = (batch * context * spec["llm_depth"] * 2 * spec["llm_kv_heads"] * spec["head_dim"]
        * cache_itemsize)
  return dict(weights=int(weights), kv_cache=int(kv), total=int(weights + kv))


def prefill_flops(spec: dict, batch: int, prompt_len: int) -> dict:
  """Multiply-add FLOPs (2 per MAC) of one prefill: ViT + projector + Gemma over
  image + prompt tokens (attention over the whole prefix) + logits of the last token."""
  p, w, m, lv = spec["patch"], spec["vit_width"], spec["vit_mlp"], spec["vit_depth"]
  ni = (spec["image_size"] // p) ** 2
  d, n, k, h, f, v, ll = (spec["llm_width"], spec["llm_heads"], spec["llm_kv_heads"],
                          spec["head_dim"], spec["llm_mlp"], spec["vocab"], spec["llm_depth"])
  vit = 2 * ni * p * p * 3 * w + lv * (2 * ni * w * 4 * w + 2 * 2 * ni * ni * w
                                       + 2 * 2 * ni * w * m) + 2 * ni * w * d
  s = ni + prompt_len
  llm = ll * (2 * s * d * (n + 2 * k) * h + 2 * 2 * s * s * n * h + 2 * s * n * h * d
              + 3 * 2 * s * d * f)
  head = 2 * d * v
  return dict(vit=batch * vit, llm=batch * llm, logits=batch * head,
              total=batch * (vit + llm + head))


# ---------------------------------------------------------------------------
# Measuring.

def median_time(fn, reps: int, inner: int = 1) -> float:
  """Median seconds per call of fn over `reps` samples of `inner` calls each; fn returns what
  to wait for (calls within a sample are dispatched back to back, then waited for once)."""
  _block(fn())  # warm (page faults, compilation)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _block([fn() for _ in range(inner)][-1])  # one stream: the last is done after the rest
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def _block(x):
  import jax
  return jax.block_until_ready(x)


def _accelerator() -> bool:
  import jax
  return jax.default_backend() != "cpu"


def measure_bandwidth(nbytes: int | None = None, reps: int = 5) -> dict:
  """Memory read bandwidth in bytes/s, several ways, on arrays far larger than the caches.

  A decode step reads its weights and writes almost nothing, so every figure is *bytes read
  per second*; the copies also write as much, so their read rate is a conservative one
  (their read + write traffic is twice the figure).
  numpy_copy: np.copyto into a preallocated array (one thread).
  jax_copy:   a jitted x + 1 updating a donated buffer of nbytes in place (all threads).
  jax_sum:    a jitted sum.
  jax_gemv:   a jitted (nbytes / 4096, 1024) float32 matrix times a vector: the access
              pattern of a decode step and of its largest piece, the logits head.
  best:       the largest: the fastest this process read memory, so bytes / best is a lower
              bound on the time any code here needs to read those bytes.
  On an accelerator the jax arrays are 4 GiB (default) and each sample is 10 calls dispatched
  back to back, so that dispatch does not count against a read of a third of a millisecond.
  """
  import jax
  import jax.numpy as jnp

  accel = _accelerator()
  src = np.ones((1 << 30) // 4, np.float32)
  dst = np.empty_like(src)
  out = {"numpy_copy": src.nbytes / median_time(lambda: np.copyto(dst, src), reps)}
  del src, dst
  nbytes = nbytes or (4 << 30 if accel else 1 << 30)
  inner = 10 if accel else 1
  n = nbytes // 4

  x = [jnp.ones(n, jnp.float32)]
  bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)

  def step():
    x[0] = bump(x[0])
    return x[0]
  out["jax_copy"] = nbytes / median_time(step, reps, inner)
  total = jax.jit(jnp.sum)
  out["jax_sum"] = nbytes / median_time(lambda: total(x[0]), reps, inner)
  matrix = x[0].reshape(-1, 1024)
  del x
  vector = jnp.ones((1024,), jnp.float32)
  gemv = jax.jit(lambda m, v: m @ v)
  out["jax_gemv"] = nbytes / median_time(lambda: gemv(matrix, vector), reps, inner)
  del matrix
  out["best"] = max(out.values())
  return out


def measure_matmul_rate(dtype: str, n: int | None = None, reps: int = 5) -> float:
  """FLOP/s of a jitted (n, n) @ (n, n) jnp.dot in `dtype` (2 n^3 FLOPs); n defaults to 2048
  on the CPU and 8192 on an accelerator (a 2048 product is launch-bound on a GPU)."""
  import jax
  import jax.numpy as jnp

  n = n or (8192 if _accelerator() else 2048)
  dt = jnp.dtype(dtype)
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32)).astype(dt)
  b = a.T + 0
  dot = jax.jit(jnp.dot)
  return 2 * n ** 3 / median_time(lambda: dot(a, b), reps, 10 if _accelerator() else 1)


def measure_torch_matmul_rate(dtype: str, device: str = "cpu", n: int | None = None,
                              reps: int = 5) -> float:
  """The same for torch (the reference's kernels) on `device`, for context."""
  import torch

  n = n or (2048 if device == "cpu" else 8192)
  dt = getattr(torch, dtype)
  a = torch.randn(n, n).to(device=device, dtype=dt)
  b = a.T.contiguous()
  cuda = device.startswith("cuda")
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def products():
    for _ in range(10 if cuda else 1):
      a @ b
    sync()
  with torch.no_grad():
    return 2 * n ** 3 * (10 if cuda else 1) / median_time(products, reps)
