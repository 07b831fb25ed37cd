"""The transfer trainer (issue 17): gradient accumulation, freezing, LoRA, exact resume after
SIGKILL, NaN stop, big_vision's schedule and adam chain, bad input, and an overfit model that
answers through main.py."""
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from tests import train_fixtures
from paligemma_jax.data import jsonl
from paligemma_jax.data.jsonl import DataError
from paligemma_jax.model import paligemma
from paligemma_jax.train import lora as lora_lib
from paligemma_jax.train import loss as loss_lib
from paligemma_jax.train import optim
from paligemma_jax.train.trainer import Trainer, TrainError

REPO = train_fixtures.REPO


def _trainer(tmp_path, tokenizer, workdir="run", **fields) -> Trainer:
  cfg = train_fixtures.config(train_fixtures.settings(tmp_path, tokenizer.path, **fields))
  return Trainer(cfg, os.path.join(tmp_path, workdir), progress=False)


def _npz(path) -> dict:
  with np.load(path) as z:
    return {k.removeprefix("params/"): z[k] for k in z.files}


def _metrics(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _rel(a, b) -> float:
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------------
# The optimizer.

@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_is_big_vision_s(name):
  """big_vision's `create_learning_rate_schedule`, written out: warmup step/w, then decay of
  progress (step - w) / (total - w)."""
  total, warm = 20, 4
  fn = optim.schedule(name, total, warm)
  for step in range(total + 1):
    p = min(max((step - warm) / (total - warm), 0.0), 1.0)
    want = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[name]
    want *= min(1.0, step / warm)
    assert abs(float(fn(step)) - want) < 1e-6, (step, float(fn(step)), want)


def test_adam_chain_is_big_vision_s():
  """Two updates of clip(1) -> adam(0.9, 0.999) -> lr -> + wd * p (masked) -> x schedule -> -1,
  against numpy. The decay is not multiplied by lr."""
  rng = np.random.default_rng(0)
  params = {"a/kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "b/w": rng.normal(size=(5,)).astype(np.float32)}
  grads = [{k: 3 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(2)]
  lr, wd, sched = 0.1, 0.01, optim.schedule("cosine", 10, 1)
  tx = optim.optimizer("adam", lr=lr, sched=sched, grad_clip_norm=1.0, weight_decay=wd,
                       wd_mask={"a/kernel": True, "b/w": False})
  state, p = tx.init(params), dict(params)
  ref = {k: v.astype(np.float64) for k, v in params.items()}
  mu = {k: 0.0 for k in params}
  nu = {k: 0.0 for k in params}
  for t, g in enumerate(grads):
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g.values()))
    for k in params:
      gk = g[k] * min(1.0, 1.0 / norm)
      mu[k] = 0.9 * mu[k] + 0.1 * gk
      nu[k] = 0.999 * nu[k] + 0.001 * gk * gk
      adam = (mu[k] / (1 - 0.9 ** (t + 1))) / (np.sqrt(nu[k] / (1 - 0.999 ** (t + 1))) + 1e-8)
      decay = wd * ref[k] if k == "a/kernel" else 0.0
      ref[k] = ref[k] - float(sched(t)) * (lr * adam + decay)
  for k in params:
    assert _rel(np.asarray(p[k]), ref[k]) < 1e-5, k


# ---------------------------------------------------------------------------
# Runs.

def test_gradient_accumulation_equals_one_large_batch(tmp_path, tokenizer):
  """k micro-batches of B/k give the update of one batch of B (same examples, big_vision's
  per-example mean): losses within 1e-5 relative, the parameter change within 1e-4 of its
  largest magnitude (float32 summation order)."""
  runs = {}
  for accum in (1, 2, 4):
    tr = _trainer(tmp_path, tokenizer, f"accum{accum}", grad_accum_steps=accum, total_steps=3,
                  optimizer="sgd", lr=0.05, schedule="constant")
    tr.run()
    runs[accum] = (_metrics(tr.workdir), _npz(os.path.join(tr.workdir, "final.npz")))
  base_metrics, base_params = runs[1]
  init = _npz(train_fixtures.write_init(tmp_path))
  for accum in (2, 4):
    metrics, params = runs[accum]
    for a, b in zip(metrics, base_metrics):
      assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"], (accum, a, b)
    worst = (max(np.abs(params[k] - base_params[k]).max() for k in init)
             / max(np.abs(base_params[k] - init[k]).max() for k in init))
    print(f"accum {accum}: parameter change differs by {worst:.2e} of its largest magnitude")
    assert worst < 1e-4, (accum, worst)


def test_frozen_weights_are_bitwise_unchanged_with_no_optimizer_state(tmp_path, tokenizer):
  tr = _trainer(tmp_path, tokenizer, freeze="img/.*", total_steps=2, weight_decay=0.1)
  tr.run()
  init, final = _npz(train_fixtures.write_init(tmp_path)), _npz(
      os.path.join(tr.workdir, "final.npz"))
  img = [k for k in init if k.startswith("img/")]
  assert img and all(np.array_equal(final[k], init[k]) for k in img)
  assert any(not np.array_equal(final[k], init[k]) for k in init if k.startswith("llm/"))
  state_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(tr.opt_state)[0]]
  assert state_paths and not any("img/" in p for p in state_paths)
  n_llm = sum(k.startswith("llm/") for k in init)
  assert sum(1 for _ in jax.tree_util.tree_leaves(tr.opt_state)) == 2 * n_llm + 2  # mu, nu, counts


