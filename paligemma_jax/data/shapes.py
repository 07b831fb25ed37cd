"""A procedural data set with exact ground truth: scenes of a few coloured shapes.

Each scene is a 224x224 picture with 1-3 objects (circle, square, triangle; red, green, blue,
yellow; 48, 64 or 80 px) on a light background with a gradient. Objects sit on a 16-px grid,
their boxes may overlap but their pixels never do, so every box and mask is exact. No two
objects share colour and shape, so "the red circle" names one object.

Tasks (big_vision's prompt styles), each a JSONL line {"image", "prefix", "suffix"}:
  caption en                       -> "a red circle , a blue square and a green triangle"
                                      (objects left to right)
  answer en how many circles       -> "2"   (also "0" for absent shapes)
  answer en what color is the square -> "blue"   (asked when exactly one square)
  detect red circle ; blue square  -> "<loc..><loc..><loc..><loc..> red circle ; <loc..>x4 blue square"
  segment red circle               -> "<loc..>x4<seg..>x16 red circle"  (codes from a VQ-VAE)

Only numpy and PIL here: the segmentation codes come from an `encode_masks` function that the
caller passes in (the VQ-VAE's encoder).
"""
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224
GRID = 16
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {"red": (215, 45, 45), "green": (40, 165, 70), "blue": (45, 85, 215),
          "yellow": (235, 195, 25)}
SIDES = (48, 64, 80)
TASKS = ("caption", "count", "color", "detect", "segment")


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str
  box: tuple  # (y1, x1, y2, x2) pixels, exclusive ends

  @property
  def label(self) -> str:
    return f"{self.color} {self.shape}"


def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
  """The shape filling a height x width box -> bool (height, width)."""
  img = Image.new("L", (width, height), 0)
  d = ImageDraw.Draw(img)
  if shape == "circle":
    d.ellipse((0, 0, width - 1, height - 1), fill=255)
  elif shape == "square":
    d.rectangle((0, 0, width - 1, height - 1), fill=255)
  elif shape == "triangle":
    d.polygon([(width / 2 - 0.5, 0), (width - 1, height - 1), (0, height - 1)], fill=255)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return np.asarray(img) > 127


def object_mask(obj: Obj) -> np.ndarray:
  """bool (SIZE, SIZE): the object's pixels in the scene."""
  y1, x1, y2, x2 = obj.box
  full = np.zeros((SIZE, SIZE), bool)
  full[y1:y2, x1:x2] = shape_mask(obj.shape, y2 - y1, x2 - x1)
  return full


