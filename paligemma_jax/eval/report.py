"""A picture of the worst detect/segment examples: reference in green, prediction in red."""
import math

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from paligemma_jax.data import image as image_lib
from paligemma_jax.eval import evaluators

GREEN = (0, 170, 60)
RED = (220, 30, 30)
ALPHA = 0.4
CELL = 360        # longest image side in a cell, pixels
COLUMNS = 4
FONT_SIZE = 15


def _font(size=FONT_SIZE):
  try:
    return PIL.ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    return PIL.ImageFont.load_default()


def _fit(draw, text, font, width):
  """text cut with "..." to fit `width` pixels."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + "...", font=font) > width:
    text = text[:-1]
  return text + "..."


def worst_order(task: str, per_example: list) -> list:
  """Example indices, worst first: detect by F1 at IoU 0.5 then mean best IoU; segment by mask
  IoU then box IoU. Ties keep the data order."""
  if task == "detect":
    key = lambda i: (per_example[i]["f1"], per_example[i]["mean_iou"])
  elif task == "segment":
    key = lambda i: (per_example[i]["iou"], per_example[i]["box_iou"])
  else:
    raise ValueError(f"no worst-examples picture for task {task!r} (detect and segment only)")
  return sorted(range(len(per_example)), key=key)


def _overlay(rgb, mask, colour):
  rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * np.float32(colour)


def _box(draw, size, box, colour, label, font, width, below=False):
  """A normalized (y1, x1, y2, x2) box on a drawing of size (w, h), outlined, its label on a
  filled tag above the box (below=True: under it, so that a reference and a prediction on the
  same box both show)."""
  y1, x1, y2, x2 = box[0] * size[1], box[1] * size[0], box[2] * size[1], box[3] * size[0]
  x2, y2 = max(x2 - 1, x1), max(y2 - 1, y1)
  draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
  if label:
    l, t, r, b = draw.textbbox((0, 0), label, font=font)
    tw, th = r - l + 4, b - t + 4
    if below:
      ty = y2 + 1 if y2 + 1 + th <= size[1] else y2 - th
    else:
      ty = y1 - th if y1 - th >= 0 else y1
    tx = min(x1, max(0, size[0] - tw))
    draw.rectangle([tx, ty, tx + tw, ty + th], fill=colour)
    draw.text((tx + 2 - l, ty + 2 - t), label, fill=(255, 255, 255), font=font)


def _panel(task, example, prediction, scores, case, rank, font):
  """One cell: the annotated image and a few lines of text under it."""
  img = image_lib.load_image(example.image)
  scale = CELL / max(img.size)
  size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
  rgb = np.asarray(img.resize(size, PIL.Image.BILINEAR), np.float32).copy()
  h, w = rgb.shape[:2]
  if case is not None:  # segment: masks, then boxes
    for mask, colour in ((case.ref_mask, GREEN), (case.pred_mask, RED)):
      if mask is not None:
        small = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(size, PIL.Image.NEAREST)
        _overlay(rgb, np.asarray(small) > 127, colour)
  out = PIL.Image.fromarray(np.round(rgb).astype(np.uint8))
  draw = PIL.ImageDraw.Draw(out)
  if task == "detect":
    for objs, colour, width in ((scores["ref_objects"], GREEN, 5),
                                (scores["pred_objects"], RED, 2)):
      for o in objs:  # the reference wider: it shows around a prediction on the same box
        _box(draw, size, o["box"], colour, o["label"], font, width, below=colour == GREEN)
    lines = [f"#{rank + 1}  line {example.line}  F1@.5 {scores['f1']:.2f}  "
             f"IoU {scores['mean_iou']:.2f}",
             "ref:  " + " ; ".join(o["label"] for o in scores["ref_objects"]),
             "pred: " + (" ; ".join(o["label"] for o in scores["pred_objects"]) or
                         (prediction or "(nothing)"))]
  else:
    for box, colour, label, width in ((case.ref_box, GREEN, case.ref_label, 5),
                                      (case.pred_box, RED, case.pred_label, 2)):
      if box is not None:
        _box(draw, size, box, colour, label, font, width, below=colour == GREEN)
    lines = [f"#{rank + 1}  line {example.line}  mask IoU {scores['iou']:.2f}  "
             f"box IoU {scores['box_iou']:.2f}",
             f"prompt: {example.prefix}",
             "pred: " + (case.pred_label or "-") if scores["valid"] else
             "pred: invalid " + repr(prediction[:60])]
  return out, lines


def draw_worst(task, examples, predictions, per_example, path, *, vae=None, gt_masks=None,
               count: int = 8) -> list:
  """Writes a PNG grid of the `count` worst examples (`worst_order`) to `path`: reference
  boxes/masks green, prediction red, under each image its rank, JSONL line, scores, the
  reference and predicted labels. -> the indices drawn."""
  chosen = worst_order(task, per_example)[:count]
  if not chosen:
    return []
  cases = {}
  if task == "segment":
    cases = dict(evaluators.segment_cases(examples, predictions, vae, gt_masks, chosen))
  font, title_font = _font(), _font(FONT_SIZE + 3)
  panels = [_panel(task, examples[i], predictions[i], per_example[i], cases.get(i), r, font)
            for r, i in enumerate(chosen)]
  line_h = FONT_SIZE + 6
  text_h = 3 * line_h + 8
  cols = min(COLUMNS, len(panels))
  rows = math.ceil(len(panels) / cols)
  pad, title_h = 8, FONT_SIZE + 3 + 16
  sheet = PIL.Image.new("RGB", (cols * (CELL + pad) + pad,
                                title_h + rows * (CELL + text_h + pad)), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(sheet)
  what = "F1 at IoU 0.5" if task == "detect" else "mask IoU"
  draw.text((pad, 6), f"{task}: the {len(panels)} worst of {len(examples)} examples by {what}"
            "   (green: reference, red: prediction)", fill=(0, 0, 0), font=title_font)
  for k, (img, lines) in enumerate(panels):
    x = pad + (k % cols) * (CELL + pad)
    y = title_h + (k // cols) * (CELL + text_h + pad)
    sheet.paste(img, (x, y))
    for j, line in enumerate(lines):
      draw.text((x, y + CELL + 4 + j * line_h), _fit(draw, line, font, CELL), fill=(0, 0, 0),
                font=font)
  sheet.save(path)
  return chosen
