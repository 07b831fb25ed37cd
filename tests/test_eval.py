"""The evaluators (paligemma_jax/eval) and `python -m paligemma_jax.evaluate`: each metric on a
case worked out by hand, against its library on a random case, the CLI with --predictions (no
model) and with --ckpt (a tiny random model), and its bad inputs."""
import io
import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from paligemma_jax.data.jsonl import Example
from paligemma_jax.eval import evaluators, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loc(*values):
  return "".join(f"<loc{v:04d}>" for v in values)


def seg(codes=(0,) * 16):
  return "".join(f"<seg{c:03d}>" for c in codes)


def _image(path, h=100, w=100, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return str(path)


def _write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def evaluate(*args, cwd=REPO, timeout=300, pre=""):
  """Runs python -m paligemma_jax.evaluate ARGS (pre: Python run first, in the same process)."""
  if pre:
    cmd = [sys.executable, "-c", f"{pre}\nimport runpy, sys\nsys.argv = ['evaluate'] + "
           f"{[str(a) for a in args]!r}\nrunpy.run_module('paligemma_jax.evaluate', "
           "run_name='__main__')"]
  else:
    cmd = [sys.executable, "-m", "paligemma_jax.evaluate", *map(str, args)]
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                        stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------
# Captioning.

def test_caption_tokens_ptb_like():
  assert metrics.caption_tokens("A Dog's T-shirt, don't (3.5) -- OK!") == [
      "a", "dog", "'s", "t-shirt", "do", "n't", "3.5", "ok"]
  assert metrics.caption_tokens("...") == []


def test_cider_by_hand():
  # Two images. df: "a" 2, "cat" 1, "dog" 1, "a cat" 1, "a dog" 1; idf = log(2) - log(df), so
  # "a" weighs 0. An identical candidate has cosine 1 for n=1 and n=2 and no 3- or 4-grams:
  # CIDEr-D = 10 * mean(1, 1, 0, 0) = 5.
  refs = [["a cat"], ["a dog"]]
  assert metrics.cider(refs, ["a cat", "a dog"]) == (pytest.approx(5.0), [
      pytest.approx(5.0), pytest.approx(5.0)])
  # Swapped: only "a" is shared, and it weighs 0.
  score, per = metrics.cider(refs, ["a dog", "A Cat."])
  assert score == pytest.approx(0.0) and per == [pytest.approx(0.0)] * 2
  # Case and punctuation are tokenized away.
  assert metrics.cider(refs, ["A cat.", "a DOG!"])[0] == pytest.approx(5.0)


def test_cider_and_bleu_match_pycocoevalcap():
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  rng = np.random.default_rng(0)
  words = "a the cat dog sits on red blue sofa mat runs beach".split()
  sentence = lambda: " ".join(rng.choice(words, rng.integers(3, 9)))
  refs = [[sentence() for _ in range(rng.integers(1, 4))] for _ in range(12)]
  preds = [sentence() for _ in range(12)]
  gts = {i: r for i, r in enumerate(refs)}
  res = {i: [p] for i, p in enumerate(preds)}
  want, want_per = Cider().compute_score(gts, res)
  got, got_per = metrics.cider(refs, preds)
  assert got == pytest.approx(want) and got_per == pytest.approx(list(want_per))
  with contextlib.redirect_stdout(io.StringIO()):
    want, want_per = Bleu(4).compute_score(gts, res, verbose=0)
  got, got_per = metrics.bleu4(refs, preds)
  assert got == pytest.approx(want[3]) and got_per == pytest.approx(want_per[3])


def test_bleu4_by_hand():
  # 5 words, 4/5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams match; same length: BP 1.
  score, per = metrics.bleu4([["a b c d f"]], ["a b c d e"])
  want = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
  assert score == pytest.approx(want, rel=1e-6) and per == [pytest.approx(want, rel=1e-6)]
  # Shorter than the closest reference: brevity penalty exp(1 - 6/5).
  score, _ = metrics.bleu4([["a b c d e f"]], ["a b c d e"])
  assert score == pytest.approx(math.exp(1 - 6 / 5), rel=1e-6)


def test_caption_exact_match():
  assert metrics.caption_exact_match(["A cat.", "a dog"], "a cat") == 1.0
  assert metrics.caption_exact_match(["a cat"], "a cat sitting") == 0.0


# ---------------------------------------------------------------------------
# VQA.

@pytest.mark.parametrize("answer,normalized", [
    ("Two", "2"), ("The dog.", "dog"), ("yes!", "yes"), ("dont", "don't"), ("1,000", "1000"),
    ("3.5", "3.5"), ("  red\tand blue\n", "red and blue"), ("black-and-white", "black and white"),
    ("a man's hat", "man's hat"), ("none", "0")])
def test_vqa_normalisation(answer, normalized):
  assert metrics.normalize_vqa(answer) == normalized


def test_vqa_accuracy():
  assert metrics.vqa_accuracy(["Two"], "2") == 1.0
  assert metrics.vqa_accuracy(["dog"], "cat") == 0.0
  ten = ["dog"] * 2 + ["cat"] * 8
  assert metrics.vqa_accuracy(ten, "dog") == pytest.approx(2 / 3)
  assert metrics.vqa_accuracy(ten, "A cat") == 1.0
  assert metrics.vqa_accuracy(ten, "bird") == 0.0


def test_anls_by_hand():
  assert metrics.levenshtein("kitten", "sitting") == 3
  assert metrics.levenshtein("", "abc") == 3
  assert metrics.anls(["hello"], "hellp") == pytest.approx(0.8)       # 1 - 1/5
  assert metrics.anls(["ab"], "ax") == 0.0                            # NL = 0.5: not < 0.5
  assert metrics.anls(["abc"], "xyz") == 0.0
  assert metrics.anls(["Hello  World"], "hello world") == 1.0         # case, spaces
  assert metrics.anls(["nope", "hello"], "hellp") == pytest.approx(0.8)  # best reference
  assert metrics.anls([""], "") == 1.0 and metrics.anls([""], "x") == 0.0


# ---------------------------------------------------------------------------
# Detection.

def test_map_by_hand():
  box = (0, 0, 10, 10)
  sizes = [(20, 20), (20, 20)]
  perfect = metrics.coco_map([[("cat", box)], [("cat", box)]],
                             [[("cat", box, 1.0)], [("cat", box, 1.0)]], sizes)
  assert perfect == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
  # One of two objects found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall
  # thresholds (0, 0.01, ..., 0.5), at every IoU threshold.
  one_miss = metrics.coco_map([[("cat", box)], [("cat", box)]], [[("cat", box, 1.0)], []], sizes)
  assert one_miss == {"map": pytest.approx(51 / 101), "map50": pytest.approx(51 / 101)}
  # A box of IoU 0.6 counts at thresholds 0.5, 0.55, 0.6 only: 3 of 10.
  shifted = metrics.coco_map([[("cat", (0, 0, 10, 10))]], [[("cat", (0, 0, 10, 6), 1.0)]],
                             [(20, 20)])
  assert shifted == {"map": pytest.approx(0.3), "map50": pytest.approx(1.0)}
  # The wrong label is no detection; no reference objects: undefined.
  assert metrics.coco_map([[("cat", box)]], [[("dog", box, 1.0)]], [(20, 20)])["map"] == 0.0
  assert metrics.coco_map([[]], [[("dog", box, 1.0)]], [(20, 20)]) == {"map": None,
                                                                         "map50": None}


def test_map_matches_cocoeval():
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  rng = np.random.default_rng(1)
  labels = ["cat", "dog", "car"]

  def box():
    y1, x1 = rng.uniform(0, 60, 2)
    return (y1, x1, y1 + rng.uniform(5, 40), x1 + rng.uniform(5, 40))
  refs = [[(rng.choice(labels), box()) for _ in range(rng.integers(0, 4))] for _ in range(10)]
  preds = [[(l, (b[0] + rng.normal(0, 3), b[1] + rng.normal(0, 3), b[2] + rng.normal(0, 3),
                 b[3] + rng.normal(0, 3)), rng.uniform()) for l, b in objs if rng.uniform() < .8]
           + [(rng.choice(labels), box(), rng.uniform())] for objs in refs]
  sizes = [(100, 100)] * 10
  got = metrics.coco_map(refs, preds, sizes)

  cats = {l: i + 1 for i, l in enumerate(labels)}
  xywh = lambda b: [b[1], b[0], b[3] - b[1], b[2] - b[0]]
  anns = [dict(id=k + 1, image_id=i + 1, category_id=cats[l], bbox=xywh(b),
               area=(b[2] - b[0]) * (b[3] - b[1]), iscrowd=0)
          for k, (i, l, b) in enumerate((i, l, b) for i, o in enumerate(refs) for l, b in o)]
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = dict(images=[dict(id=i + 1, height=100, width=100) for i in range(10)],
                      categories=[dict(id=c, name=l) for l, c in cats.items()], annotations=anns)
    gt.createIndex()
    dt = gt.loadRes([dict(image_id=i + 1, category_id=cats[l], bbox=xywh(b), score=s)
                     for i, o in enumerate(preds) for l, b, s in o])
    ev = COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  assert 0 < got["map"] < 1
  assert got == {"map": pytest.approx(ev.stats[0]), "map50": pytest.approx(ev.stats[1])}


def test_match_at():
  refs = [("cat", (0, 0, 10, 10)), ("dog", (10, 10, 20, 20))]
  got = metrics.match_at(refs, [("cat", (0, 0, 10, 10)), ("cat", (10, 10, 20, 20))])
  assert got["matched"] == 1 and got["precision"] == 0.5 and got["recall"] == 0.5
  assert got["mean_iou"] == pytest.approx(0.5)
  assert metrics.match_at([], [])["f1"] == 1.0


def test_score_detect(tmp_path):
  img = _image(tmp_path / "a.png", 100, 200)
  ex = [Example(img, "detect cat ; dog", loc(0, 0, 511, 511) + " cat ; " +
                loc(511, 511, 1023, 1023) + " dog", 1),
        Example(img, "detect cat", [loc(0, 0, 1023, 1023) + " cat", "ignored"], 2)]
  preds = [loc(0, 0, 511, 511) + " cat", loc(0, 0, 1023, 1023) + " cat"]
  scores, per = evaluators.score("detect", ex, preds)
  # cat: both found (AP 1); dog: missed (AP 0): mean over the two classes.
  assert scores["map"] == pytest.approx(0.5) and scores["map50"] == pytest.approx(0.5)
  assert per[0]["recall"] == 0.5 and per[0]["precision"] == 1.0 and per[1]["f1"] == 1.0
  assert per[0]["ref_objects"][1] == {"label": "dog", "box": pytest.approx(
      [511 / 1023, 511 / 1023, 1.0, 1.0])}


# ---------------------------------------------------------------------------
# Segmentation.

def test_mask_and_box_iou_by_hand():
  a = np.zeros((3, 3), bool)
  a[0, :] = True                       # 3 pixels
  b = np.zeros((3, 3), bool)
  b[:, 0] = True                       # 3 pixels, 1 shared
  assert metrics.mask_iou(a, b) == pytest.approx(1 / 5)
  assert metrics.mask_iou(a, a) == 1.0
  assert metrics.mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
  assert metrics.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
  assert metrics.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


@pytest.fixture(scope="module")
def solid_vae(tmp_path_factory):
  """A VQ-VAE whose decoder draws every code as a full square (output +1 everywhere): a
  predicted mask is its whole box."""
  from paligemma_jax.model import vqvae
  params = vqvae.init_vae_params(0)
  params["decoder.12.weight"][:] = 0
  params["decoder.12.bias"][:] = 1
  path = str(tmp_path_factory.mktemp("vae") / "vae.npz")
  vqvae.save_vae(path, params)
  return path


def _segment_data(folder):
  """3 examples on 100x100 images: the reference is the top half (rows 0-49), as a mask PNG
  (lines 1, 3) or decoded from the suffix box <loc0512> (int(512/1023*100) = 50) with the
  solid VAE (line 2)."""
  half = np.zeros((100, 100), np.uint8)
  half[:50] = 255
  Image.fromarray(half).save(os.path.join(folder, "half.png"))
  rows = []
  for i in range(3):
    _image(os.path.join(folder, f"img/{i}.png"), seed=i)
    row = {"image": f"img/{i}.png", "prefix": "segment cat",
           "suffix": loc(0, 0, 512, 1023) + seg() + " cat"}
    if i != 1:
      row["mask"] = "half.png"
    rows.append(row)
  return _write_jsonl(os.path.join(folder, "seg.jsonl"), rows)


SEGMENT_PREDICTIONS = [
    loc(0, 0, 1023, 1023) + seg() + " cat",  # whole image: mask IoU 0.5, box IoU 0.5005/1 -> hit
    loc(0, 0, 512, 1023) + seg() + " cat",   # exactly the reference: 1, 1
    loc(0, 0, 512, 1023) + " cat"]           # no <seg>: invalid, 0 and 0


def test_score_segment_by_hand(tmp_path, solid_vae):
  examples, masks = evaluators.read_references(_segment_data(str(tmp_path)))
  assert masks[0].endswith("half.png") and masks[1] is None
  scores, per = evaluators.score("segment", examples, SEGMENT_PREDICTIONS, vae=solid_vae,
                                 gt_masks=masks)
  assert [e["iou"] for e in per] == pytest.approx([0.5, 1.0, 0.0])
  assert [e["box_iou"] for e in per] == pytest.approx([512 / 1023, 1.0, 0.0])
  assert [e["boxacc50"] for e in per] == [1.0, 1.0, 0.0]
  assert scores == {"miou": pytest.approx(0.5), "boxacc50": pytest.approx(2 / 3), "invalid": 1}


# ---------------------------------------------------------------------------
# Files and the CLI without a model.

def _caption_files(folder):
  for i in range(3):
    _image(os.path.join(folder, f"img/{i}.png"), 20, 30, seed=i)
  ref = _write_jsonl(os.path.join(folder, "ref.jsonl"), [
      {"image": "img/0.png", "prefix": "caption en", "suffix": ["a cat", "a cat sitting"]},
      {"image": "img/1.png", "prefix": "caption en", "suffix": "a dog"},
      {"image": "img/2.png", "prefix": "caption en", "suffix": "a boat"}])
  os.makedirs(os.path.join(folder, "out"), exist_ok=True)
  # As main.py --images=img/ run from `folder` writes them; the third has an error line.
  pred = _write_jsonl(os.path.join(folder, "out", "pred.jsonl"), [
      {"index": 1, "image": os.path.join(folder, "img/1.png"), "prompt": "caption en",
       "text": "a dog", "tokens": [1]},
      {"index": 0, "image": "../img/0.png", "prompt": "caption en", "text": "A cat."},
      {"index": 2, "image": "img/2.png", "prompt": "caption en", "error": "could not read"},
      {"index": 3, "image": "img/0.png", "prompt": "other prompt", "text": "x"}])
  return ref, pred


def test_read_predictions_matching(tmp_path):
  ref, pred = _caption_files(str(tmp_path))
  examples, _ = evaluators.read_references(ref)
  m = evaluators.read_predictions(pred, examples, ref)
  assert m.predictions == ["A cat.", "a dog", ""]
  assert [(x["line"], x["reason"]) for x in m.missing] == [(3, "error: could not read")]
  assert m.unmatched == 1


def test_cli_predictions_caption(tmp_path):
  ref, pred = _caption_files(str(tmp_path))
  out = tmp_path / "res" / "eval.json"
  r = evaluate("--task=caption", f"--data={ref}", f"--predictions={pred}", f"--output_json={out}")
  assert r.returncode == 0, r.stderr
  got = json.loads(out.read_text())
  for key in ("task", "num_examples", "missing_predictions", "cider", "bleu4", "exact_match"):
    assert key in got
  assert got["task"] == "caption" and got["num_examples"] == 3 and "perplexity" not in got
  assert got["missing_predictions"] == 1 and got["missing_examples"][0]["line"] == 3
  assert got["exact_match"] == pytest.approx(2 / 3)
  assert "1 of 3 examples have no prediction" in r.stderr and "line 3" in r.stderr
  per = [json.loads(l) for l in (tmp_path / "res" / "eval.examples.jsonl").read_text().splitlines()]
  assert [p["prediction"] for p in per] == ["A cat.", "a dog", ""]
  assert per[0]["references"] == ["a cat", "a cat sitting"] and per[2]["missing"] is True
  assert set(per[0]) >= {"cider", "bleu4", "exact_match"}


def test_cli_predictions_vqa_and_detect(tmp_path):
  img = _image(str(tmp_path / "a.png"), 60, 80)
  ref = _write_jsonl(tmp_path / "vqa.jsonl", [
      {"image": "a.png", "prefix": "answer en how many?", "suffix": "two"},
      {"image": "a.png", "prefix": "answer en color?", "suffix": ["red"] * 3 + ["blue"]}])
  pred = _write_jsonl(tmp_path / "vqa_pred.jsonl", [
      {"image": img, "prompt": "answer en how many?", "text": "2"},
      {"image": img, "prompt": "answer en color?", "text": "blue"}])
  r = evaluate("--task=vqa", f"--data={ref}", f"--predictions={pred}",
               f"--output_json={tmp_path / 'vqa.json'}")
  assert r.returncode == 0, r.stderr
  got = json.loads((tmp_path / "vqa.json").read_text())
  assert got["accuracy"] == pytest.approx((1 + 1 / 3) / 2)
  assert got["anls"] == pytest.approx((0.0 + 1.0) / 2)  # "two" vs "2": NL 1

  ref = _write_jsonl(tmp_path / "det.jsonl", [
      {"image": "a.png", "prefix": "detect cat ; dog",
       "suffix": loc(0, 0, 500, 500) + " cat ; " + loc(500, 500, 1000, 1000) + " dog"},
      {"image": "a.png", "prefix": "detect cat", "suffix": loc(100, 100, 900, 900) + " cat"}])
  pred = _write_jsonl(tmp_path / "det_pred.jsonl", [
      {"image": "a.png", "prompt": "detect cat ; dog", "text": loc(0, 0, 500, 500) + " cat"}])
  out_dir = tmp_path / "pictures"
  r = evaluate("--task=detect", f"--data={ref}", f"--predictions={pred}",
               f"--output_json={tmp_path / 'det.json'}", f"--output_dir={out_dir}")
  assert r.returncode == 0, r.stderr
  got = json.loads((tmp_path / "det.json").read_text())
  # cat: 1 of 2 found, first in order (AP 51/101); dog: none (0).
  assert got["map50"] == pytest.approx(51 / 101 / 2) and got["missing_predictions"] == 1
  with Image.open(out_dir / "det.worst.png") as im:
    assert im.width >= 600 and im.height >= 300
  assert got["worst_png"] == str(out_dir / "det.worst.png")


def test_cli_predictions_segment(tmp_path, solid_vae):
  ref = _segment_data(str(tmp_path))
  pred = _write_jsonl(tmp_path / "pred.jsonl", [
      {"image": f"img/{i}.png", "prompt": "segment cat", "text": t}
      for i, t in enumerate(SEGMENT_PREDICTIONS)])
  r = evaluate("--task=segment", f"--data={ref}", f"--predictions={pred}",
               f"--vae_ckpt={solid_vae}", f"--output_json={tmp_path / 'seg.json'}")
  assert r.returncode == 0, r.stderr
  got = json.loads((tmp_path / "seg.json").read_text())
  assert got["miou"] == pytest.approx(0.5) and got["boxacc50"] == pytest.approx(2 / 3)
  assert (tmp_path / "seg.worst.png").is_file()


@pytest.mark.parametrize("case", ["no_suffix", "pred_not_json", "unknown_task", "both_sources",
                                  "bad_ref_box", "segment_without_vae", "bad_flag"])
def test_cli_bad_input(tmp_path, case):
  ref, pred = _caption_files(str(tmp_path))
  task = "caption"
  extra = []
  if case == "no_suffix":
    ref = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "img/0.png", "prefix": "caption en"}])
  elif case == "pred_not_json":
    pred = _write_jsonl(tmp_path / "bad_pred.jsonl", ["{not json"])
  elif case == "unknown_task":
    task = "translate"
  elif case == "both_sources":
    extra = ["--ckpt=x.npz", "--tokenizer=t.model"]
  elif case == "bad_ref_box":
    task = "detect"
    ref = _write_jsonl(tmp_path / "bad.jsonl", [
        {"image": "img/0.png", "prefix": "detect cat", "suffix": loc(5, 5, 1, 1) + " cat"}])
  elif case == "segment_without_vae":
    task = "segment"
  elif case == "bad_flag":
    extra = ["--batch_size=many"]
  r = evaluate(f"--task={task}", f"--data={ref}", f"--predictions={pred}",
               f"--output_json={tmp_path / 'o.json'}", *extra)
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "o.json").exists()
  if case == "no_suffix":
    assert "bad.jsonl:1" in lines[0] and "suffix" in lines[0]
  if case == "pred_not_json":
    assert "bad_pred.jsonl:1" in lines[0] and "not JSON" in lines[0]


