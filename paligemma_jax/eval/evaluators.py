"""big_vision's PaliGemma evaluators (plus detection mAP) on the trainer's JSONL examples.

    examples = jsonl.read_examples("val.jsonl", suffix_lists=True)
    answers = predict(pipe, examples, batch_size=8, max_decode_len=32)
    metrics, per_example = score("caption", examples, answers)
    ppl, nll = perplexity(pipe, examples)

Examples are `jsonl.Example`s: image (path), prefix, suffix (a string, or a list of strings:
several references). Predictions are strings aligned with the examples ("" for a missing one,
which then scores as a wrong answer).

Tasks and metrics (`score`):
  caption  cider (CIDEr-D), bleu4, exact_match           all references of an example
  vqa      accuracy (VQAv2 normalisation), anls           all references
  detect   map (COCO AP@[.5:.95]), map50                  the first reference
  segment  miou, boxacc50 (first predicted object)       the first reference, or a mask PNG
"""
import collections
import contextlib
import dataclasses
import json
import os
import sys
import weakref
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from paligemma_jax.answers import outputs
from paligemma_jax.data import image as image_lib
from paligemma_jax.data.jsonl import DataError, Example, json_lines, read_examples
from paligemma_jax.eval import metrics

TASKS = ("caption", "vqa", "detect", "segment")
MAIN_METRIC = {"caption": "cider", "vqa": "accuracy", "detect": "map", "segment": "miou"}
MASK_CHUNK = 64  # segment examples whose masks are decoded and scored together


def task_of(prefix: str) -> Optional[str]:
  """The evaluator for a prompt: caption/describe -> caption, answer/question -> vqa,
  detect -> detect, segment -> segment; None for others (e.g. ocr)."""
  word = prefix.split(" ", 1)[0]
  return {"caption": "caption", "describe": "caption", "answer": "vqa", "question": "vqa",
          "detect": "detect", "segment": "segment"}.get(word)


def check_task(task: str):
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def references(example: Example) -> list:
  """An example's reference answers: [suffix], or the suffix list as it is."""
  return list(example.suffix) if isinstance(example.suffix, list) else [example.suffix]


def image_hw(path: str) -> tuple:
  """(h, w) of an image file as `image.load_image` decodes it (EXIF rotation included), from
  its header. Raises image.ImageError."""
  try:
    with Image.open(path) as img:
      w, h = img.size
      orientation = img.getexif().get(0x0112, 1)
  except FileNotFoundError:
    raise image_lib.ImageError(f"{path}: no such image file") from None
  except (UnidentifiedImageError, OSError) as e:
    raise image_lib.ImageError(f"{path}: cannot read the image ({e})") from None
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# ---------------------------------------------------------------------------
# Files: references (the trainer's JSONL) and predictions (main.py --images output).

def read_references(path: str) -> tuple:
  """The trainer's JSONL as references -> (examples, gt_masks).

  Lines `{"image", "prefix", "suffix": str or [str, ...]}` (`jsonl.read_examples` with
  suffix lists), optionally `"mask": "path.png"` (relative to the JSONL: the ground-truth mask
  of a segment example, a binary PNG at image size). gt_masks: per example the resolved PNG
  path or None. Raises DataError naming the file and line.
  """
  rows = []
  examples = read_examples(path, suffix_lists=True, rows=rows)
  base = os.path.dirname(os.path.abspath(path))
  gt_masks = []
  for ex, row in zip(examples, rows):
    mask = row.get("mask")
    if mask is not None and not (isinstance(mask, str) and mask):
      raise DataError(f"{path}:{ex.line}: field 'mask' must be a PNG path, got "
                      f"{json.dumps(mask)[:60]}")
    gt_masks.append(os.path.normpath(os.path.join(base, mask)) if mask else None)
  return examples, gt_masks


@dataclasses.dataclass
class Matched:
  """Predictions read from a file, aligned with the references."""
  predictions: list  # str per example; "" where missing
  missing: list      # per missing example {"index", "line", "image", "prefix", "reason"}
  unmatched: int     # prediction lines that belong to no reference line


