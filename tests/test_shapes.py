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
  assert shapes_recipe.parse("shapes:6000:0") == (6000, 0, 3, shapes.TASKS)
  assert shapes_recipe.parse("shapes:8:4:1:caption,count") == (8, 4, 1, ("caption", "count"))
  for bad in ("shapes:8", "shapes:8:x", "shapes:8:4:1", "shapes:8:4:0:caption",
              "shapes:8:4:1:poem"):
    with pytest.raises(ValueError, match=bad):
      shapes_recipe.parse(bad)
  path = shapes_recipe.prepare("shapes:8:4:1:caption", str(tmp_path), vae_path="/nonexistent")
  assert os.path.basename(os.path.dirname(path)) == "shapes_8_4_1_caption"
  rows = [json.loads(l) for l in open(path)]
  assert len(rows) == 8 and {r["prefix"] for r in rows} == {"caption en"}
  assert all(r["suffix"].count(" a ") == 0 and r["suffix"].startswith("a ") for r in rows)


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


def test_shipped_model_on_held_out_scenes(shipped):
  """A regression guard for the shipped model on 8 held-out scenes (seed 2027), at the
  levels its 500-scene evaluation measured (README): every caption has a caption's form and
  at least half name the scene's colours in left-to-right order; most colour answers are
  right (>= 0.4 of these 13; 0.755 on 453 questions); the segment masks overlap the objects' exact masks
  (mean IoU >= 0.5; 0.71 on 500 scenes). Shapes in
  captions, counts and detection boxes are below the issue's targets and not asserted here."""
  images, prompts, want = [], [], []
  for objs, img in _held_out():
    asks = [("caption en", objs)]
    asks += [(f"answer en what color is the {o.shape}", o.color) for o in objs
             if sum(p.shape == o.shape for p in objs) == 1]
    asks += [(f"segment {o.label}", o) for o in objs]
    for prompt, answer in asks:
      images.append(img)
      prompts.append(prompt)
      want.append(answer)
  got = shipped.generate(images, prompts, max_decode_len=40)
  vae = vqvae.load_vae(demo.SHAPES_VAE)
  captions, colours, ious = [], [], []
  for prompt, answer, result in zip(prompts, want, got):
    if prompt == "caption en":
      words = result.text.split()
      assert words[0] == "a" and all(words[i + 1] in shapes.SHAPES for i, w in
                                     enumerate(words) if w in shapes.COLORS), result.text
      named = [w for w in words if w in shapes.COLORS]
      captions.append(named == [o.color for o in shapes.left_to_right(answer)])
    elif prompt.startswith("answer"):
      colours.append(result.text == answer)
    else:
      parsed = outputs.task_answer(result.text, prompt, (shapes.SIZE, shapes.SIZE), lambda: vae)
      truth = shapes.object_mask(answer)
      mask = parsed.masks[0] if parsed.masks else None
      ious.append(0.0 if mask is None else (mask & truth).sum() / max((mask | truth).sum(), 1))
  print(f"caption colours {np.mean(captions):.2f}, colour answers {np.mean(colours):.2f} of "
        f"{len(colours)}, segment mean IoU {np.mean(ious):.2f}")
  assert np.mean(captions) >= 0.5 and np.mean(colours) >= 0.4 and np.mean(ious) >= 0.5


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
