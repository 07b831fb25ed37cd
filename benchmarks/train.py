#!/usr/bin/env python
"""Training step speed: the trainer's jitted step against HF transformers, in one process.

    python -m benchmarks.train --preset=small --batch=8 --text_len=32 --rounds=4

One step = forward + backward + AdamW update, float32, on the same random weights
(`paligemma.init_params`, mapped to `PaliGemmaForConditionalGeneration` by
tests/hf_reference.py) and the same batch (random images; random ids laid out as
`Tokenizer.training_example`: [bos] prefix "\\n" (mask_ar 0) suffix eos (mask_ar 1, loss) pad).

* ours: `trainer.make_train_step` jitted with donate_argnums=(0, 1), as `Trainer.run`;
  optim.py's adam chain (no clipping, no decay, constant lr), loss_norm="tokens" (HF's mean
  over supervised tokens), once per --remat policy.
* HF: `model(..., labels=...)` (its own loss over logits of every position, image included:
  how HF trains), sdpa, loss.backward(), fused torch AdamW (HF Trainer's default optim),
  zero_grad. "HF keep" passes logits_to_keep=text_len and labels for the text only: the
  logits ours computes, so both sides do the same work.

The sides run one after another (both states do not fit in 23 GiB beside each other), each
from the same weights and a fresh optimizer state, for --steps timed steps (after --warmup
untimed ones in the first round: compilation, first calls), and all sides again in each of
--rounds rounds. On a shared machine other processes come and go, and torch's threads suffer
from them more than XLA's, so each step records the share of the CPUs other processes used
meanwhile: steps are reported as "quiet" or "loaded", and ratios compare like with like. The
matmul peak is measured before every side for the same reason. The first losses of every side
are printed: all compute the same step.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time

import numpy as np
import jax
import jax.numpy as jnp
from flax import traverse_util

from benchmarks import roofline
from benchmarks.decode import PRESETS, param_count
from paligemma_jax.model import paligemma
from paligemma_jax.train import lora as lora_lib
from paligemma_jax.train import optim, trainer
from tests import bv_fixtures, train_fixtures
from tests.specs import spec_config

EOS, BOS, PAD, SEP = 1, 2, 0, 108  # 108: Gemma's "\n"
LR = 1e-5
QUIET = 0.15  # other processes' share of the CPUs below which a step counts as quiet


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def rss(field: str) -> float:
  """GiB of /proc/self/status's VmRSS (now) or VmHWM (peak since reset_peak)."""
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) / 2**20


def available_gib() -> float:
  with open("/proc/meminfo") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable:")) / 2**20