def read_predictions(path: str, examples: Sequence[Example], data_path: str) -> Matched:
  """Predictions as `main.py --images=... --output_jsonl=PRED` writes them, matched to the
  examples of `data_path` on the image file (os.path.realpath) and prompt == prefix.

  Each line: {"image", "prompt", "text"} or {"image", "prompt", "error"}. A relative image is
  tried relative to the references' folder (main.py given the references JSONL as --images
  writes the image as that file names it), then the predictions' folder, then the current
  directory. Repeated (image, prefix) pairs match in order. An example without a prediction,
  or whose line is an error, gets "" (a wrong answer) and is listed in `missing`.
  Raises DataError for a line that is not such a JSON object.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such predictions file")
  waiting = collections.defaultdict(collections.deque)  # (realpath, prefix) -> example indices
  for i, ex in enumerate(examples):
    waiting[(os.path.realpath(ex.image), ex.prefix)].append(i)
  roots = [os.path.dirname(os.path.abspath(data_path)), os.path.dirname(os.path.abspath(path)),
           os.getcwd()]
  found, errors, unmatched = {}, {}, 0
  for _, where, rec in json_lines(path):
    if not (isinstance(rec, dict) and isinstance(rec.get("image"), str)
            and isinstance(rec.get("prompt"), str)
            and (isinstance(rec.get("text"), str) or "error" in rec)):
      raise DataError(f'{where}: expected a prediction line {{"image", "prompt", "text" or '
                      f'"error"}} as main.py --output_jsonl writes, got {json.dumps(rec)[:80]}')
    image = os.path.expanduser(rec["image"])
    candidates = [image] if os.path.isabs(image) else [os.path.join(r, image) for r in roots]
    for candidate in candidates:
      queue = waiting.get((os.path.realpath(candidate), rec["prompt"]))
      if queue:
        i = queue.popleft()
        if isinstance(rec.get("text"), str):
          found[i] = rec["text"]
        else:
          errors[i] = str(rec["error"])
        break
    else:
      unmatched += 1
  missing = []
  for i, ex in enumerate(examples):
    if i not in found:
      reason = f"error: {errors[i]}" if i in errors else "no prediction line"
      missing.append(dict(index=i, line=ex.line, image=ex.image, prefix=ex.prefix, reason=reason))
  return Matched([found.get(i, "") for i in range(len(examples))], missing, unmatched)


# ---------------------------------------------------------------------------
# Detect and segment answers.

def _first_reference(ex: Example) -> str:
  return references(ex)[0]


def check_references(task: str, examples: Sequence[Example], gt_masks=None, path: str = ""):
  """Refuses (DataError) references `score` cannot use, before any model loads: a detect or
  segment reference with a malformed object, a segment reference with neither a mask PNG nor
  a first object with 16 <seg> tokens, an unreadable image or mask file."""
  check_task(task)
  if task not in ("detect", "segment"):
    return
  for i, ex in enumerate(examples):
    where = f"{path}:{ex.line}" if path else f"example {i} (line {ex.line})"
    try:
      hw = image_hw(ex.image)
    except image_lib.ImageError as e:
      raise DataError(f"{where}: {e}") from None
    objects, skipped = outputs.parse_answer(_first_reference(ex), hw)
    if skipped:
      raise DataError(f"{where}: the reference suffix has a malformed object "
                      f"{skipped[0].text!r} ({skipped[0].reason})")
    if task == "segment":
      mask = gt_masks[i] if gt_masks else None
      if mask is None and not (objects and objects[0].seg_codes):
        raise DataError(f"{where}: a segment reference needs 4 <loc> + 16 <seg> tokens in its "
                        "suffix, or a \"mask\" PNG")
      if mask is not None:
        _load_mask(mask, hw, where)


def _load_mask(path: str, hw: tuple, where: str) -> np.ndarray:
  """A ground-truth mask PNG -> (h, w) bool (nonzero = object), checked against the image."""
  try:
    with Image.open(path) as img:
      mask = np.asarray(ImageOps.exif_transpose(img).convert("L")) > 0
  except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
    raise DataError(f"{where}: mask {path} cannot be read ({e})") from None
  if mask.shape != tuple(hw):
    raise DataError(f"{where}: mask {path} is {mask.shape[1]}x{mask.shape[0]} but the image "
                    f"is {hw[1]}x{hw[0]}; the mask must have the image's size")
  return mask


def detect_objects(text: str, hw: tuple) -> tuple:
  """A detect answer -> ([(label, box (y1, x1, y2, x2) in pixels of hw)], skipped count)."""
  objects, skipped = outputs.parse_answer(text, hw)
  return [(o.label, o.box) for o in objects], len(skipped)


def _vae_params(vae):
  if vae is None:
    raise ValueError("segment needs the VQ-VAE (vae-oid.npz, --vae_ckpt) to decode masks")
  if isinstance(vae, (str, os.PathLike)):
    vae = outputs.LazyVae(os.fspath(vae))
  return vae() if callable(vae) else vae


@dataclasses.dataclass
class SegmentCase:
  """One segment example: reference and first predicted object. Boxes are normalized
  (y1, x1, y2, x2) in [0, 1]; masks (h, w) bool."""
  hw: tuple
  ref_box: tuple
  ref_mask: np.ndarray
  pred_box: Optional[tuple]  # None: no valid first object (4 <loc> + 16 <seg>)
  pred_mask: Optional[np.ndarray]
  pred_label: str = ""
  ref_label: str = ""


def segment_cases(examples, predictions, vae, gt_masks=None, indices=None):
  """Yields (index, SegmentCase) for `indices` (default all), decoding MASK_CHUNK examples'
  masks at a time (full-size masks of a whole data set would not fit in memory).

  The first object of the first reference is the reference (its mask replaced by the example's
  mask PNG when there is one; its box then from the suffix, or the mask's extent); the first
  object of the prediction is the prediction, valid only with 4 <loc> and 16 <seg>."""
  from paligemma_jax.model import vqvae
  params = _vae_params(vae)
  indices = range(len(examples)) if indices is None else indices
  indices = list(indices)
  for start in range(0, len(indices), MASK_CHUNK):
    chunk = indices[start:start + MASK_CHUNK]
    parsed, codes = [], []
    for i in chunk:
      ex = examples[i]
      hw = image_hw(ex.image)
      ref = outputs.parse_answer(_first_reference(ex), hw)[0]
      ref = ref[0] if ref else None
      pred = outputs.parse_answer(predictions[i], hw)[0]
      pred = pred[0] if pred and pred[0].seg_codes is not None else None
      png = gt_masks[i] if gt_masks else None
      for obj in (None if png else ref, pred):
        if obj is not None:
          codes.append(obj.seg_codes)
      parsed.append((i, hw, ref, pred, png))
    decoded = iter(vqvae.decode_masks(params, np.array(codes, np.int32).reshape(-1, 16)))
    for i, hw, ref, pred, png in parsed:
      if png:
        ref_mask = _load_mask(png, hw, f"line {examples[i].line}")
      else:
        ref_mask = outputs.paste_mask(next(decoded), ref.box, hw)
      if ref is not None:
        ref_box = ref.box_normalized
      else:  # the mask's extent
        ys, xs = np.nonzero(ref_mask)
        ref_box = ((ys.min() / hw[0], xs.min() / hw[1], (ys.max() + 1) / hw[0],
                    (xs.max() + 1) / hw[1]) if ys.size else (0.0, 0.0, 0.0, 0.0))
      pred_mask = outputs.paste_mask(next(decoded), pred.box, hw) if pred else None
      yield i, SegmentCase(hw, tuple(ref_box), ref_mask,
                           pred.box_normalized if pred else None, pred_mask,
                           pred.label if pred else "", ref.label if ref else "")


# ---------------------------------------------------------------------------
# Scoring.

def score(task: str, examples: Sequence[Example], predictions: Sequence[str], *, vae=None,
          gt_masks=None) -> tuple:
  """Scores predictions (one string per example, "" when missing) against the examples.

  vae: segment only: VQ-VAE params, a callable giving them (`outputs.LazyVae`) or the path of
  vae-oid.npz. gt_masks: segment only, per example a mask PNG path or None (`read_references`).
  -> (metrics dict, per-example list of dicts). Metrics per task: see the module docstring;
  per example the same scores for that example (detect: matching at IoU 0.5, an AP proxy).
  """
  check_task(task)
  if len(examples) != len(predictions):
    raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
  if not all(isinstance(p, str) for p in predictions):
    raise ValueError("predictions must be strings (\"\" for a missing one)")
  if not examples:
    raise ValueError("no examples to score")
  check_references(task, examples, gt_masks)
  return {"caption": _score_caption, "vqa": _score_vqa, "detect": _score_detect,
          "segment": _score_segment}[task](examples, predictions, vae=vae, gt_masks=gt_masks)


def _score_caption(examples, predictions, **_):
  refs = [references(ex) for ex in examples]
  cider, ciders = metrics.cider(refs, predictions)
  bleu, bleus = metrics.bleu4(refs, predictions)
  exact = [metrics.caption_exact_match(r, p) for r, p in zip(refs, predictions)]
  per = [dict(cider=c, bleu4=b, exact_match=e) for c, b, e in zip(ciders, bleus, exact)]
  return dict(cider=cider, bleu4=bleu, exact_match=float(np.mean(exact))), per


def _score_vqa(examples, predictions, **_):
  per = [dict(accuracy=metrics.vqa_accuracy(references(ex), p),
              anls=metrics.anls(references(ex), p),
              prediction_normalized=metrics.normalize_vqa(p))
         for ex, p in zip(examples, predictions)]
  return (dict(accuracy=float(np.mean([e["accuracy"] for e in per])),
               anls=float(np.mean([e["anls"] for e in per]))), per)


def _score_detect(examples, predictions, **_):
  refs, preds, sizes, per = [], [], [], []
  for ex, p in zip(examples, predictions):
    hw = image_hw(ex.image)
    ref, _ = detect_objects(_first_reference(ex), hw)
    pred, skipped = detect_objects(p, hw)
    refs.append(ref)
    preds.append([(label, box, 1.0) for label, box in pred])  # no confidence: all 1.0
    sizes.append(hw)
    norm = lambda objs: [dict(label=l, box=[b[0] / hw[0], b[1] / hw[1], b[2] / hw[0],
                                            b[3] / hw[1]]) for l, b in objs]
    per.append(dict(**metrics.match_at(ref, pred, 0.5), skipped=skipped,
                    ref_objects=norm(ref), pred_objects=norm(pred)))
  return metrics.coco_map(refs, preds, sizes), per


def _score_segment(examples, predictions, *, vae=None, gt_masks=None, **_):
  per = [None] * len(examples)
  for i, case in segment_cases(examples, predictions, vae, gt_masks):
    valid = case.pred_box is not None
    box_iou = metrics.box_iou(case.pred_box, case.ref_box) if valid else 0.0
    iou = metrics.mask_iou(case.pred_mask, case.ref_mask) if valid else 0.0
    per[i] = dict(iou=iou, box_iou=box_iou, boxacc50=float(box_iou >= 0.5), valid=valid)
  return (dict(miou=float(np.mean([e["iou"] for e in per])),
               boxacc50=float(np.mean([e["boxacc50"] for e in per])),
               invalid=sum(not e["valid"] for e in per)), per)


# ---------------------------------------------------------------------------
# With a model.

def _progress(total: int, enabled: bool, desc: str):
  if not enabled:
    return contextlib.nullcontext(None)
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, dynamic_ncols=True)


def _batches(n: int, batch_size: int):
  """[(start, stop)] covering range(n) in batch_size steps."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def predict(pipe, examples: Sequence[Example], *, batch_size: int = 8,
            max_decode_len: int = 32, progress: bool = False) -> list:
  """Greedy answers of `pipe` (a PaliGemmaPipeline) to the examples' (image, prefix), in
  batches of batch_size (the last one padded with repeats, so that one shape compiles).
  -> one string per example."""
  answers = []
  with _progress(len(examples), progress, "predict") as bar:
    for start, stop in _batches(len(examples), batch_size):
      rows = list(examples[start:stop])
      rows += [rows[-1]] * (min(batch_size, len(examples)) - len(rows))
      got = pipe.generate([ex.image for ex in rows], [ex.prefix for ex in rows],
                          max_decode_len=max_decode_len, sampler="greedy")
      answers += [g.text for g in got[:stop - start]]
      if bar is not None:
        bar.update(stop - start)
  return answers


