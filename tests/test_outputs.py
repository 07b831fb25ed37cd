"""Parsing of detect/segment answers, mask pasting, and the written pictures."""

import json
import os
import types

import numpy as np
import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paligemma_jax.answers import outputs
from paligemma_jax.model import vqvae

SEGS = "".join(f"<seg{i:03d}>" for i in range(0, 160, 10))  # 16 codes, 0..150
SEGS_OK = "".join(f"<seg{i:03d}>" for i in range(16))
BOX = "<loc0100><loc0200><loc0300><loc0400>"



def _write(text, prompt, image, folder, vae=None):
  """Parse once, then draw: what main.py, jobs and the prompt loop do."""
  answer = outputs.task_answer(text, prompt, (image.height, image.width), vae)
  return outputs.write_task_outputs(answer, image, folder)

def _locs(*v):
  return "".join(f"<loc{x:04d}>" for x in v)


# --- parsing -----------------------------------------------------------------

# (answer, labels of the whole objects, reasons of the skipped parts)
CASES = {
    "one": (BOX + " cat", ["cat"], []),
    "several, spaces, repeats": (
        BOX + " cat ; " + _locs(1, 2, 3, 4) + " big red dog ; " + BOX + " cat",
        ["cat", "big red dog", "cat"], []),
    "segment": (BOX + SEGS_OK + " cat ; " + BOX + SEGS_OK + " dog",
                ["cat", "dog"], []),
    "no label (refcoco style)": (BOX + SEGS_OK, [""], []),
    "missing locs": ("cat ; " + BOX + " dog", ["dog"], ["no <locNNNN> box"]),
    "3 locs": (_locs(1, 2, 3) + " cat ; " + BOX + " dog", ["dog"],
               ["expected 4 <locNNNN> tokens, found 3"]),
    "15 segs": (BOX + SEGS_OK[:-8] + " cat", [],
                ["expected 16 <segNNN> tokens, found 15"]),
    "17 segs": (BOX + SEGS_OK + "<seg001> cat", [],
                ["expected 16 <segNNN> tokens, found 17"]),
    "inverted y": (_locs(300, 100, 200, 400) + " cat", [], ["inverted box"]),
    "inverted x": (_locs(100, 400, 300, 200) + " cat", [], ["inverted box"]),
    "empty box": (_locs(100, 100, 100, 400) + " cat", [], ["empty box"]),
    "stray text": ("hello " + BOX + " cat", ["cat"], ["no <locNNNN> box"]),
    "seg after label": (BOX + " cat <seg001>", [],
                        ["unexpected <seg> token after the label"]),
    "loc out of range": (_locs(100, 200, 1500, 400) + " cat", [],
                         ["<loc> value 1500 is above 1023"]),
    "seg out of range": (BOX + SEGS + " cat", [], ["<seg> value 150 is above 127"]),
    "truncated mid token": (BOX + " cat ; <loc0001><loc00", ["cat"],
                            ["expected 4 <locNNNN> tokens, found 1"]),
    "truncated before segs": (BOX + SEGS_OK[:32], [],
                              ["expected 16 <segNNN> tokens, found 4"]),
    "missing separator": (BOX + " cat " + BOX + " dog", ["cat", "dog"], []),
    "8 locs": (_locs(1, 2, 3, 4, 5, 6, 7, 8) + " cat", ["", "cat"], []),
    "blank parts": (" ; " + BOX + " cat ;; ", ["cat"], []),
    "empty": ("", [], []),
    "plain caption": ("a cat on a mat", [], ["no <locNNNN> box"]),
}


@pytest.mark.parametrize("name", CASES)
def test_parse_cases(name):
  text, labels, reasons = CASES[name]
  objects, skipped = outputs.parse_answer(text, (480, 640))
  assert [o.label for o in objects] == labels
  assert len(skipped) == len(reasons)
  for s, reason in zip(skipped, reasons):
    assert s.reason.startswith(reason), s
    assert s.text and s.text in text


def test_parse_values():
  objects, _ = outputs.parse_answer(
      _locs(123, 45, 678, 999) + SEGS_OK + " cat ; " + _locs(0, 0, 1023, 1023)
      + " all", (480, 640))
  cat, whole = objects
  assert cat.box_normalized == (123 / 1023, 45 / 1023, 678 / 1023, 999 / 1023)
  assert cat.box == (123 / 1023 * 480, 45 / 1023 * 640, 678 / 1023 * 480,
                     999 / 1023 * 640)
  assert cat.seg_codes == tuple(range(16))
  assert whole.box == (0.0, 0.0, 480.0, 640.0)  # /1023: 1023 is the full side
  assert whole.seg_codes is None
  skipped = outputs.parse_answer("x" + BOX, (10, 10))[1][0]
  assert skipped == outputs.Skipped(text="x", reason="no <locNNNN> box")