def reset_peak():
  """Hands freed heap back to the system, then resets VmHWM to the current RSS."""
  ctypes.CDLL("libc.so.6").malloc_trim(0)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def make_batch(spec, b, t, seed):
  """images (b,S,S,3), tokens/mask_ar/mask_loss (b, t+1) in training_example's layout; every
  row ends in padding, so the last target (which HF's labels cannot express) has no loss."""
  rng = np.random.default_rng(seed)
  s = spec["image_size"]
  images = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
  tokens = np.full((b, t + 1), PAD, np.int32)
  mask_ar, mask_loss = np.ones((b, t + 1), np.int32), np.zeros((b, t + 1), np.int32)
  for i in range(b):
    head = int(rng.integers(4, t // 3 + 2))            # bos + prefix + "\n"
    tail = int(rng.integers(3, t + 1 - head))          # suffix + eos, >= 1 pad after
    tokens[i, :head + tail] = rng.integers(3, spec["vocab"], head + tail)
    tokens[i, 0], tokens[i, head - 1], tokens[i, head + tail - 1] = BOS, SEP, EOS
    mask_ar[i, :head] = 0
    mask_loss[i, head:head + tail] = 1
  assert not mask_loss[:, -1].any()
  return dict(images=images, tokens=tokens, mask_ar=mask_ar, mask_loss=mask_loss)


def busy_cpu_s() -> float:
  """CPU seconds all processes have run (the machine's busy time) since boot."""
  with open("/proc/stat") as f:
    v = [int(x) for x in f.readline().split()[1:]]
  return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def timed(step, warmup, steps):
  """-> (wall s and other processes' share of the CPUs per timed call, losses of every call)
  of step() -> loss (waits for it)."""
  losses, times, others = [], [], []
  for i in range(warmup + steps):
    t0, c0, b0 = time.perf_counter(), time.process_time(), busy_cpu_s()
    losses.append(step())
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      mine = time.process_time() - c0
      others.append(max(0.0, (busy_cpu_s() - b0 - mine) / times[-1] / os.cpu_count()))
  return times, others, losses


class Ours:
  """`Trainer.run`'s step: make_train_step jitted with the trainable tree and optimizer state
  donated, compiled once; each run starts from `flat` with a fresh optimizer state."""

  def __init__(self, flat, spec, batch, remat, args):
    cfg = train_fixtures.config(dict(
        batch_size=args.batch, text_len=args.text_len, optimizer="adam", lr=LR,
        schedule="constant", warmup_steps=0, grad_clip_norm=0.0, weight_decay=0.0,
        loss_norm="tokens", remat_policy=remat, total_steps=1000))
    jax.config.update("jax_default_matmul_precision", cfg.matmul_precision)  # as Trainer
    model = trainer._model(spec_config(spec), cfg)
    sched = optim.schedule(cfg.schedule, cfg.total_steps, cfg.warmup_steps)
    self.tx = optim.optimizer("adam", lr=cfg.lr, sched=sched, grad_clip_norm=0.0,
                              weight_decay=0.0)
    self.flat = flat
    self.data = {k: jnp.asarray(v[None]) for k, v in batch.items()}  # (accum=1, micro=B, ...)
    self.rng = jax.random.PRNGKey(0)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in flat.items()}
    t0 = time.perf_counter()
    self.compiled = jax.jit(trainer.make_train_step(model, self.tx, sched, cfg),
                            donate_argnums=(0, 1)).lower(
        abstract, jax.eval_shape(self.tx.init, abstract), {}, self.data, jnp.int32(0),
        self.rng).compile()
    self.compile_s = time.perf_counter() - t0
    mem = self.compiled.memory_analysis()
    self.xla = dict(args=mem.argument_size_in_bytes, alias=mem.alias_size_in_bytes,
                    out=mem.output_size_in_bytes, temp=mem.temp_size_in_bytes)
    self.xla["peak"] = self.xla["args"] + self.xla["out"] - self.xla["alias"] + self.xla["temp"]

  def run(self, warmup, steps):
    trainable = {k: jax.device_put(v.copy()) for k, v in self.flat.items()}  # own buffers
    state = [trainable, jax.jit(self.tx.init)(trainable), 0]
    del trainable

    def step():
      state[0], state[1], m = self.compiled(state[0], state[1], {}, self.data,
                                            jnp.int32(state[2]), self.rng)
      state[2] += 1
      return float(m["loss"])
    return timed(step, warmup, steps)


class HF:
  """model(**inputs, labels=...).loss.backward(); fused AdamW step; zero_grad. Each run loads
  `flat` again and starts a fresh optimizer."""

  def __init__(self, model, flat, spec, batch, keep, args):
    import torch
    from tests import hf_reference
    self.model, self.flat, self.spec = model, flat, spec
    ni, t = bv_fixtures.spec_image_tokens(spec), args.text_len
    tok = torch.from_numpy(batch["tokens"]).long()
    ids = hf_reference._full_ids(model, batch["tokens"][:, :-1])
    b, s = ids.shape
    types = torch.cat([torch.zeros(b, ni, dtype=torch.long),  # 0: prefix (full attention)
                       torch.from_numpy(batch["mask_ar"][:, :-1]).long()], 1)
    # HF shifts labels inside its loss: labels[p] is the target of logits[p - 1].
    text = torch.where(torch.from_numpy(batch["mask_loss"][:, :-1]) > 0, tok[:, :-1], -100)
    labels = text if keep else torch.cat([torch.full((b, ni), -100, dtype=torch.long), text], 1)
    self.inputs = dict(
        input_ids=ids, pixel_values=hf_reference._to_torch_pixels(batch["images"]),
        attention_mask=torch.ones_like(ids), token_type_ids=types, labels=labels,
        position_ids=torch.arange(s)[None].expand(b, s),  # 0-based, as big_vision (and ours)
        use_cache=False, logits_to_keep=t if keep else 0)

  def run(self, warmup, steps):
    import torch
    from tests import hf_reference
    with torch.no_grad():
      self.model.load_state_dict(hf_reference.bv_to_hf_state_dict(self.flat, self.spec))
    opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=True)

    def step():
      opt.zero_grad(set_to_none=True)
      loss = self.model(**self.inputs).loss
      loss.backward()
      opt.step()
      return loss.item()
    try:
      return timed(step, warmup, steps)
    finally:
      opt.zero_grad(set_to_none=True)  # the optimizer state goes with this frame