_NLL_FNS = weakref.WeakKeyDictionary()  # pipeline -> its jitted per-example NLL


def _nll_fn(pipe):
  """jit of f(params, pixels, text, mask_ar, targets, weights) -> ((B,) NLL sums, (B,) token
  counts): `pipe.logits` (the same model apply under the pipeline's backend), compiled, with
  the parameters passed in rather than closed over."""
  if pipe not in _NLL_FNS:
    import jax
    import jax.numpy as jnp

    def f(params, pixels, text, mask_ar, targets, weights):
      logits = pipe.model.apply({"params": params}, pixels, text, mask_ar)[0]
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return (nll * weights).sum(-1), weights.sum(-1)
    _NLL_FNS[pipe] = jax.jit(f)
  return _NLL_FNS[pipe]


def text_len_for(tokenizer, examples: Sequence[Example]) -> int:
  """The smallest text_len that holds every example's first reference whole: bos, prefix,
  separator, suffix and eos, minus the one token the model does not see."""
  sep = len(tokenizer.encode("\n"))
  return max(1 + len(tokenizer.encode(ex.prefix)) + sep + len(tokenizer.encode(
      _first_reference(ex))) + 1 for ex in examples) - 1


def perplexity(pipe, examples: Sequence[Example], text_len: Optional[int] = None, *,
               batch_size: int = 8, progress: bool = False) -> tuple:
  """Perplexity of the first reference of each example under the model.

  Tokens in big_vision's layout (`tokenizer.training_example(prefix, suffix, text_len)`: the
  model sees text[:-1] under mask_ar[:-1] and predicts text[1:], scored where mask_loss[1:]:
  the suffix and its eos). text_len None: `text_len_for` the examples (nothing truncated).
  -> (exp(sum of NLL / number of scored tokens), [per-example mean NLL per token]).
  """
  import jax
  if text_len is None:
    text_len = text_len_for(pipe.tokenizer, examples)
  fn, size = _nll_fn(pipe), pipe.config.image_size
  sums, counts = [], []
  with _progress(len(examples), progress, "perplexity") as bar, pipe.backend.install():
    for start, stop in _batches(len(examples), batch_size):
      rows = list(examples[start:stop])
      pad = min(batch_size, len(examples)) - len(rows)
      rows += [rows[-1]] * pad
      tok = [pipe.tokenizer.training_example(ex.prefix, _first_reference(ex), text_len)[:3]
             for ex in rows]
      tokens, mask_ar, mask_loss = (np.stack(t) for t in zip(*tok))
      mask_loss[len(rows) - pad:] = 0
      pixels = np.stack([image_lib.preprocess(image_lib.load_image(ex.image), size)
                         for ex in rows])
      s, c = jax.device_get(fn(pipe.params, pixels, tokens[:, :-1], mask_ar[:, :-1],
                               tokens[:, 1:], mask_loss[:, 1:].astype(np.float32)))
      sums += s[:stop - start].tolist()
      counts += c[:stop - start].tolist()
      if bar is not None:
        bar.update(stop - start)
  per = [s / max(c, 1.0) for s, c in zip(sums, counts)]
  return float(np.exp(sum(sums) / max(sum(counts), 1.0))), per
