"""The procedural shapes data set, its VQ-VAE and recipe, and the shipped embedded default
(issue 18)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import train_fixtures
from paligemma_jax import demo
from paligemma_jax.answers import outputs
from paligemma_jax.data import shapes
from paligemma_jax.model import vqvae
from paligemma_jax.pipeline import PaliGemmaPipeline
from paligemma_jax.train import vqvae as vqvae_training

REPO = train_fixtures.REPO


def test_scenes_have_exact_disjoint_objects_on_the_grid():
  rng = np.random.default_rng(0)
  counts = set()
  for _ in range(50):
    objs = shapes.random_scene(rng)
    counts.add(len(objs))
    assert len({o.label for o in objs}) == len(objs)  # "the red circle" names one object
    masks = [shapes.object_mask(o) for o in objs]
    assert sum(m.astype(int) for m in masks).max() == 1  # no shared pixel
    for o, m in zip(objs, masks):
      y1, x1, y2, x2 = o.box
      assert all(v % shapes.GRID == 0 for v in o.box) and y2 - y1 in shapes.SIDES
      ys, xs = np.nonzero(m)  # the box is the mask's extent, exactly
      assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == o.box
    img = np.asarray(shapes.render(objs, rng))
    for o, m in zip(objs, masks):  # each object's pixels carry its colour (jitter <= 12)
      assert np.abs(img[m].astype(int) - shapes.COLORS[o.color]).max() <= 13
  assert counts == {1, 2, 3}  # every scene size occurs, none beyond


def test_answers_follow_the_scene():
  objs = [shapes.Obj("square", "blue", (0, 0, 48, 48)), shapes.Obj("circle", "red", (96, 160, 160, 224)),
          shapes.Obj("circle", "green", (160, 32, 224, 96))]
  rng = np.random.default_rng(0)
  got = {t: (p, s) for t, p, s in shapes.examples(objs, rng, lambda m: np.arange(16)[None].repeat(len(m), 0))}
  assert got["caption"][1] == "a blue square , a green circle and a red circle"
  assert got["detect"] == ("detect blue square ; green circle ; red circle",
                           "<loc0000><loc0000><loc0219><loc0219> blue square ; "
                           "<loc0731><loc0146><loc1023><loc0438> green circle ; "
                           "<loc0438><loc0731><loc0731><loc1023> red circle")
  prefix, suffix = got["segment"]
  label = prefix[len("segment "):]
  assert suffix.endswith(" " + label) and suffix.count("<seg") == 16 and suffix.count("<loc") == 4
  q, a = got["count"]
  shape = {v: k for k, v in shapes.PLURALS.items()}[q.split()[-1]]
  assert a == str(sum(o.shape == shape for o in objs))
  q, a = got["color"]
  assert q == "answer en what color is the square" and a == "blue"  # the only single shape


def test_write_is_deterministic_and_readable(tmp_path):
  encode = lambda m: np.zeros((len(m), 16), int)
  a = shapes.write(str(tmp_path / "a"), 6, seed=3, encode_masks=encode)
  b = shapes.write(str(tmp_path / "b"), 6, seed=3, encode_masks=encode)
  assert open(a["all"]).read() == open(b["all"]).read()
  from paligemma_jax.eval import evaluators
  examples, masks = evaluators.read_references(a["segment"])
  assert len(examples) == 6 and all(m and os.path.exists(m) for m in masks)


def test_narrowed_spec_writes_one_object_captions_without_a_vae(tmp_path):
  from paligemma_jax.train import shapes_recipe
  assert shapes_recipe.parse("shapes:6000:0") == (6000, 0, 3, shapes.TASKS, {})
  assert shapes_recipe.parse("shapes:8:4:1:caption,count") == (8, 4, 1, ("caption", "count"), {})
  assert shapes_recipe.parse("shapes:8:4:3:caption,color@0.25") == (
      8, 4, 3, ("caption", "color"), {"color": 0.25})
  for bad in ("shapes:8", "shapes:8:x", "shapes:8:4:1", "shapes:8:4:0:caption",
              "shapes:8:4:1:poem", "shapes:8:4:1:caption@0", "shapes:8:4:1:caption@x"):
    with pytest.raises(ValueError, match=bad):
      shapes_recipe.parse(bad)
  path = shapes_recipe.prepare("shapes:8:4:1:caption", str(tmp_path), vae_path="/nonexistent")
  assert os.path.basename(os.path.dirname(path)) == "shapes_8_4_1_caption"
  rows = [json.loads(l) for l in open(path)]
  assert len(rows) == 8 and {r["prefix"] for r in rows} == {"caption en"}
  assert all(r["suffix"].count(" a ") == 0 and r["suffix"].startswith("a ") for r in rows)


def test_task_rates_ask_fewer_questions_of_the_same_scenes(tmp_path):
  """`rates` drops questions at random without changing the scenes or the kept questions."""
  encode = lambda m: np.zeros((len(m), 16), int)
  full = shapes.write(str(tmp_path / "full"), 200, seed=5, encode_masks=encode)
  some = shapes.write(str(tmp_path / "some"), 200, seed=5, encode_masks=encode,
                      rates={"color": 0.25, "segment": 0.5})
  read = lambda p: [json.loads(l) for l in open(p)]
  for task in ("caption", "count", "detect"):
    assert read(full[task]) == read(some[task])
  for task, rate in (("color", 0.25), ("segment", 0.5)):
    kept, every = read(some[task]), read(full[task])
    assert all(r in every for r in kept)
    assert abs(len(kept) / len(every) - rate) < 0.1, (task, len(kept), len(every))
  assert open(tmp_path / "full/images/data_00199.png", "rb").read() == open(
      tmp_path / "some/images/data_00199.png", "rb").read()


def test_vqvae_training_reduces_the_reconstruction_error():
  """A few steps of the VQ-VAE objective from scratch lower the reconstruction error."""
  logs = []
  vqvae_training.train(steps=20, batch=8, log=logs.append)
  first, last = (float(l.split("reconstruction ")[1].split()[0]) for l in (logs[0], logs[-1]))
  assert last < first, logs


def test_shipped_vae_round_trips_the_shapes_masks():
  """The shipped VQ-VAE's 16 codes give back each shape's box crop (IoU >= 0.95 at 64x64)."""
  params = vqvae.load_vae(demo.SHAPES_VAE)
  objs = [shapes.Obj(s, "red", (0, 0, side, side)) for s in shapes.SHAPES for side in shapes.SIDES]
  assert vqvae_training.round_trip_iou(params, shapes.crop_masks(objs)).min() >= 0.95


@pytest.fixture(scope="module")
def shipped():
  assert demo.shipped(), "checkpoints/shapes/ must hold model.npz, tokenizer.model, vae.npz"
  assert sum(os.path.getsize(os.path.join(demo.SHIPPED, f)) for f in os.listdir(demo.SHIPPED)) < 25e6
  return PaliGemmaPipeline.from_files(demo.SHAPES_MODEL, demo.SHAPES_TOKENIZER,
                                      cache_dtype="float32")


HELD_OUT_SEED = 2027  # scenes drawn with a seed no training or validation set uses


def _held_out(n: int = 8):
  rng = np.random.default_rng(HELD_OUT_SEED)
  scenes = []
  for _ in range(n):
    objs = shapes.random_scene(rng)
    scenes.append((objs, shapes.render(objs, rng)))
  return scenes


def _box_iou(a, b) -> float:
  inter = [max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])]
  i = max(inter[2] - inter[0], 0) * max(inter[3] - inter[1], 0)
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return i / (area(a) + area(b) - i)


def test_shipped_model_on_held_out_scenes(shipped):
  """The shipped model on 8 held-out scenes (seed 2027), every question each scene allows:
  colour answers all exactly right (0.996 on 453 held-out questions, README); captions, counts,
  detection boxes and masks near the levels of its 500-scene evaluation (caption exact match
  0.916, counting 0.996, detect mAP@.5 0.971, segment mIoU 0.936). Measured here: 7 of 8
  captions, 23 of 24 counts, 15 of 15 boxes, mean mask IoU 0.91; one more miss is allowed."""
  images, prompts, want = [], [], []
  for objs, img in _held_out():
    ordered = shapes.left_to_right(objs)
    asks = [("caption en", shapes.caption(objs))]
    asks += [(f"answer en how many {shapes.PLURALS[s]}", str(sum(o.shape == s for o in objs)))
             for s in shapes.SHAPES]
    asks += [(f"answer en what color is the {o.shape}", o.color) for o in objs
             if sum(p.shape == o.shape for p in objs) == 1]
    asks += [("detect " + " ; ".join(o.label for o in ordered), ordered)]
    asks += [(f"segment {o.label}", o) for o in objs]
    for prompt, answer in asks:
      images.append(img)
      prompts.append(prompt)
      want.append(answer)
  got = shipped.generate(images, prompts, max_decode_len=40)
  vae = vqvae.load_vae(demo.SHAPES_VAE)
  right = {"caption": [], "count": [], "color": [], "detect": [], "segment": []}
  for prompt, answer, result in zip(prompts, want, got):
    if prompt == "caption en":
      right["caption"].append(result.text == answer)
    elif prompt.startswith("answer en how many"):
      right["count"].append(result.text == answer)
    elif prompt.startswith("answer"):
      assert result.text == answer, (prompt, result.text)
      right["color"].append(True)
    elif prompt.startswith("detect"):
      found = {o.label: o.box for o in outputs.parse_answer(result.text, (shapes.SIZE,) * 2)[0]}
      right["detect"] += [o.label in found and _box_iou(found[o.label], o.box) >= 0.5
                          for o in answer]
    else:
      parsed = outputs.task_answer(result.text, prompt, (shapes.SIZE, shapes.SIZE), lambda: vae)
      truth = shapes.object_mask(answer)
      mask = parsed.masks[0] if parsed.masks else None
      right["segment"].append(0.0 if mask is None else
                              (mask & truth).sum() / max((mask | truth).sum(), 1))
  levels = {k: float(np.mean(v)) for k, v in right.items()}
  print({k: f"{v:.2f} of {len(right[k])}" for k, v in levels.items()})
  assert len(right["color"]) == 13 and len(right["caption"]) == 8
  assert levels["caption"] >= 0.75 and levels["count"] >= 0.9, levels
  assert levels["detect"] >= 0.9 and levels["segment"] >= 0.85, levels


def test_recipe_trains_a_few_steps_from_scratch(tmp_path):
  """configs/shapes.py as shipped, shortened: fresh data, 2 steps, validation with the
  evaluators; the metrics name every task's score."""
  fields = {"train_data": "shapes:6:5", "val_data": "shapes:4:6", "total_steps": 2,
            "warmup_steps": 1, "batch_size": 4, "ckpt_steps": 2, "eval_steps": 2, "log_steps": 1,
            "data_cache": str(tmp_path / "cache")}
  cmd = [sys.executable, "-m", "paligemma_jax.train", "--config=configs/shapes.py",
         f"--workdir={tmp_path / 'run'}", "--noprogress",
         *[f"--config.{k}={v}" for k, v in fields.items()]]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [1, 2]
  assert {"val_loss", "val_caption_cider", "val_vqa_accuracy", "val_detect_map50",
          "val_segment_miou"} <= set(lines[-1])
  assert os.path.exists(tmp_path / "run" / "final.npz")