def build_hf(flat, spec):
  from tests import hf_reference
  model = hf_reference.build_hf_paligemma(flat, spec)
  model.set_attn_implementation("sdpa")  # HF's default
  model.train().requires_grad_(True)
  assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
  return model, sum(p.numel() for p in model.parameters())


def fit_3b(batch=8, text_len=128, rank=8):
  """Bytes to fine-tune PaliGemma 3B at 224 px, estimated from shapes (nothing runs)."""
  sp = PRESETS["3b"]
  n = param_count(sp)
  ni = bv_fixtures.spec_image_tokens(sp)
  s, d, f = ni + text_len, sp["llm_width"], sp["llm_mlp"]
  nh, kh, heads = sp["llm_heads"] * sp["head_dim"], sp["llm_kv_heads"] * sp["head_dim"], \
      sp["llm_heads"]
  w, m = sp["vit_width"], sp["vit_mlp"]
  # nothing_saveable keeps each layer's input; backward recomputes one layer at a time and
  # holds its activations and their gradients (x2). Per token, in elements:
  llm_layer = 5 * d + 3 * nh + 3 * kh + 4 * f + 2 * heads * s   # norms, q/k/v, rope, MLP, scores
  vit_layer = 8 * w + 3 * m + 2 * sp["vit_heads"] * ni
  saved = sp["llm_depth"] * batch * s * d + sp["vit_depth"] * batch * ni * w
  work = 2 * max(llm_layer * batch * s, vit_layer * batch * ni)
  logits = 3 * batch * text_len * sp["vocab"] * 4                 # f32: logits, log-softmax, grad
  act_f32 = 4 * (saved + work) + logits
  config = spec_config(sp)
  example = (jnp.zeros((1, 224, 224, 3)), jnp.zeros((1, 2), jnp.int32),
             jnp.zeros((1, 2), jnp.int32))
  shapes, _ = lora_lib.adapter_shapes(paligemma.PaliGemma(config), None, example,
                                      train_fixtures.config({}).lora.targets, rank)
  n_lora = sum(int(np.prod(v.shape)) for v in shapes.values())
  act_bf16 = 2 * (saved + work) + logits
  return dict(n=n, full=16 * n + act_f32, full_states=16 * n, act_f32=act_f32,
              n_lora=n_lora, lora=2 * n + 16 * n_lora + act_bf16, lora_states=16 * n_lora,
              act_bf16=act_bf16, lora_f32_base=4 * n + 16 * n_lora + act_bf16)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", choices=["tiny", "small"], default="small")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--text_len", type=int, default=32)
  ap.add_argument("--steps", type=int, default=1, help="timed steps per side and round")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side, first round")
  ap.add_argument("--rounds", type=int, default=4, help="each side runs once per round")
  ap.add_argument("--remat", default="none,nothing_saveable", help="our remat policies")
  ap.add_argument("--hf", default="labels,keep", help="HF variants: labels (all positions' "
                  "logits, HF's default), keep (logits_to_keep=text_len); '' = none")
  args = ap.parse_args(argv)
  import torch
  torch.set_num_threads(os.cpu_count())
  spec = PRESETS[args.preset]
  b, t = args.batch, args.text_len
  tokens_per_step = b * (bv_fixtures.spec_image_tokens(spec) + t)

  peaks = []  # (FLOP/s of a 2048^3 float32 jnp.dot, other processes' share meanwhile)

  def measure_peak():
    c0, b0 = time.process_time(), busy_cpu_s()
    t0 = time.perf_counter()
    rate = roofline.measure_matmul_rate("float32", 2048)
    others = (busy_cpu_s() - b0 - time.process_time() + c0) / (time.perf_counter() - t0)
    peaks.append((rate, others / os.cpu_count()))
  log("measuring the matmul rate ...")
  measure_peak()
  torch_rate = roofline.measure_torch_matmul_rate("float32")
  flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(
      paligemma.init_params(spec_config(spec), 0), sep="/").items()}
  n = sum(v.size for v in flat.values())
  batch = make_batch(spec, b, t, seed=1)
  sides = {}
  for remat in filter(None, args.remat.split(",")):
    log(f"compiling ours, remat {remat} ...")
    sides[f"ours, remat {remat}"] = Ours(flat, spec, batch, remat, args)
  variants = [v for v in args.hf.split(",") if v]
  if variants:
    model, n_hf = build_hf(flat, spec)
    assert n_hf == n, (n_hf, n)
    for v in variants:
      sides["HF labels" if v == "labels" else f"HF keep={t}"] = HF(
          model, flat, spec, batch, v == "keep", args)
  # One side at a time (both states do not fit in 23 GiB together), in rounds.
  rows = {k: dict(times=[], others=[], losses=[], rss_peak=0.0) for k in sides}
  for r in range(args.rounds):
    for name, side in sides.items():
      gc.collect()
      measure_peak()  # before every side: the peak under the same load
      reset_peak()
      times, others, losses = side.run(args.warmup if r == 0 else 0, args.steps)
      row = rows[name]
      row["rss_peak"] = max(row["rss_peak"], rss("VmHWM"))
      row["times"] += times
      row["others"] += others
      row["losses"].append(losses)
      log(f"round {r + 1}/{args.rounds} {name}: {', '.join(f'{x:.2f}' for x in times)} s "
          f"(others {', '.join(f'{100 * x:.0f}%' for x in others)} of the CPUs; RSS peak "
          f"{rss('VmHWM'):.1f} GiB, {available_gib():.1f} GiB available)")
  measure_peak()

  # --- report. Steps are split by the load other processes put on the machine meanwhile:
  # "quiet" (< QUIET of the CPUs) and "loaded"; ratios compare steps of the same kind only.
  def by_load(row, quiet):
    return [x for x, o in zip(row["times"], row["others"]) if (o < QUIET) == quiet]
  fwd = roofline.prefill_flops(spec, b, t)  # forward; logits of the last token only
  head = 2 * spec["llm_width"] * spec["vocab"] * b
  text_fwd = fwd["total"] + head * (t - 1)
  counted = {"ours, remat none": 3 * text_fwd,  # forward + backward (2 x forward)
             "ours, remat nothing_saveable": 3 * text_fwd + fwd["vit"] + fwd["llm"],  # + recompute
             "HF labels": 3 * (fwd["total"] + head * (tokens_per_step // b - 1)),
             f"HF keep={t}": 3 * text_fwd}
  flops = 6 * n * tokens_per_step
  best = {q: max([r for r, o in peaks if (o < QUIET) == q] or [r for r, _ in peaks])
          for q in (True, False)}  # the fastest product seen under each kind of load
  print(f"preset={args.preset} ({n / 1e6:.1f}M params) batch={b} text_len={t} tokens/step="
        f"{tokens_per_step} float32; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers "
        f"{__import__('transformers').__version__}; {args.rounds} rounds x {args.steps} timed "
        f"step(s) per side ({args.warmup} warm-up first), medians")
  rates = lambda q: ", ".join(f"{r / 1e9:.0f}" for r, o in peaks if (o < QUIET) == q) or "-"
  print(f"peak matmul (2048^3 float32 jnp.dot, before every side), GFLOP/s: quiet {rates(True)};"
        f" loaded {rates(False)} (torch at the start: {torch_rate / 1e9:.0f}). Rows use the "
        f"best of their load: {best[True] / 1e9:.0f} quiet, {best[False] / 1e9:.0f} loaded")
  hf_rows = [k for k in rows if k.startswith("HF")]
  fmt = "{:<28s} {:<10s} {:>2s} {:>7s} {:>5s} {:>8s}" + " {:>11s}" * len(hf_rows) + " {:>5s} {:>7s}"
  print(fmt.format("", "load", "n", "step s", "ex/s", "tokens/s", *[f"/{k}" for k in hf_rows],
                   "6NT", "counted"))
  for quiet in (True, False):
    for name, r in rows.items():
      times = by_load(r, quiet)
      if not times:
        continue
      step = statistics.median(times)
      others = statistics.median(o for o in r["others"] if (o < QUIET) == quiet)
      ratios = [f"{statistics.median(by_load(rows[k], quiet)) / step:.2f}x"
                if by_load(rows[k], quiet) else "-" for k in hf_rows]
      print(fmt.format(name, f"{'quiet' if quiet else 'loaded'} {100 * others:.0f}%",
                       str(len(times)), f"{step:.2f}", f"{b / step:.2f}",
                       f"{tokens_per_step / step:.0f}", *ratios,
                       f"{100 * flops / step / best[quiet]:.0f}%",
                       f"{100 * counted.get(name, 0) / step / best[quiet]:.0f}%"))
  print(f"  load: the share of all {os.cpu_count()} CPUs that other processes used during the "
        f"step (quiet: < {100 * QUIET:.0f}%); /HF...: that HF side's median step time over this "
        "side's, same load only (> 1: faster than HF)")
  print(f"  6NT: 6 x params x tokens = {flops / 1e12:.2f} TFLOP/step over the peak (counts the "
        f"{spec['vocab'] * spec['llm_width'] / n:.0%} of the params in the tied embedding on every "
        f"token, where it multiplies only on the {t} text positions)")
  print(f"  counted: matmul FLOPs from the shapes over the peak: {counted['ours, remat none'] / 1e12:.2f}"
        f" TFLOP/step (forward x 3, tied head on the {t} text positions: ours, HF keep), "
        f"+ {(fwd['vit'] + fwd['llm']) / 1e12:.2f} recomputed with nothing_saveable, "
        f"{counted['HF labels'] / 1e12:.2f} for HF labels (head on all {tokens_per_step // b})")
  for name, r in rows.items():
    extra = ""
    if isinstance(sides[name], Ours):
      x = {k: v / 2**30 for k, v in sides[name].xla.items()}
      extra = (f"; XLA: args {x['args']:.2f} + out {x['out']:.2f} - alias {x['alias']:.2f} + "
               f"temp {x['temp']:.2f} = {x['peak']:.2f} GiB; compile {sides[name].compile_s:.0f} s")
    print(f"  {name}: steps {', '.join(f'{s:.1f}' for s in r['times'])} s; first losses "
          f"{', '.join(f'{l:.6f}' for l in r['losses'][0][:2])}; RSS peak {r['rss_peak']:.1f} "
          f"GiB{extra}")
  print(f"  RSS peak: the process's during each side, including the "
        f"{sum(v.nbytes for v in flat.values()) / 2**30:.2f} GiB float32 source arrays"
        + (" and HF's parameters" if hf_rows else ""))

  e = fit_3b()
  g = lambda x: f"{x / 1e9:.1f} GB"
  print(f"PaliGemma 3B ({e['n'] / 1e9:.2f} B params), batch 8, 224 px, text_len 128, estimate:"
        f"\n  float32 full, Adam: {g(e['full_states'])} params+grads+moments + "
        f"{g(e['act_f32'])} activations (nothing_saveable) = {g(e['full'])}"
        f"\n  bfloat16 LoRA r=8 (attn+mlp, {e['n_lora'] / 1e6:.1f}M adapters): "
        f"{g(2 * e['n'])} base + {g(e['lora_states'])} adapters+grads+moments (f32) + "
        f"{g(e['act_bf16'])} activations = {g(e['lora'])} "
        f"({g(e['lora_f32_base'])} with a float32 base)")
  return rows


if __name__ == "__main__":
  main()