def _lora_delta(key, a, b):
  """A @ B laid out as the weight, written per weight kind (independently of lora.merge)."""
  eqn = {"attn/q_einsum/w": "ldr,lrnh->lndh", "attn/kv_einsum/w": "ldr,lrckh->lckdh",
         "attn/attn_vec_einsum/w": "lnhr,lrd->lnhd", "mlp/gating_einsum": "ldr,lrcf->lcdf",
         "mlp/linear": "lfr,lrd->lfd"}[key.removeprefix("llm/layers/")]
  return np.einsum(eqn, a.astype(np.float64), b.astype(np.float64))


def test_lora_trains_adapters_only_and_merges_into_final_npz(tmp_path, tokenizer):
  rank, alpha = 2, 4.0
  export = os.path.join(tmp_path, "adapters.npz")
  tr = _trainer(tmp_path, tokenizer, total_steps=3, lr=1e-2, **{
      "lora.rank": rank, "lora.alpha": alpha, "export_lora": export})
  tr.run()
  init = _npz(train_fixtures.write_init(tmp_path))
  assert set(tr.frozen) == set(init)
  assert all(np.array_equal(np.asarray(tr.frozen[k]), init[k]) for k in init)  # base untouched
  adapters = _npz(export)
  targets = sorted(k[:-len("_lora_a")] for k in adapters if k.endswith("_lora_a"))
  assert targets == ["llm/layers/attn/attn_vec_einsum/w", "llm/layers/attn/kv_einsum/w",
                     "llm/layers/attn/q_einsum/w", "llm/layers/mlp/gating_einsum",
                     "llm/layers/mlp/linear"]
  final = _npz(os.path.join(tr.workdir, "final.npz"))
  assert set(final) == set(init)
  for k in init:
    if k in targets:
      b = adapters[k + "_lora_b"]
      assert np.abs(b).max() > 0, k  # B started at zero and trained
      want = init[k] + alpha / rank * _lora_delta(k, adapters[k + "_lora_a"], b)
      assert _rel(final[k], want) < 1e-6, k
    else:
      assert np.array_equal(final[k], init[k]), k
  # The adapted model (interceptor) and the merged checkpoint give the same logits.
  model = paligemma.PaliGemma(tr.config)
  batch = tr._host_batch(tr.train, np.arange(2), np.zeros((2, 224, 224, 3), np.float32))
  args = (batch["images"], batch["tokens"][:, :-1], batch["mask_ar"][:, :-1])
  with jax.default_matmul_precision("highest"):
    with lora_lib.nn.intercept_methods(tr.intercept):
      adapted = model.apply({"params": traverse_util.unflatten_dict(
          {**tr.frozen, **tr.trainable}, sep="/")}, *args)[0]
    merged = model.apply({"params": traverse_util.unflatten_dict(
        {k: jnp.asarray(v) for k, v in final.items()}, sep="/")}, *args)[0]
  assert _rel(np.asarray(adapted), np.asarray(merged)) < 1e-5


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tokenizer):
  tr = _trainer(tmp_path, tokenizer, optimizer="sgd", lr=1e30, grad_clip_norm=0.0,
                schedule="constant", ckpt_steps=1, total_steps=6)
  with pytest.raises(TrainError, match=r"the loss is (nan|inf|-inf) at step (\d+)") as e:
    tr.run()
  bad_step = int(e.value.args[0].split(" at step ")[1].split(";")[0])
  assert bad_step >= 2 and tr.manager.latest_step() == bad_step - 1
  assert f"step {bad_step - 1}, is intact" in str(e.value)
  assert not os.path.exists(os.path.join(tr.workdir, "final.npz"))
  resumed = _trainer(tmp_path, tokenizer, optimizer="sgd", lr=1e30, grad_clip_norm=0.0,
                     schedule="constant", ckpt_steps=1, total_steps=6)
  assert resumed.step == bad_step - 1  # the checkpoint restores
  assert all(np.isfinite(np.asarray(v)).all() for v in resumed.trainable.values())


