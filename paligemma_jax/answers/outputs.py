"""Detection and segmentation answers: parsing, mask pasting and pictures.

An answer is objects joined by " ; ", each `<locY1><locX1><locY2><locX2>`,
for segments followed by 16 `<segNNN>`, then the label:
  `<loc0123><loc0045><loc0678><loc0999> cat ; <loc..>x4<seg..>x16 dog`.
A coordinate is `value / 1023` of the image side (big_vision encodes
round(v * 1023) and its evaluators divide by 1023, not 1024).
"""

import dataclasses
import json
import os
import re
from typing import Optional

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

LOC_MAX = 1023
SEG_MAX = 127
NUM_SEG = 16

_TOKEN = re.compile(r"<loc(\d{4})>|<seg(\d{3})>|;")
_LEADING_SPECIAL = re.compile(r"^(\s*<[^<>\s]*>)*\s*")  # e.g. "<image><bos>"

# Kelly's colours of maximum contrast (minus white/black/greys).
PALETTE = (
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215),
    (193, 0, 32), (206, 162, 98), (0, 125, 52), (246, 118, 142),
    (0, 83, 138), (255, 122, 92), (83, 55, 122), (255, 142, 0),
    (179, 40, 81), (244, 200, 0), (127, 24, 13), (147, 170, 0),
    (89, 51, 21), (241, 58, 19), (35, 44, 22),
)
MASK_ALPHA = 0.45