def test_task_of():
  assert outputs.task_of("detect cat ; dog") == "detect"
  assert outputs.task_of("segment cat\n") == "segment"
  assert outputs.task_of("  Detect cat") == "detect"
  assert outputs.task_of("<image><bos>segment the cat") == "segment"
  assert outputs.task_of("caption en") is None
  assert outputs.task_of("detection is hard") is None
  assert outputs.task_of("") is None


_FRAGMENTS = st.one_of(
    st.integers(0, 1100).map(lambda v: f"<loc{v:04d}>"),
    st.integers(0, 140).map(lambda v: f"<seg{v:03d}>"),
    st.sampled_from([" ; ", ";", " cat", " big dog", "<", ">", "<loc", "<seg0",
                     "\n", "<eos>", " "]),
    st.text(max_size=5),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(_FRAGMENTS, max_size=60), st.integers(1, 4000),
       st.integers(1, 4000))
def test_parse_never_raises_and_boxes_lie_inside(fragments, h, w):
  objects, skipped = outputs.parse_answer("".join(fragments), (h, w))
  for o in objects:
    y1, x1, y2, x2 = o.box
    assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
    assert all(0 <= v <= 1 for v in o.box_normalized)
    assert o.seg_codes is None or (
        len(o.seg_codes) == 16 and all(0 <= c <= 127 for c in o.seg_codes))
    assert ";" not in o.label
  assert all(s.reason and s.text for s in skipped)


_OBJECT = st.tuples(
    st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True),
    st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True),
    st.one_of(st.none(), st.lists(st.integers(0, 127), min_size=16, max_size=16)),
    st.lists(st.sampled_from(["cat", "dog", "big", "traffic light", "x"]),
             min_size=1, max_size=3).map(" ".join),
)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(_OBJECT, max_size=6))
def test_well_formed_answers_parse_back(objs):
  parts = []
  for ys, xs, segs, label in objs:
    segs_text = "".join(f"<seg{c:03d}>" for c in segs or [])
    parts.append(_locs(min(ys), min(xs), max(ys), max(xs)) + segs_text + " " + label)
  objects, skipped = outputs.parse_answer(" ; ".join(parts), (1023, 2046))
  assert skipped == []
  assert [(o.label, o.box, o.seg_codes) for o in objects] == [
      (label, (min(ys), 2 * min(xs), max(ys), 2 * max(xs)),
       tuple(segs) if segs else None) for ys, xs, segs, label in objs]


# --- paste ---------------------------------------------------------------------


def test_paste_lands_in_the_box():
  mask64 = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0) * np.ones((64, 1))
  # Box from tokens on a 50x200 image: 205/1023*50 = 10.02 -> 10 (int()),
  # 860/1023*50 = 42.03 -> 42, x: 102/1023*200 = 19.94 -> 19, 757 -> 147.99 -> 147.
  (obj,), _ = outputs.parse_answer(_locs(205, 102, 860, 757) + " a", (50, 200))
  assert outputs.box_pixels(obj.box) == (10, 19, 42, 147)
  full = outputs.paste_mask(mask64, obj.box, (50, 200))
  want = np.zeros((50, 200), bool)
  # 64 -> 128 columns, bilinear: the +1/-1 step falls between columns 63 and 64.
  want[10:42, 19:19 + 64] = True
  np.testing.assert_array_equal(full, want)


def test_paste_downscales_and_handles_degenerate_boxes():
  yy, xx = np.mgrid[0:64, 0:64]
  mask64 = np.where((yy >= 16) & (yy < 48) & (xx >= 16) & (xx < 48), 1.0, -1.0)
  full = outputs.paste_mask(mask64, (4.0, 8.0, 36.0, 40.0), (40, 50))
  want = np.zeros((40, 50), bool)
  want[4 + 8:4 + 24, 8 + 8:8 + 24] = True  # 64 -> 32: the square halves
  np.testing.assert_array_equal(full, want)
  assert not outputs.paste_mask(mask64, (3.2, 5.0, 3.9, 9.0), (40, 50)).any()


# --- written outputs -------------------------------------------------------------

GREY = (128, 128, 128)


def _grey(w, h):
  return PIL.Image.new("RGB", (w, h), GREY)