def test_cli_without_pycocoevalcap(tmp_path):
  ref, pred = _caption_files(str(tmp_path))
  r = evaluate("--task=caption", f"--data={ref}", f"--predictions={pred}",
               f"--output_json={tmp_path / 'o.json'}",
               pre="import sys; sys.modules['pycocoevalcap'] = None")
  assert r.returncode == 2 and "pip install -e '.[eval]'" in r.stderr, r.stderr
  assert r.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# With a model: --ckpt decodes as main.py does, and scores perplexity.

def test_cli_with_model(tmp_path, tokenizer):
  from tests import train_fixtures
  from paligemma_jax import jobs
  from paligemma_jax.pipeline import PaliGemmaPipeline
  ckpt = train_fixtures.write_init(str(tmp_path))
  data = train_fixtures.write_data(str(tmp_path), 3)
  out = tmp_path / "eval.json"
  r = evaluate("--task=caption", f"--data={data}", f"--ckpt={ckpt}",
               f"--tokenizer={tokenizer.path}", "--max_decode_len=5", "--batch_size=2",
               f"--output_json={out}", "--noprogress")
  assert r.returncode == 0, r.stderr
  got = json.loads(out.read_text())
  assert math.isfinite(got["perplexity"]) and got["perplexity"] > 1
  assert got["missing_predictions"] == 0
  per = [json.loads(l) for l in (tmp_path / "eval.examples.jsonl").read_text().splitlines()]

  # The same greedy answers as main.py (its defaults: float32, bfloat16 cache), one image at
  # a time, through main.py's batch job, whose output then scores the same with --predictions.
  pipe = PaliGemmaPipeline.from_files(ckpt, tokenizer.path)
  examples, _ = evaluators.read_references(data)
  pred = tmp_path / "pred.jsonl"
  jobs.run_job(lambda: pipe, data, "caption en", str(pred), batch_size=1, max_decode_len=5,
               progress=False, log=lambda msg: None)
  job_texts = [json.loads(l)["text"] for l in pred.read_text().splitlines()]
  assert [p["prediction"] for p in per] == job_texts
  assert evaluators.predict(pipe, examples, batch_size=1, max_decode_len=5) == job_texts
  r = evaluate("--task=caption", f"--data={data}", f"--predictions={pred}",
               f"--output_json={tmp_path / 'again.json'}")
  assert r.returncode == 0, r.stderr
  again = json.loads((tmp_path / "again.json").read_text())
  assert again["cider"] == pytest.approx(got["cider"]) and again["missing_predictions"] == 0

  # Perplexity: each example's NLL from pipe.logits, by hand, in big_vision's token layout.
  import jax
  from paligemma_jax.data import image as image_lib
  text_len = evaluators.text_len_for(tokenizer, examples)
  rows = [tokenizer.training_example(ex.prefix, ex.suffix, text_len) for ex in examples]
  assert not any(cut for *_, cut in rows)
  tokens, mask_ar, mask_loss = (np.stack(a) for a in list(zip(*rows))[:3])
  pixels = np.stack([image_lib.preprocess(image_lib.load_image(ex.image), pipe.config.image_size)
                     for ex in examples])
  logits = np.asarray(jax.jit(pipe.logits)(pixels, tokens[:, :-1], mask_ar[:, :-1]), np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * mask_loss[:, 1:]
  assert [p["nll"] for p in per] == pytest.approx(nll.sum(1) / mask_loss[:, 1:].sum(1), rel=1e-4)
  assert got["perplexity"] == pytest.approx(math.exp(nll.sum() / mask_loss[:, 1:].sum()),
                                            rel=1e-4)