@dataclasses.dataclass(frozen=True)
class ParsedObject:
  """One whole object of an answer.

  box: (y1, x1, y2, x2) in pixels of the original image (floats, value/1023*side).
  box_normalized: (y1, x1, y2, x2) in [0, 1].
  seg_codes: the 16 `<segNNN>` values, or None for a detection.
  """
  label: str
  box: tuple
  box_normalized: tuple
  seg_codes: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A part of the answer that is not a whole object, and why."""
  text: str
  reason: str


def _non_finite(obj, where=""):
  """The path and value of the first NaN or infinity in a JSON-like tree, or None."""
  if isinstance(obj, float) and not np.isfinite(obj):
    return where or "the value", obj
  items = obj.items() if isinstance(obj, dict) else (
      enumerate(obj) if isinstance(obj, (list, tuple)) else ())
  for k, v in items:
    found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else
                        (f"{where}.{k}" if where else str(k)))
    if found:
      return found
  return None


def dumps_strict(obj, **kw) -> str:
  """json.dumps that writes strict JSON: a NaN or infinity is a ValueError naming where."""
  try:
    return json.dumps(obj, allow_nan=False, **kw)
  except ValueError:
    found = _non_finite(obj)
    if found is None:
      raise
    raise ValueError(f"{found[0]} is {found[1]}: not a finite number, which JSON cannot "
                     "hold") from None


def write_json(path, obj):
  """Writes `obj` as strict, indented JSON to `path` atomically (a temporary file, renamed)."""
  text = dumps_strict(obj, indent=2) + "\n"  # before anything is created
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.isfile(tmp):
      os.remove(tmp)
    raise


def task_of(prompt):
  """'detect', 'segment' or None, from the first word of the prompt."""
  words = _LEADING_SPECIAL.sub("", prompt).split()
  first = words[0].lower() if words else ""
  return first if first in ("detect", "segment") else None


def _lex(text):
  """[(kind, value, start, end)] with kind in loc/seg/sep/text."""
  items, pos = [], 0
  for m in _TOKEN.finditer(text):
    if m.start() > pos:
      items.append(("text", text[pos:m.start()], pos, m.start()))
    if m.group(1) is not None:
      items.append(("loc", int(m.group(1)), m.start(), m.end()))
    elif m.group(2) is not None:
      items.append(("seg", int(m.group(2)), m.start(), m.end()))
    else:
      items.append(("sep", ";", m.start(), m.end()))
    pos = m.end()
  if pos < len(text):
    items.append(("text", text[pos:], pos, len(text)))
  # Whitespace between tokens carries nothing (labels are stripped anyway).
  return [it for it in items if not (it[0] == "text" and not it[1].strip())]


def _split_parts(items):
  """Groups items into candidate objects.

  A part ends at " ; ", and also where a box starts after something that is
  not a box token (a missing separator) or after a complete run of 4 locs.
  """
  parts, cur = [], []
  for it in items:
    if it[0] == "sep":
      parts.append(cur)
      cur = []
      continue
    if it[0] == "loc" and cur and (any(c[0] != "loc" for c in cur)
                                   or len(cur) >= 4):
      parts.append(cur)
      cur = []
    cur.append(it)
  parts.append(cur)
  return [p for p in parts if p]


def _parse_part(part, image_hw):
  """A ParsedObject, or a reason string why the part is not whole."""
  n_loc = 0
  while n_loc < len(part) and part[n_loc][0] == "loc":
    n_loc += 1
  if n_loc == 0:
    return "no <locNNNN> box"
  if n_loc != 4:
    return f"expected 4 <locNNNN> tokens, found {n_loc}"
  n_seg = 0
  while 4 + n_seg < len(part) and part[4 + n_seg][0] == "seg":
    n_seg += 1
  if n_seg not in (0, NUM_SEG):
    return f"expected {NUM_SEG} <segNNN> tokens, found {n_seg}"
  rest = part[4 + n_seg:]
  if any(it[0] != "text" for it in rest):
    stray = next(it for it in rest if it[0] != "text")
    return f"unexpected <{stray[0]}> token after the label"
  locs = [it[1] for it in part[:4]]
  segs = [it[1] for it in part[4:4 + n_seg]]
  if max(locs) > LOC_MAX:
    return f"<loc> value {max(locs)} is above {LOC_MAX}"
  if segs and max(segs) > SEG_MAX:
    return f"<seg> value {max(segs)} is above {SEG_MAX}"
  y1, x1, y2, x2 = locs
  if y2 < y1 or x2 < x1:
    return f"inverted box (y1={y1}, x1={x1}, y2={y2}, x2={x2})"
  if y2 == y1 or x2 == x1:
    return f"empty box (y1={y1}, x1={x1}, y2={y2}, x2={x2})"
  h, w = image_hw
  norm = tuple(v / LOC_MAX for v in locs)
  # (v / 1023) * side, in this order, as big_vision's evaluator computes it.
  box = (norm[0] * h, norm[1] * w, norm[2] * h, norm[3] * w)
  label = " ".join(it[1] for it in rest).strip()
  return ParsedObject(label=label, box=box, box_normalized=norm,
                      seg_codes=tuple(segs) if segs else None)


def parse_answer(text, image_hw):
  """Parses a detect/segment answer for an image of size (h, w).

  Returns (objects, skipped): the whole objects in order, and for every other
  non-blank part its text and a reason. Never raises on malformed text.
  """
  objects, skipped = [], []
  for part in _split_parts(_lex(text)):
    got = _parse_part(part, image_hw)
    if isinstance(got, ParsedObject):
      objects.append(got)
    else:
      skipped.append(Skipped(text=text[part[0][2]:part[-1][3]].strip(),
                             reason=got))
  return objects, skipped


def box_pixels(box):
  """Integer pixel box (y1, x1, y2, x2) from a float one: `int()` as big_vision."""
  return tuple(int(v) for v in box)


def paste_mask(mask64, box, image_hw):
  """Pastes a (64,64) decoder mask in [-1,1] into `box` of an (h, w) image.

  As big_vision's segmentation evaluator: the box corners are truncated with
  int(), the mask is resized to the box with PIL bilinear on float values, and
  the object is where the resized value is > 0. Returns a (h, w) bool array.
  """
  h, w = image_hw
  y1, x1, y2, x2 = box_pixels(box)
  full = np.zeros((h, w), bool)
  if y2 <= y1 or x2 <= x1:
    return full
  if y1 < 0 or x1 < 0 or y2 > h or x2 > w:
    raise ValueError(f"box {box} lies outside the {h}x{w} image")
  img = PIL.Image.fromarray(np.asarray(mask64, np.float32))
  resized = np.asarray(img.resize((x2 - x1, y2 - y1), PIL.Image.BILINEAR))
  full[y1:y2, x1:x2] = resized > 0.0
  return full


def _font(size):
  try:
    return PIL.ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
    return PIL.ImageFont.load_default()


def _text_colour(rgb):
  luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_objects(image, objects, masks=None):
  """The image (RGB) with translucent masks, box outlines and filled labels.

  masks: optional list parallel to `objects` of (h, w) bool arrays or None.
  The outline of a box is drawn inside its integer pixel extent
  [y1, y2) x [x1, x2); object i has colour PALETTE[i % len(PALETTE)].
  """
  rgb = np.asarray(image.convert("RGB"), np.float32).copy()
  h, w = rgb.shape[:2]
  colours = [PALETTE[i % len(PALETTE)] for i in range(len(objects))]
  for mask, colour in zip(masks or [], colours):
    if mask is not None:
      rgb[mask] = (1 - MASK_ALPHA) * rgb[mask] + MASK_ALPHA * np.float32(colour)
  out = PIL.Image.fromarray(np.round(rgb).astype(np.uint8))
  draw = PIL.ImageDraw.Draw(out)
  line = max(2, round(min(h, w) / 150))
  font = _font(max(10, round(min(h, w) / 30)))
  boxes = []
  for obj, colour in zip(objects, colours):
    y1, x1, y2, x2 = box_pixels(obj.box)
    y2, x2 = max(y2, y1 + 1), max(x2, x1 + 1)
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=line)
    boxes.append((y1, x1))
  # Labels last so that no outline crosses a label.
  for obj, colour, (y1, x1) in zip(objects, colours, boxes):
    text = obj.label or "?"
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    pad = max(1, line // 2)
    tw, th = r - l + 2 * pad, b - t + 2 * pad
    ty = y1 - th if y1 - th >= 0 else y1  # above the box, else inside it
    tx = min(x1, max(0, w - tw))
    draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
    draw.text((tx + pad - l, ty + pad - t), text, fill=_text_colour(colour),
              font=font)
  return out


@dataclasses.dataclass
class TaskAnswer:
  """A detect/segment answer, parsed once: its objects, the parts that were skipped, and a
  full-size bool mask per object (None for a detection, or when no VQ-VAE decodes it)."""
  task: str
  objects: list
  skipped: list
  masks: list
  warning: Optional[str] = None


class LazyVae:
  """The VQ-VAE at `path`, read on first use (only segment answers need it) and kept."""

  def __init__(self, path):
    self.path, self._params = path, None

  def __call__(self):
    if self._params is None:
      from paligemma_jax.model import vqvae
      self._params = vqvae.load_vae(self.path, parts=("decoder",))
    return self._params


def task_answer(text, prompt, image_hw, vae=None) -> Optional[TaskAnswer]:
  """For detect/segment prompts the answer parsed against image_hw (h, w), masks decoded
  with `vae` (VQ-VAE params, or a callable giving them, e.g. `LazyVae`); else None."""
  task = task_of(prompt)
  if task is None:
    return None
  objects, skipped = parse_answer(text, image_hw)
  masks, warning = [None] * len(objects), None
  seg = [i for i, o in enumerate(objects) if o.seg_codes is not None]
  if seg and vae is None:
    warning = ("segment answer needs --vae_ckpt=PATH to decode masks; boxes and seg_codes "
               "were kept")
  elif seg:
    from paligemma_jax.model import vqvae  # jax only when masks are needed
    codes = np.array([objects[i].seg_codes for i in seg], np.int32)
    for i, m64 in zip(seg, vqvae.decode_masks(vae() if callable(vae) else vae, codes)):
      masks[i] = paste_mask(m64, objects[i].box, image_hw)
  return TaskAnswer(task, objects, skipped, masks, warning)


def rle_encode(mask: np.ndarray) -> dict:
  """(h, w) bool -> COCO's compressed RLE {"size": [h, w], "counts": str} (pycocotools)."""
  from pycocotools import mask as coco_mask
  rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
  """Inverse of `rle_encode`: (h, w) bool."""
  from pycocotools import mask as coco_mask
  return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}) > 0