def random_scene(rng: np.random.Generator, max_objects: int = 3) -> list:
  """1..max_objects objects, no two with the same colour and shape, no shared pixels."""
  n = int(rng.integers(1, max_objects + 1))
  objs, taken = [], np.zeros((SIZE, SIZE), bool)
  for _ in range(200):
    if len(objs) == n:
      break
    shape, color = SHAPES[rng.integers(len(SHAPES))], list(COLORS)[rng.integers(len(COLORS))]
    if any(o.shape == shape and o.color == color for o in objs):
      continue
    side = int(SIDES[rng.integers(len(SIDES))])
    y, x = (int(rng.integers(0, (SIZE - side) // GRID + 1)) * GRID for _ in range(2))
    obj = Obj(shape, color, (y, x, y + side, x + side))
    mask = object_mask(obj)
    if (mask & taken).any():
      continue
    objs.append(obj)
    taken |= mask
  return objs


def render(objs: Sequence[Obj], rng: np.random.Generator) -> Image.Image:
  """A light background (a random colour with a gradient), then each object in its colour
  (jittered a little)."""
  base = rng.integers(200, 250, 3).astype(np.float32)
  tilt = rng.uniform(-25, 25, 3).astype(np.float32)
  ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
  direction = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
  pixels = np.broadcast_to(base + tilt * direction[..., None], (SIZE, SIZE, 3)).copy()
  for obj in objs:
    color = np.array(COLORS[obj.color], np.float32) + rng.uniform(-12, 12, 3)
    pixels[object_mask(obj)] = color
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def loc_tokens(box: Sequence[int]) -> str:
  """(y1, x1, y2, x2) pixels -> four `<locNNNN>`, round(v / SIZE * 1023) as big_vision."""
  return "".join(f"<loc{int(round(v / SIZE * 1023)):04d}>" for v in box)


def left_to_right(objs: Sequence[Obj]) -> list:
  return sorted(objs, key=lambda o: (o.box[1] + o.box[3], o.box[0] + o.box[2]))


def caption(objs: Sequence[Obj]) -> str:
  names = [f"a {o.label}" for o in left_to_right(objs)]
  return names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def examples(objs: Sequence[Obj], rng: np.random.Generator,
             encode_masks: Optional[Callable] = None, tasks: Sequence[str] = TASKS) -> list:
  """One (task, prefix, suffix) per task for this scene, the question drawn at random.

  encode_masks: (n, 64, 64) float masks in [-1, 1] -> (n, 16) int codes; needed for
  "segment"."""
  out = []
  ordered = left_to_right(objs)
  for task in tasks:
    if task == "caption":
      out.append((task, "caption en", caption(objs)))
    elif task == "count":
      shape = SHAPES[rng.integers(len(SHAPES))]
      n = sum(o.shape == shape for o in objs)
      out.append((task, f"answer en how many {PLURALS[shape]}", str(n)))
    elif task == "color":
      single = [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
      if single:
        shape = single[rng.integers(len(single))]
        color = next(o.color for o in objs if o.shape == shape)
        out.append((task, f"answer en what color is the {shape}", color))
    elif task == "detect":
      out.append((task, "detect " + " ; ".join(o.label for o in ordered),
                  " ; ".join(loc_tokens(o.box) + " " + o.label for o in ordered)))
    elif task == "segment":
      obj = ordered[rng.integers(len(ordered))]
      codes = encode_masks(crop_masks([obj]))[0]
      segs = "".join(f"<seg{int(c):03d}>" for c in codes)
      out.append((task, f"segment {obj.label}", loc_tokens(obj.box) + segs + " " + obj.label))
    else:
      raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
  return out


def crop_masks(objs: Sequence[Obj], size: int = 64) -> np.ndarray:
  """Each object's mask cropped to its box and resized to size x size (big_vision's
  segmentation target) -> (n, size, size) float32 in [-1, 1]."""
  out = []
  for obj in objs:
    y1, x1, y2, x2 = obj.box
    crop = Image.fromarray((object_mask(obj)[y1:y2, x1:x2] * 255).astype(np.uint8))
    resized = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1
    out.append(np.where(resized > 0, 1.0, -1.0).astype(np.float32))
  return np.stack(out)


def random_masks(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
  """Varied masks to train the VQ-VAE on (beyond the three shapes): ellipses, rectangles,
  triangles and polygons of random extent, some cut by a random half-plane -> (n, size, size)
  float32 in [-1, 1]."""
  out = np.empty((n, size, size), np.float32)
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  for i in range(n):
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    a, b = sorted(rng.uniform(0, 0.45, 2)), sorted(rng.uniform(0.55, 1, 2))
    box = [a[0] * size, a[1] * size, b[0] * size, b[1] * size]
    kind = rng.integers(5)
    if kind == 0:
      d.ellipse(box, fill=255)
    elif kind == 1:
      d.rectangle(box, fill=255)
    elif kind == 2:
      d.polygon([(box[0] + box[2]) / 2, box[1], box[2], box[3], box[0], box[3]], fill=255)
    else:
      pts = rng.uniform(0, size, (int(rng.integers(3, 8)), 2))
      centre = pts.mean(0)
      order = np.argsort(np.arctan2(*(pts - centre).T))
      d.polygon([tuple(p) for p in pts[order]], fill=255)
    m = np.asarray(img) > 127
    if kind == 0 or rng.random() < 0.3:  # every whole shape type appears uncut too
      m = shape_mask(SHAPES[rng.integers(len(SHAPES))], size, size) if kind == 0 else m
    if rng.random() < 0.3:
      normal = rng.normal(size=2)
      m &= (yy - 0.5) * normal[0] + (xx - 0.5) * normal[1] < rng.uniform(-0.2, 0.4)
    out[i] = np.where(m, 1.0, -1.0)
  return out


def write(folder: str, num_scenes: int, seed: int, encode_masks: Optional[Callable] = None,
          tasks: Sequence[str] = TASKS, name: str = "data", max_objects: int = 3,
          rates: Optional[dict] = None) -> dict:
  """Writes num_scenes scenes as `folder/images/NAME_i.png`, `folder/NAME.jsonl` (all tasks)
  and `folder/NAME_TASK.jsonl` per task -> {task or "all": path}. Segment lines also carry
  "mask": the object's exact mask as a PNG (the evaluator's ground truth). Scenes hold 1 to
  max_objects objects.

  rates: {task: fraction of the scenes asked it} (default 1 each), drawn apart from the scenes:
  the same seed gives the same pictures and questions, only fewer of them."""
  rng = np.random.default_rng(seed)
  keep = np.random.default_rng([seed, 1])
  rates = rates or {}
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  lines = {t: [] for t in tasks}
  for i in range(num_scenes):
    objs = random_scene(rng, max_objects)
    picture = f"images/{name}_{i:05d}.png"
    render(objs, rng).save(os.path.join(folder, picture))
    for task, prefix, suffix in examples(objs, rng, encode_masks, tasks):
      if task in rates and keep.random() >= rates[task]:
        continue
      row = {"image": picture, "prefix": prefix, "suffix": suffix}
      if task == "segment":
        label = prefix[len("segment "):]
        obj = next(o for o in objs if o.label == label)
        mask_file = f"images/{name}_{i:05d}_{obj.color}_{obj.shape}.png"
        Image.fromarray(object_mask(obj).astype(np.uint8) * 255).save(
            os.path.join(folder, mask_file))
        row["mask"] = mask_file
      lines[task].append(row)
  paths = {}
  for task, rows in [("all", [r for t in tasks for r in lines[t]])] + list(lines.items()):
    paths[task] = os.path.join(folder, f"{name}.jsonl" if task == "all" else f"{name}_{task}.jsonl")
    order = np.random.default_rng(seed + 1).permutation(len(rows)) if task == "all" else range(len(rows))
    with open(paths[task], "w") as f:
      for j in order:
        f.write(json.dumps(rows[j]) + "\n")
  return paths