def test_detect_outputs(tmp_path):
  w, h = 160, 120
  text = (_locs(0, 0, 1023, 1023) + " whole ; " + _locs(512, 256, 1023, 767)
          + " box two ; <loc0001> junk")
  res = _write(text, "detect whole ; box two", _grey(w, h), str(tmp_path))
  with open(tmp_path / "objects.json") as f:
    written = json.load(f)
  assert set(written) == {"task", "objects", "skipped"}
  assert res == {**written, "annotated_png": str(tmp_path / "annotated.png")}
  assert written["task"] == "detect"
  assert [set(o) for o in written["objects"]] == [
      {"label", "box", "box_normalized"}] * 2
  two = written["objects"][1]
  assert two["label"] == "box two"
  assert two["box"] == [512 / 1023 * h, 256 / 1023 * w, h, 767 / 1023 * w]
  assert two["box_normalized"] == [512 / 1023, 256 / 1023, 1.0, 767 / 1023]
  assert written["skipped"] == [
      {"text": "<loc0001> junk", "reason": "expected 4 <locNNNN> tokens, found 1"}]

  img = np.asarray(PIL.Image.open(res["annotated_png"]))
  assert img.shape == (h, w, 3)
  c0, c1 = outputs.PALETTE[0], outputs.PALETTE[1]
  # Box two: pixels [60, 120) x [40, 119); the outline is 2 px inside it.
  y1, x1, y2, x2 = outputs.box_pixels(two["box"])
  assert (y1, x1, y2, x2) == (60, 40, 120, 119)
  assert (img[y2 - 1, x1 + 5:x2 - 5] == c1).all()  # bottom edge
  assert (img[y2 - 2, x1 + 5:x2 - 5] == c1).all()
  assert (img[y1 + 10:y2 - 10, x2 - 1] == c1).all()  # right edge
  assert (img[y1 + 10:y2 - 10, x2 - 2] == c1).all()
  assert (img[y1 + 10:y2 - 10, x2 - 3] == GREY).all()  # inside: not filled
  assert (img[y1 + 10:y2 - 10, x2] == GREY).all()  # just outside
  # The whole-image box runs along the border.
  assert (img[h - 1, 5:x1] == c0).all() and (img[20:h - 5, 0] == c0).all()
  # Labels sit on boxes filled with their colour, in contrasting text.
  label = img[y1 - 10:y1, x1:x1 + 30].reshape(-1, 3).astype(int)
  assert (label == c1).all(axis=1).mean() > 0.3
  text_like = np.abs(label - outputs._text_colour(c1)).max(axis=1) < 40
  assert text_like.sum() >= 10  # antialiased glyphs in white on the purple


def _constant_vae(value):
  """A VAE whose decoder outputs `value` everywhere (last conv: zero weights)."""
  params = vqvae.init_vae_params(0)
  params["decoder.12.weight"] = np.zeros_like(params["decoder.12.weight"])
  params["decoder.12.bias"] = np.full((1,), value, np.float32)
  return params


