#!/usr/bin/env python
"""Prefill and decode speed: paligemma_jax against HF transformers, in one process.

    python -m benchmarks.decode --preset=small --batch_size=1 --max_decode_len=32 \
        --dtype=float32 --json=out/small_b1_f32.json

Both models get the same random weights (drawn by `paligemma.init_params` in big_vision's
layout, mapped to `PaliGemmaForConditionalGeneration` by tests/hf_reference.py), the same
images and prompts (B different rows of equal length), greedy decoding of exactly
`max_decode_len` tokens (eos forbidden on both sides), the same dtype unless --hf_dtype says
otherwise. Runs are interleaved (ours, HF, ours, HF, ...) after warm-up; medians are reported.
See benchmarks/README.md for what each number means.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
import jax
import jax.numpy as jnp
from flax import traverse_util

from benchmarks import roofline
from paligemma_jax import backends
from paligemma_jax.sample import decode
from paligemma_jax.model import layouts, paligemma
from paligemma_jax.backends import cpu_kernels
from tests import bv_fixtures
from tests.specs import spec_config  # noqa: E402 (tests/specs.py)

EOS, PAD, BOS = 1, 0, 2

_GEMMA1 = dict(gemma2=False, attn_logits_softcap=None, final_logits_softcap=None,
               query_pre_attn_norm="head_dim")
# Specs in tests/bv_fixtures.py's layout (what tests/hf_reference.hf_config reads).
PRESETS = {
    # The tests' fixtures (pg1_mqa): ViT 32 x 2, Gemma 64 x 2, vocab 1536.
    "tiny": bv_fixtures.SPECS["pg1_mqa"],
    "small": dict(image_size=224, patch=14, vit_width=384, vit_depth=6, vit_heads=6,
                  vit_mlp=1536, llm_width=1024, llm_depth=8, llm_heads=8, llm_kv_heads=1,
                  head_dim=128, llm_mlp=4096, vocab=257152, **_GEMMA1),
    # PaliGemma 3B: SigLIP So400m/14 at 224 px + Gemma 2B.
    "3b": dict(image_size=224, patch=14, vit_width=1152, vit_depth=27, vit_heads=16,
               vit_mlp=4304, llm_width=2048, llm_depth=18, llm_heads=8, llm_kv_heads=1,
               head_dim=256, llm_mlp=16384, vocab=257152, **_GEMMA1),
}


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def median(xs):
  return float(statistics.median(xs))


# ---------------------------------------------------------------------------
# Memory.

def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
  return info.get("MemAvailable", info["MemFree"])


def param_count(spec: dict) -> int:
  shapes = jax.eval_shape(lambda: paligemma._init(spec_config(spec), 0))
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))


ITEMSIZE = {"float32": 4, "bfloat16": 2}


def memory_needed(spec, dtype, hf_dtype) -> int:
  """Peak estimate: ours and HF (hf_dtype None: not built) resident, plus the largest
  transient of building them."""
  n = param_count(spec)
  resident = n * ITEMSIZE[dtype] + (n * ITEMSIZE[hf_dtype] if hf_dtype else 0)
  if dtype == "bfloat16" and not (cpu_kernels.available() and cpu_kernels.gemm_is_fast()):
    # Without the CPU GEMM kernel (no compiler, or no AVX-512), XLA:CPU computes the
    # prefill's bfloat16 dots in float32 and keeps float32 copies of the weights while ours
    # runs (3b alone, 5.8 GB of weights: about 20 GB). With it, 3b alone peaked at 10.3 GiB.
    resident += n * 4
  if spec is PRESETS["3b"]:  # lean path: one layer at a time plus the f32 embedding twice
    transient = 4 * 2 * spec["vocab"] * spec["llm_width"]
  else:  # init_params (float32 + its float64 draw) and the float32 HF state dict
    transient = n * 4 + 2 * n * 4
  return resident + transient + (1 << 30)


# ---------------------------------------------------------------------------
# Weights.

def init_params_lean(config, dtype, seed=0):
  """`paligemma.init_params`' distribution (N(0, 1/fan_in), embedding N(0, 1/D^2), LayerNorm
  scales 1, other scales and biases 0) drawn one array at a time in float32 and stored in
  `dtype`: init_params itself draws in float64 and keeps float32, too much for 3B here."""
  rng = np.random.default_rng(seed)
  on_device = jax.default_backend() != "cpu"  # an accelerator draws 3B normals in a blink
  flat = {}
  fan_in_axes = paligemma._FAN_IN
  for i, (key, leaf) in enumerate(
      traverse_util.flatten_dict(paligemma.abstract_params(config), sep="/").items()):
    shape = leaf.shape
    suffix = next((s for s in fan_in_axes if key.endswith(s)), None)
    if suffix is not None:
      if on_device:
        value = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), shape)
      else:
        value = rng.standard_normal(shape, np.float32)
      value /= np.sqrt(np.prod([shape[a] for a in fan_in_axes[suffix]]))
      if suffix == "input_embedding":
        value /= np.sqrt(shape[1])
    elif key.endswith("pos_embedding"):
      value = 0.02 * rng.standard_normal(shape, np.float32)
    elif key.endswith("scale") and key.startswith("img/"):
      value = np.ones(shape, np.float32)
    else:
      value = np.zeros(shape, np.float32)
    flat[key] = jnp.asarray(value, dtype)
    del value
  return traverse_util.unflatten_dict(flat, sep="/")


def build_hf(flat: dict, spec: dict, torch_dtype, attn: str, lean: bool, device: str = "cpu"):
  """HF PaliGemma from big_vision arrays via tests/hf_reference.py, on `device`."""
  import contextlib

  import torch
  from tests import hf_reference
  from transformers import PaliGemmaForConditionalGeneration

  if not lean:
    model = hf_reference.build_hf_paligemma(flat, spec).to(torch_dtype)
  else:
    # Same mapping, one layer at a time (bv_to_hf_state_dict on depth-1 slices), into a model
    # created directly in the target dtype: never the whole model in float32. Created on the
    # device and without HF's random init (every weight is overwritten): that init takes
    # minutes for 3B on a CPU.
    cfg = hf_reference.hf_config(spec)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
      from transformers.initialization import no_init_weights as no_init
    except ImportError:
      no_init = contextlib.nullcontext
    try:
      with torch.device(device), no_init():
        model = PaliGemmaForConditionalGeneration(cfg)
    finally:
      torch.set_default_dtype(old)
    one = dict(spec, vit_depth=1, llm_depth=1)
    layer_prefixes = ("img/Transformer/encoderblock/", "llm/layers/")
    depth = {"img/": spec["vit_depth"], "llm/": spec["llm_depth"]}
    loaded = set()
    for i in range(max(depth.values())):
      sub = {}
      for key, a in flat.items():
        if key.startswith(layer_prefixes) and i < depth[key[:4]]:
          sub[key] = np.asarray(a[min(i, depth[key[:4]] - 1)])[None]
        elif key.startswith(layer_prefixes):  # this tower has no layer i: a stand-in
          sub[key] = np.zeros((1,) + a.shape[1:], np.float32)
        else:  # map the non-layer arrays once; zero-size stand-ins afterwards
          sub[key] = np.asarray(a) if i == 0 else np.zeros((0,) + a.shape[1:], np.float32)
      sd = {}
      for name, t in hf_reference.bv_to_hf_state_dict(sub, one).items():
        if ".layers.0." in name:
          tower = "img/" if "vision_tower" in name else "llm/"
          if i >= depth[tower]:
            continue
          name = name.replace(".layers.0.", f".layers.{i}.")
        elif i > 0:
          continue
        sd[name] = t.to(torch_dtype)
      result = model.load_state_dict(sd, strict=False)
      assert not result.unexpected_keys, result.unexpected_keys
      loaded |= set(sd)
      del sub, sd
      gc.collect()
    missing = set(model.state_dict()) - loaded
    assert not missing, sorted(missing)[:5]
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    model = model.eval()
    model.requires_grad_(False)
  if attn != "eager":
    model.set_attn_implementation(attn)
  return model


# ---------------------------------------------------------------------------
# The two sides.

class Ours:
  """The compiled prefill and while_loop decode that PaliGemmaPipeline.generate runs."""

  def __init__(self, config, params, dtype, cache_dtype, batch, text_len, max_decode_len,
               out_major=True):
    # The pipeline's inference tree, model and backend (out_major: this device's speed path,
    # `backends.select`; else the plain model on per-layer weights, as on a mesh).
    self.params = params = layouts.unstacked(params, consume=True, out_major=out_major)
    self.model = paligemma.PaliGemma(config, jnp.dtype(dtype), scan_layers=False)
    install = backends.select(bfloat16=jnp.dtype(dtype) == jnp.bfloat16).install if out_major \
        else contextlib.nullcontext
    s = config.image_size
    self.prompt_len = config.num_image_tokens + text_len
    self.cache_size = self.prompt_len + max_decode_len
    t0 = time.perf_counter()
    with install():  # the model is traced here
      prefill = decode.jit_prefill(self.model, cache_size=self.cache_size,
                                   cache_dtype=jnp.dtype(cache_dtype))
      self.prefill = prefill.lower(
          params, jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, text_len), jnp.int32),
          jax.ShapeDtypeStruct((batch, text_len), bool),
          jax.ShapeDtypeStruct((batch, text_len), jnp.int32)).compile()
      logits, cache, cache_valid, last = self.prefill.out_info
      # As generate(..., forbidden_ids=(eos,)) with greedy, but no tokenizer vocab_limit:
      # the random model's whole vocabulary is allowed, as on the HF side.
      dec = decode.jit_decode(self.model, prompt_len=self.prompt_len,
                              max_decode_len=max_decode_len, sampler=decode.Sampler(),
                              eos_id=EOS, pad_id=PAD, forbidden_ids=(EOS,), vocab_limit=None)
      self.decode = dec.lower(params, logits, cache, cache_valid, last,
                              jax.random.PRNGKey(0)).compile()
    self.compile_s = time.perf_counter() - t0

  def prefill_flops_xla(self):
    try:
      cost = self.prefill.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost["flops"])
    except Exception:  # noqa: BLE001 (cost analysis is best effort)
      return None

  def run(self, images, text):
    mask = np.ones(text.shape, bool)
    mask_ar = np.zeros(text.shape, np.int32)  # the whole prompt is prefix: full attention
    # On the device already, as HF's tensors are: the timings cover compute, not uploads.
    images, text, mask, mask_ar = jax.block_until_ready(
        jax.device_put((images, text, mask, mask_ar)))
    t0 = time.perf_counter()
    out = self.prefill(self.params, images, text, mask, mask_ar)
    jax.block_until_ready(out)
    t1 = time.perf_counter()
    state = self.decode(self.params, *out, jax.random.PRNGKey(0))
    tokens = np.asarray(state.tokens)  # waits for the loop
    t2 = time.perf_counter()
    assert int(state.step) == tokens.shape[1]
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1), tokens


class StepTimes:
  """A transformers streamer that timestamps each put(): the prompt (just before the
  prefill forward), then every emitted token."""

  def __init__(self):
    self.times = []

  def put(self, value):
    self.times.append(time.perf_counter())

  def end(self):
    pass


class HF:
  def __init__(self, model, images, text, torch_dtype, device="cpu"):
    import torch
    from tests import hf_reference

    self.torch = torch
    self.hf_reference = hf_reference
    self.model = model.to(device)
    self.ids = hf_reference._full_ids(model, text).to(device)
    self.pixels = hf_reference._to_torch_pixels(images).to(device=device, dtype=torch_dtype)

  def generate(self, new_tokens, streamer=None):
    torch = self.torch
    with torch.no_grad(), self.hf_reference._zero_based_positions(self.model):
      return self.model.generate(
          input_ids=self.ids, pixel_values=self.pixels,
          attention_mask=torch.ones_like(self.ids), token_type_ids=torch.zeros_like(self.ids),
          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
          eos_token_id=EOS, pad_token_id=PAD, use_cache=True, streamer=streamer)

  def run(self, n):
    """generate(n) with per-token timestamps, then generate(1)."""
    times = StepTimes()
    t0 = time.perf_counter()
    seq = self.generate(n, times)
    t_end = time.perf_counter()
    t1 = time.perf_counter()
    self.generate(1)
    t_one = time.perf_counter() - t1
    stamps = times.times
    assert len(stamps) == n + 1, (len(stamps), n)
    return dict(total_s=t_end - t0, prefill_s=stamps[1] - stamps[0],
                decode_s=stamps[-1] - stamps[1], setup_s=stamps[0] - t0,
                generate1_s=t_one), seq[:, self.ids.shape[1]:].cpu().numpy()


# ---------------------------------------------------------------------------

def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
  ap.add_argument("--batch_size", type=int, default=1)
  ap.add_argument("--max_decode_len", type=int, default=32)
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                  help="our parameter and compute dtype")
  ap.add_argument("--hf_dtype", choices=["float32", "bfloat16"], default=None,
                  help="HF's dtype (default: --dtype)")
  ap.add_argument("--cache_dtype", choices=["float32", "bfloat16"], default=None,
                  help="our KV cache dtype (default: --dtype)")
  ap.add_argument("--hf_attn", choices=["sdpa", "eager"], default="sdpa",
                  help="HF attention implementation (sdpa is HF's default)")
  ap.add_argument("--text_len", type=int, default=16, help="prompt tokens per row (a multiple "
                  "of the pipeline's bucket, so no padding on either side)")
  ap.add_argument("--runs", type=int, default=5, help="timed runs per side (median)")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip_hf", action="store_true", help="ours only (no ratios)")
  ap.add_argument("--hf_device", default=None, help="torch device for HF (default: cuda when "
                  "jax runs on a GPU and torch sees one, else cpu)")
  ap.add_argument("--out_major", choices=["true", "false"], default="true",
                  help="our Gemma weights held output-major (the pipeline's one-device tree) "
                  "or in big_vision's stored layout")
  ap.add_argument("--json", default=None, help="write the results here")
  args = ap.parse_args(argv)
  if args.max_decode_len < 2:
    ap.error("--max_decode_len must be >= 2 (decode excludes the first token)")
  hf_dtype = args.hf_dtype or args.dtype
  cache_dtype = args.cache_dtype or args.dtype
  spec = PRESETS[args.preset]
  config = spec_config(spec)
  b, n, t = args.batch_size, args.max_decode_len, args.text_len
  lean = args.preset == "3b"
  backend = jax.default_backend()
  hf_device = args.hf_device
  if hf_device is None and not args.skip_hf:
    import torch
    hf_device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"

  result = dict(
      args=dict(vars(args), hf_dtype=hf_dtype, cache_dtype=cache_dtype), spec=spec,
      machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                   jax=jax.__version__, backend=backend,
                   device=jax.devices()[0].device_kind, hf_device=hf_device))

  # Host memory: everything lives there on the CPU backend (on an accelerator the host holds
  # only transients, and a VM's MemAvailable may start low and grow).
  need, avail = memory_needed(spec, args.dtype, None if args.skip_hf else hf_dtype), \
      available_bytes()
  if backend == "cpu" and hf_device in (None, "cpu") and need > avail:
    msg = (f"skipped: preset {args.preset} with dtype {args.dtype} / HF {hf_dtype} needs about "
           f"{need / 2**30:.1f} GiB, only {avail / 2**30:.1f} GiB available")
    if args.preset == "3b" and "float32" in (args.dtype, hf_dtype):
      msg += "; run 3b with --dtype=bfloat16 --hf_dtype=bfloat16"
    elif not args.skip_hf:
      msg += "; --skip_hf times ours alone"
    print(msg)
    result["skipped"] = msg
    if args.json:
      write_json(args.json, result)
    return result

  # --- machine: bandwidth and matmul rate, before the models take memory.
  log("measuring memory bandwidth and matmul rate ...")
  bw = [roofline.measure_bandwidth()]
  mm = roofline.measure_matmul_rate(args.dtype)
  mm_hf = None
  if not args.skip_hf:
    mm_hf = roofline.measure_torch_matmul_rate(hf_dtype, hf_device)

  # --- weights, ours then HF.
  log(f"building {args.preset} ({param_count(spec) / 1e6:.0f}M params) ...")
  t0 = time.perf_counter()
  if lean:
    params = init_params_lean(config, jnp.dtype(args.dtype), args.seed)
  else:
    params = paligemma.init_params(config, args.seed)
  hf = None
  rng = np.random.default_rng(args.seed + 1)
  images = rng.uniform(-1, 1, (b, config.image_size, config.image_size, 3)).astype(np.float32)
  text = rng.integers(3, spec["vocab"], (b, t)).astype(np.int32)
  text[:, 0] = BOS
  if not args.skip_hf:
    import torch
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    model = build_hf(flat, spec, getattr(torch, hf_dtype), args.hf_attn, lean, hf_device)
    del flat
    hf = HF(model, images, text, getattr(torch, hf_dtype), hf_device)
  if not lean and args.dtype != "float32":
    params = jax.tree_util.tree_map(lambda x: x.astype(args.dtype), params)
  jax.block_until_ready(params)
  gc.collect()
  log(f"  built in {time.perf_counter() - t0:.1f}s")

  ours = Ours(config, params, args.dtype, cache_dtype, b, t, n, args.out_major == "true")
  log(f"ours compiled in {ours.compile_s:.1f}s; warming up ...")
  for _ in range(args.warmup):
    ours.run(images, text)
    if hf is not None:
      hf.run(n)

  runs_ours, runs_hf = [], []
  for r in range(args.runs):
    timing, tokens_ours = ours.run(images, text)
    runs_ours.append(timing)
    msg = f"run {r + 1}/{args.runs}: ours prefill {timing['prefill_s'] * 1e3:.1f} ms decode " \
          f"{timing['decode_s'] * 1e3:.0f} ms"
    if hf is not None:
      timing_hf, tokens_hf = hf.run(n)
      runs_hf.append(timing_hf)
      msg += f" | HF prefill {timing_hf['prefill_s'] * 1e3:.1f} ms decode " \
             f"{timing_hf['decode_s'] * 1e3:.0f} ms"
    log(msg)
  bw.append(roofline.measure_bandwidth())

  # --- figures.
  steps = n - 1  # decode = the forward passes after the prefill's first token
  o_pre = median([x["prefill_s"] for x in runs_ours])
  o_dec = median([x["decode_s"] for x in runs_ours])
  ours_fig = dict(prefill_ms=o_pre * 1e3, decode_ms=o_dec * 1e3,
                  decode_ms_per_step=o_dec / steps * 1e3, decode_tokens_per_s=b * steps / o_dec,
                  compile_s=ours.compile_s, runs=runs_ours)
  result["ours"] = ours_fig

  # Measured before and after the timed runs (load from other processes varies): medians.
  bandwidth = {k: median([m[k] for m in bw]) for k in bw[0] if k != "best"}
  bandwidth["best"] = max(bandwidth.values())
  kv_context = ours.prompt_len + (n - 1) / 2  # mean valid slots over the decode steps
  step_bytes = roofline.decode_bytes_per_step(spec, b, kv_context, ITEMSIZE[args.dtype],
                                              ITEMSIZE[cache_dtype])
  floor_step = step_bytes["total"] / bandwidth["best"]
  flops = roofline.prefill_flops(spec, b, t)
  roof = dict(
      bandwidth_GBps={k: v / 1e9 for k, v in bandwidth.items()},
      bandwidth_runs_GBps=[{k: v / 1e9 for k, v in m.items()} for m in bw],
      decode_bytes_per_step=step_bytes, kv_context_mean=kv_context,
      decode_floor_ms_per_step=floor_step * 1e3,
      decode_floor_tokens_per_s=b / floor_step,
      ours_fraction_of_bandwidth_floor=floor_step / (o_dec / steps),
      ours_fraction_by_bandwidth={k: step_bytes["total"] / v / (o_dec / steps)
                                  for k, v in bandwidth.items()},
      ours_effective_GBps=step_bytes["total"] / (o_dec / steps) / 1e9,
      prefill_flops=flops, prefill_flops_xla=ours.prefill_flops_xla(),
      matmul_GFLOPs=mm / 1e9, prefill_floor_ms=flops["total"] / mm * 1e3,
      ours_fraction_of_prefill_floor=flops["total"] / mm / o_pre)
  result["roofline"] = roof

  if hf is not None:
    h_pre = median([x["prefill_s"] for x in runs_hf])
    h_dec = median([x["decode_s"] for x in runs_hf])
    h_one = median([x["generate1_s"] for x in runs_hf])
    h_tot = median([x["total_s"] for x in runs_hf])
    hf_step_bytes = roofline.decode_bytes_per_step(spec, b, kv_context, ITEMSIZE[hf_dtype],
                                                   ITEMSIZE[hf_dtype])
    result["hf"] = dict(
        prefill_ms=h_pre * 1e3, decode_ms=h_dec * 1e3, decode_ms_per_step=h_dec / steps * 1e3,
        decode_tokens_per_s=b * steps / h_dec,
        # Cross-check without the streamer: generate(N) - generate(1) over N - 1 steps.
        generate1_ms=h_one * 1e3, generateN_ms=h_tot * 1e3,
        decode_tokens_per_s_by_difference=b * steps / (h_tot - h_one),
        fraction_of_bandwidth_floor=hf_step_bytes["total"] / bandwidth["best"] / (h_dec / steps),
        matmul_GFLOPs_torch=mm_hf / 1e9, transformers=__import__("transformers").__version__,
        torch=__import__("torch").__version__, attn=args.hf_attn, runs=runs_hf)
    # Run i of each side ran back to back, so their ratio shares that moment's load.
    per_run = lambda key, f: [f(o[key], h[key]) for o, h in zip(runs_ours, runs_hf)]
    result["ratios"] = dict(
        decode_tokens_per_s_ours_over_hf=ours_fig["decode_tokens_per_s"] / (b * steps / h_dec),
        prefill_time_ours_over_hf=o_pre / h_pre,
        per_run_decode_tokens_per_s=per_run("decode_s", lambda o, h: h / o),
        per_run_prefill_time=per_run("prefill_s", lambda o, h: o / h))
    same = (tokens_ours == tokens_hf)
    first_diff = [int(np.argmin(row)) if not row.all() else n for row in same]
    result["agreement"] = dict(rows_identical=int(same.all(axis=1).sum()), rows=b,
                               tokens_equal_fraction=float(same.mean()),
                               first_difference_per_row=first_diff)
  import resource
  result["peak_rss_GiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(report(result))
  if args.json:
    write_json(args.json, result)
  return result


def write_json(path, result):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=float)


def report(r) -> str:
  a, o, roof = r["args"], r["ours"], r["roofline"]
  hf, ratio = r.get("hf"), r.get("ratios")
  m = r["machine"]
  lines = [f"device: {m['device']} (jax {m['jax']}, {m['backend']}); HF on {m['hf_device']}",
           f"preset={a['preset']} batch={a['batch_size']} max_decode_len={a['max_decode_len']} "
           f"dtype={a['dtype']} cache={a['cache_dtype']} HF dtype={a['hf_dtype']} "
           f"HF attn={a['hf_attn']} out_major={a['out_major']} runs={a['runs']} (medians)"]
  row = "{:<34s} {:>12s} {:>12s} {:>10s}"
  lines.append(row.format("", "ours", "HF", "ours/HF"))

  def fmt(x, f="{:.1f}"):
    return "-" if x is None else f.format(x)
  for name, key in (("prefill ms", "prefill_ms"), ("decode ms / step", "decode_ms_per_step"),
                    ("decode tokens/s (B*(N-1)/decode)", "decode_tokens_per_s")):
    h = hf[key] if hf else None
    lines.append(row.format(name, fmt(o[key], "{:.2f}"), fmt(h, "{:.2f}"),
                            fmt(o[key] / h if h else None, "{:.3f}")))
  if hf:
    lines.append(f"HF cross-check: generate(1) {hf['generate1_ms']:.1f} ms, decode tokens/s "
                 f"by generate(N) - generate(1): {hf['decode_tokens_per_s_by_difference']:.2f}")
  bw = roof["bandwidth_GBps"]
  sb = roof["decode_bytes_per_step"]
  lines += [
      f"read bandwidth GB/s: numpy copy {bw['numpy_copy']:.2f} (+ as much written), jax copy "
      f"{bw['jax_copy']:.2f} (+ as much written), jax sum {bw['jax_sum']:.2f}, jax gemv "
      f"{bw['jax_gemv']:.2f} -> floor uses {bw['best']:.2f}",
      f"decode floor: {sb['weights'] / 1e6:.1f} MB weights + {sb['kv_cache'] / 1e6:.2f} MB KV "
      f"per step = {roof['decode_floor_ms_per_step']:.2f} ms/step "
      f"({roof['decode_floor_tokens_per_s']:.2f} tokens/s)",
      f"ours reaches {100 * roof['ours_fraction_of_bandwidth_floor']:.1f}% of the bandwidth "
      f"floor ({roof['ours_effective_GBps']:.2f} GB/s effective)"
      + (f"; HF {100 * hf['fraction_of_bandwidth_floor']:.1f}% of its own" if hf else ""),
      f"prefill: {roof['prefill_flops']['total'] / 1e9:.2f} GFLOP (XLA's cost analysis, which "
      f"counts a scanned layer once: "
      f"{fmt(roof['prefill_flops_xla'] and roof['prefill_flops_xla'] / 1e9, '{:.2f}')}) at "
      f"{roof['matmul_GFLOPs']:.1f} GFLOP/s = floor {roof['prefill_floor_ms']:.1f} ms; ours at "
      f"{100 * roof['ours_fraction_of_prefill_floor']:.1f}% of it",
  ]
  if ratio:
    ag = r["agreement"]
    lines.append(f"ratios: decode tokens/s ours/HF {ratio['decode_tokens_per_s_ours_over_hf']:.3f}"
                 f", prefill time ours/HF {ratio['prefill_time_ours_over_hf']:.3f}")
    spread = lambda xs: "median {:.3f} [quartiles {:.3f}, {:.3f}]".format(
        median(xs), *np.percentile(xs, [25, 75]))
    lines.append(f"per-run ratios (run i of each side): decode tokens/s "
                 f"{spread(ratio['per_run_decode_tokens_per_s'])}, prefill time "
                 f"{spread(ratio['per_run_prefill_time'])}")
    lines.append(f"greedy agreement: {ag['rows_identical']}/{ag['rows']} rows identical, "
                 f"{100 * ag['tokens_equal_fraction']:.1f}% of tokens")
  lines.append(f"peak resident memory of this process: {r['peak_rss_GiB']:.1f} GiB")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