def answer_fields(answer: TaskAnswer, mask_rle: bool = True) -> dict:
  """JSON of an answer: {"objects": [{label, box (pixels [y1, x1, y2, x2]), box_normalized
  [, seg_codes][, mask_rle]}], "skipped": [{text, reason}][, "warning"]}."""
  objects = []
  for o, mask in zip(answer.objects, answer.masks):
    entry = {"label": o.label, "box": [float(v) for v in o.box],
             "box_normalized": [float(v) for v in o.box_normalized]}
    if o.seg_codes is not None:
      entry["seg_codes"] = [int(c) for c in o.seg_codes]
    if mask is not None and mask_rle:
      entry["mask_rle"] = rle_encode(mask)
    objects.append(entry)
  fields = {"objects": objects,
            "skipped": [{"text": s.text, "reason": s.reason} for s in answer.skipped]}
  if answer.warning:
    fields["warning"] = answer.warning
  return fields


def write_task_outputs(answer: TaskAnswer, image, output_dir):
  """Writes annotated.png, objects.json and one mask PNG per decoded segment.

  objects.json = {"task", **`answer_fields` (no RLE), mask_png per decoded mask}; box in
  pixels of `image`; mask_png the path of a full-size black/white PNG. Returns that dict
  plus "annotated_png".
  """
  os.makedirs(output_dir, exist_ok=True)
  result = {"task": answer.task, **answer_fields(answer, mask_rle=False)}
  for i, (entry, mask) in enumerate(zip(result["objects"], answer.masks)):
    if mask is not None:
      entry["mask_png"] = os.path.join(output_dir, f"mask_{i:02d}.png")
      PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(entry["mask_png"])
  write_json(os.path.join(output_dir, "objects.json"), result)
  annotated = os.path.join(output_dir, "annotated.png")
  draw_objects(image, answer.objects, answer.masks).save(annotated)
  return {**result, "annotated_png": annotated}