_KILLER = """
import os, runpy, signal, sys
from paligemma_jax.train import trainer
append = trainer._append_metrics
def append_then_die(path, record):
  append(path, record)
  if record["step"] == {kill_step}:
    os.kill(os.getpid(), signal.SIGKILL)
trainer._append_metrics = append_then_die
sys.argv = {argv!r}
runpy.run_module("paligemma_jax.train", run_name="__main__")
"""


def test_sigkill_then_the_same_command_ends_exactly_as_an_uninterrupted_run(tmp_path,
                                                                            tokenizer):
  """Killed (SIGKILL) after step 5, between the checkpoints of steps 4 and 6, then the same
  command: final parameters bitwise equal to an uninterrupted run's; metrics.jsonl has each
  step once with the same losses. Dropout is on, so the RNG must resume too."""
  fields = train_fixtures.settings(tmp_path, tokenizer.path, total_steps=8, ckpt_steps=2,
                                   eval_steps=100, dropout=0.1, n=6)
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  r = train_fixtures.run_cli(whole, fields)
  assert r.returncode == 0, r.stderr[-3000:]
  argv = train_fixtures.train_command(killed, fields)[3:]
  r = subprocess.run([sys.executable, "-c", _KILLER.format(kill_step=5, argv=["x", *argv])],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
  assert not os.path.exists(killed / "final.npz")
  assert sorted(os.listdir(killed / "checkpoints")) == ["2", "4"]
  r = train_fixtures.run_cli(killed, fields)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resuming" in r.stdout and "from step 4" in r.stdout
  a, b = _npz(whole / "final.npz"), _npz(killed / "final.npz")
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  ma, mb = _metrics(whole), _metrics(killed)
  assert [m["step"] for m in mb] == list(range(1, 9))
  assert [m["loss"] for m in ma] == [m["loss"] for m in mb]


def test_overfit_model_answers_each_suffix_through_main_py(tmp_path, tokenizer):
  """A tiny model fine-tuned on 4 pictures with different captions says each caption exactly
  (greedy, through main.py's batch job on the training JSONL itself)."""
  tr = _trainer(tmp_path, tokenizer, total_steps=60, lr=3e-3, warmup_steps=5,
                schedule="cosine", ckpt_steps=1000, eval_steps=1000, log_steps=10)
  last = tr.run()
  assert last["loss"] < 0.01, last
  out = tmp_path / "answers.jsonl"
  r = subprocess.run([sys.executable, "main.py", f"--ckpt={tr.workdir}/final.npz",
                      f"--tokenizer={tokenizer.path}", f"--images={tr.cfg.train_data}",
                      f"--output_jsonl={out}", "--max_decode_len=16"],
                     cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  answers = {os.path.basename(json.loads(l)["image"]): json.loads(l)["text"]
             for l in open(out)}
  want = {os.path.basename(ex.image): ex.suffix for ex in tr.train.examples}
  assert answers == want


# ---------------------------------------------------------------------------
# Length buckets.

def _rows(widths, text_len):
  """Tokenized rows whose examples fill `widths` positions (eos last) of text_len + 1."""
  mask_loss = np.zeros((len(widths), text_len + 1), np.int32)
  for i, w in enumerate(widths):
    mask_loss[i, 2:w] = 1
  z = np.zeros_like(mask_loss)
  return jsonl.Tokenized(z, z, mask_loss, 0)


def test_bucketed_epochs_hold_each_example_once_in_the_shortest_length_that_fits():
  rng = np.random.default_rng(0)
  widths = rng.integers(4, 38, 1000)
  text = _rows(widths, 36)
  assert np.array_equal(jsonl.text_widths(text), widths)
  lens = [16, 24, 36]
  buckets = jsonl.length_buckets(widths, lens)
  assert np.array_equal(buckets, np.where(widths <= 17, 0, np.where(widths <= 25, 1, 2)))
  counts = np.bincount(buckets)
  epochs = [jsonl.bucketed_epoch(buckets, 3, 8, seed=0, epoch=e) for e in range(3)]
  assert all(len(plan) == (counts // 8).sum() for plan in epochs)
  for plan in epochs:
    seen = np.concatenate([idx for _, idx in plan])
    assert len(seen) == len(set(seen.tolist()))                 # no example twice in an epoch
    assert all(len(idx) == 8 and (buckets[idx] == b).all() for b, idx in plan)
    assert len(seen) >= len(widths) - 3 * 7                     # at most a partial batch left
  assert [b for b, _ in epochs[0]] != [b for b, _ in epochs[1]]   # lengths interleave anew
  again = jsonl.bucketed_epoch(buckets, 3, 8, seed=0, epoch=1)    # as on resume
  assert all(a == b and np.array_equal(x, y) for (a, x), (b, y) in zip(epochs[1], again))


def test_a_bucketed_step_trains_on_its_examples_as_at_full_length(tmp_path, tokenizer):
  """With text_len_buckets each batch is cut to the shortest length that holds its examples;
  each step's loss equals big_vision's loss of the same examples at the full text_len (1e-5
  relative: trailing pads are seen by nothing; lr 0 keeps the parameters), and both lengths
  occur."""
  data = tmp_path / "mixed.jsonl"
  short = train_fixtures.write_data(tmp_path, 8, name="short.jsonl")
  long_ = train_fixtures.write_data(tmp_path, 8, name="long.jsonl", seed=1)
  with open(data, "w") as f:
    f.writelines(open(short))
    for line in open(long_):
      row = json.loads(line)
      row["suffix"] = " ".join([row["suffix"]] * 3)
      f.write(json.dumps(row) + "\n")
  tr = _trainer(tmp_path, tokenizer, train_data=str(data), text_len=48, text_len_buckets="12",
                total_steps=6, optimizer="sgd", lr=0.0, schedule="constant", ckpt_steps=100,
                eval_steps=100)
  widths = jsonl.text_widths(tr.train.text)
  plan = [tr._indices(step) for step in range(6)]
  assert {n for _, n in plan} == {12, 48}
  params = traverse_util.unflatten_dict({**tr.frozen, **tr.trainable}, sep="/")
  pixels, t, want = jsonl.Pixels(tr.config.image_size), tr.train.text, []
  for step, (idx, n) in enumerate(plan):
    assert widths[idx].max() <= n + 1 and (n == 12 or widths[idx].max() > 13)
    images = jnp.asarray(pixels.get(step, [tr.train.examples[i].image for i in idx]))
    want.append(float(loss_lib.batch_loss(tr.model, params, images, t.tokens[idx],
                                          t.mask_ar[idx], t.mask_loss[idx])))
  pixels.close()
  tr.run()
  got = [m["loss"] for m in _metrics(tr.workdir)]
  assert np.allclose(got, want, rtol=1e-5, atol=0), (got, want)  # measured within 2e-6


# ---------------------------------------------------------------------------
# Bad input: an error naming the file, line or setting, before anything compiles.

def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


@pytest.mark.parametrize("line,message", [
    ("{not json", r"bad\.jsonl:2: not JSON"),
    ('{"image": "img/train_0.png", "prefix": "caption en"}', r"bad\.jsonl:2: missing field suffix"),
    ('{"image": 3, "prefix": "a", "suffix": "b"}', r"bad\.jsonl:2: field 'image' must be a string"),
    ('["image", "prefix"]', r"bad\.jsonl:2: expected a JSON object"),
    ('{"image": "img/none.png", "prefix": "a", "suffix": "b"}', r"bad\.jsonl:2: image .*none\.png does not exist"),
    ('{"image": "broken.png", "prefix": "a", "suffix": "b"}', r"bad\.jsonl:2: image .*broken\.png cannot be read"),
])
def test_bad_data_lines_are_named(tmp_path, tokenizer, line, message):
  data = train_fixtures.write_data(tmp_path, 1, name="bad.jsonl")
  _write(tmp_path / "broken.png", "not a picture")
  with open(data, "a") as f:
    f.write(line + "\n")
  with pytest.raises(DataError, match=message):
    _trainer(tmp_path, tokenizer, train_data=data)


@pytest.mark.parametrize("fields,message", [
    ({"freeze": "vision/.*"}, r"--config.freeze='vision/\.\*' matches no parameter"),
    ({"lora.rank": 4, "lora.targets": "llm/nothing"}, r"lora.targets='llm/nothing' matches no"),
    ({"batch_size": 6, "grad_accum_steps": 4}, r"batch_size=6 is not divisible by"),
    ({"text_len": 3}, r"text_len=3 is too small for 4 of 4 examples \(line 1"),
    ({"optimizer": "adamw"}, r"optimizer must be one of adam, sgd, adafactor"),
    ({"schedule": "cosine", "warmup_steps": 4}, r"warmup_steps=4 must be below total_steps=4"),
    ({"mesh": "2x1"}, r"mesh 2x1 needs 2 devices"),
    ({"init": "/nonexistent.npz"}, r"--config.init: .*nonexistent"),
    ({"freeze": ".*"}, r"freezes every parameter"),
    ({"text_len_buckets": "8;12"}, r"text_len_buckets='8;12': expected integers"),
    ({"text_len_buckets": "8,16"}, r"text_len_buckets='8,16': each length .* below "
     r"--config.text_len=16"),
])
def test_bad_settings_are_named(tmp_path, tokenizer, fields, message):
  with pytest.raises((TrainError, DataError), match=message):
    _trainer(tmp_path, tokenizer, **fields)


def test_cli_bad_input_is_one_error_line(tmp_path, tokenizer):
  fields = train_fixtures.settings(tmp_path, tokenizer.path, freeze="nothing/.*")
  r = train_fixtures.run_cli(tmp_path / "run", fields)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: --config.freeze='nothing/.*'")
  assert "Traceback" not in r.stderr


def test_bfloat16_computes_in_bf16_with_float32_master_weights(tmp_path, tokenizer):
  """dtype=bfloat16: the loss curve follows float32's within 2% and every trained array and
  optimizer moment stays float32."""
  curves = {}
  for dtype in ("float32", "bfloat16"):
    tr = _trainer(tmp_path, tokenizer, dtype, dtype=dtype, total_steps=3)
    tr.run()
    curves[dtype] = [m["loss"] for m in _metrics(tr.workdir)]
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((tr.trainable, tr.opt_state))
              if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
  assert curves["float32"] != curves["bfloat16"]  # it did compute in bfloat16
  for a, b in zip(curves["bfloat16"], curves["float32"]):
    assert abs(a - b) < 0.02 * b, (curves)


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_other_optimizers_descend(name):
  """sgd and adafactor (factored second moments) reduce a least-squares loss in 20 steps."""
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(64, 48)).astype(np.float32), rng.normal(size=(64, 40)).astype(np.float32)
  params = {"w": jnp.zeros((48, 40))}
  loss = lambda p: jnp.mean((x @ p["w"] - y) ** 2)
  tx = optim.optimizer(name, lr=5.0 if name == "sgd" else 0.01,
                       sched=optim.schedule("constant", 20))
  state = tx.init(params)
  start = float(loss(params))
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.9 * start