def test_segment_outputs(tmp_path):
  w, h = 100, 80
  text = (_locs(256, 512, 767, 1023) + SEGS_OK + " cat ; "
          + _locs(0, 0, 100, 100) + " no mask")
  image = _grey(w, h)
  res = _write(text, "segment cat", image, str(tmp_path), _constant_vae(1.0))
  assert "warning" not in res and res["task"] == "segment"
  cat, plain = res["objects"]
  assert set(cat) == {"label", "box", "box_normalized", "seg_codes", "mask_png"}
  assert set(plain) == {"label", "box", "box_normalized"}
  mask = np.asarray(PIL.Image.open(cat["mask_png"]))
  assert mask.shape == (h, w)
  y1, x1, y2, x2 = outputs.box_pixels(cat["box"])
  want = np.zeros((h, w), np.uint8)
  want[y1:y2, x1:x2] = 255
  np.testing.assert_array_equal(mask, want)
  img = np.asarray(PIL.Image.open(res["annotated_png"])).astype(int)
  tint = np.round((1 - outputs.MASK_ALPHA) * np.array(GREY)
                  + outputs.MASK_ALPHA * np.array(outputs.PALETTE[0]))
  assert (img[(y1 + y2) // 2, x1 + 10] == tint).all()  # translucent mask
  assert (img[h - 5, 20] == GREY).all()


def test_segment_without_vae_writes_boxes_and_says_why(tmp_path):
  res = _write(BOX + SEGS_OK + " cat", "segment cat", _grey(64, 48), str(tmp_path))
  assert "--vae_ckpt" in res["warning"]
  assert [set(o) for o in res["objects"]] == [{"label", "box", "box_normalized", "seg_codes"}]
  assert os.path.exists(res["annotated_png"])
  assert not [p for p in os.listdir(tmp_path) if p.startswith("mask_")]


def test_masks_from_decoder_are_batched(tmp_path):
  """Several segments go through one decode; a negative decoder masks nothing."""
  text = " ; ".join([BOX + SEGS_OK + " a", _locs(0, 0, 500, 500) + SEGS_OK + " b"])
  res = _write(text, "segment a ; b", _grey(50, 40), str(tmp_path), _constant_vae(-1.0))
  for o in res["objects"]:
    assert not np.asarray(PIL.Image.open(o["mask_png"])).any()


# ---------------------------------------------------------------------------
# One parse per answer; its JSON fields; COCO RLE from pycocotools.

SEG = "<loc0100><loc0100><loc0900><loc0900>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " dog"
MASK64 = np.where(np.arange(64)[:, None] < np.arange(64)[None, :], 1.0, -1.0).astype(np.float32)


def test_rle_is_cocos():
  from pycocotools import mask as coco_mask
  rng = np.random.default_rng(0)
  for m in [rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)]:
    rle = outputs.rle_encode(m)
    assert rle["size"] == list(m.shape) and isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON as it is
    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    np.testing.assert_array_equal(coco_mask.decode(coco), m.astype(np.uint8))
    assert coco_mask.area(coco) == m.sum()
    np.testing.assert_array_equal(outputs.rle_decode(rle), m)
  # Hand-counted column-major runs: 0 zeros, 2 ones, 1 zero, 1 one, compressed by COCO.
  hand = coco_mask.frPyObjects({"size": [2, 2], "counts": [0, 2, 1, 1]}, 2, 2)
  assert outputs.rle_encode(np.array([[1, 0], [1, 1]], bool))["counts"] == hand["counts"].decode()


def test_task_answer_boxes_masks_and_fields(monkeypatch):
  assert outputs.task_answer("a cat", "caption en", (100, 200)) is None
  det = outputs.task_answer("<loc0000><loc0000><loc0511><loc1023> cat ; junk", "detect cat",
                            (100, 200))
  [obj] = outputs.answer_fields(det)["objects"]
  assert obj["label"] == "cat" and obj["box"] == pytest.approx([0, 0, 511 / 1023 * 100, 200])
  assert "mask_rle" not in obj and outputs.answer_fields(det)["skipped"][0]["text"] == "junk"
  no_vae = outputs.answer_fields(outputs.task_answer(SEG, "segment dog", (64, 48)))
  assert no_vae["objects"][0]["seg_codes"] == list(range(16)) and "warning" in no_vae
  calls = []
  monkeypatch.setattr(vqvae, "decode_masks", lambda params, codes: (
      calls.append((params, np.asarray(codes).tolist())), np.stack([MASK64] * len(codes)))[1])
  [obj] = outputs.answer_fields(outputs.task_answer(SEG, "segment dog", (64, 48),
                                                    lambda: "VAE"))["objects"]
  assert calls == [("VAE", [list(range(16))])]
  objects, _ = outputs.parse_answer(SEG, (64, 48))
  expected = outputs.paste_mask(MASK64, objects[0].box, (64, 48))
  assert 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(outputs.rle_decode(obj["mask_rle"]), expected)


def test_a_job_parses_and_decodes_each_answer_once(monkeypatch, tmp_path):
  """The JSONL fields and the pictures of one answer come from one parse and one decode."""
  from paligemma_jax import jobs
  parses, decodes = [], []
  parse = outputs.parse_answer
  monkeypatch.setattr(outputs, "parse_answer", lambda *a: (parses.append(1), parse(*a))[1])
  monkeypatch.setattr(vqvae, "decode_masks", lambda params, codes: (
      decodes.append(1), np.stack([MASK64] * len(codes)))[1])
  item = jobs.Item(index=0, image="x.png", path="x.png", prompt="segment dog")
  picture = PIL.Image.new("RGB", (48, 64))
  d = jobs.Decoded(item=item, pixels=None, hw=(64, 48), picture=picture, error=None)
  r = types.SimpleNamespace(text=SEG, tokens=[1, 2])
  rec = jobs._result_record(d, r, str(tmp_path), lambda: "VAE")
  assert len(parses) == 1 and len(decodes) == 1
  assert "mask_rle" in rec["objects"][0] and os.path.exists(rec["objects"][0]["mask_png"])
