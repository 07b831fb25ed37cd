"""The embedded default's recipe: the shapes data set (`data/shapes.py`) with segmentation
codes from the shipped VQ-VAE, and its tokenizer.

A data setting `shapes:NUM_SCENES:SEED` (e.g. `--config.train_data=shapes:6000:0`) is written
once into a cache folder and then read like any JSONL. `shapes:NUM_SCENES:SEED:MAX_OBJECTS:TASKS`
narrows it, e.g. `shapes:8000:10:1:caption`: one object per scene, captions only;
`TASK@RATE` asks a task of that fraction of the scenes (`shapes:20000:0:3:caption,color@0.3`).
"""
import os
import shutil
import tempfile

import numpy as np

from paligemma_jax.data import shapes
from paligemma_jax.data.tokenizer import train_tiny_tokenizer
from paligemma_jax.model import vqvae

PREFIX = "shapes:"


def corpus() -> str:
  """Every word the shapes tasks use, in their sentences."""
  lines = ["caption en", "detect segment answer en how many what color is the",
           "a , and ; 0 1 2 3 4 5 6 7 8 9"]
  for shape in shapes.SHAPES:
    lines.append(f"answer en how many {shapes.PLURALS[shape]}")
    lines.append(f"answer en what color is the {shape}")
    for color in shapes.COLORS:
      lines += [f"a {color} {shape} and a {color} {shape}", f"detect {color} {shape} ; {color}",
                f"segment {color} {shape}", color]
  return "\n".join(lines) + "\n"


def train_tokenizer(out_dir: str) -> str:
  return train_tiny_tokenizer(out_dir, vocab_size=1280, corpus_text=corpus(), name="tokenizer")


def is_spec(path: str) -> bool:
  return str(path).startswith(PREFIX)


def _encoder(vae_path: str):
  """The VQ-VAE's encoder as shapes.examples' encode_masks: [-1, 1] masks -> codes."""
  params = vqvae.load_vae(vae_path, parts=("encoder",))
  return lambda masks: vqvae.encode_masks(params, (np.asarray(masks) + 1) / 2)


def parse(spec: str) -> tuple:
  """`shapes:NUM:SEED[:MAX_OBJECTS:TASK[@RATE],...]` -> (num, seed, max_objects, tasks,
  {task: rate} for the tasks given one)."""
  parts = spec[len(PREFIX):].split(":")
  try:
    if len(parts) not in (2, 4):
      raise ValueError
    num, seed = int(parts[0]), int(parts[1])
    max_objects = int(parts[2]) if len(parts) == 4 else 3
    named = [t.partition("@") for t in parts[3].split(",")] if len(parts) == 4 else []
    tasks = tuple(t for t, _, _ in named) or shapes.TASKS
    rates = {t: float(r) for t, at, r in named if at}
  except ValueError:
    raise ValueError(f"{spec!r}: expected shapes:NUM_SCENES:SEED or "
                     "shapes:NUM_SCENES:SEED:MAX_OBJECTS:TASK[@RATE],..., e.g. shapes:6000:0 "
                     "or shapes:8000:10:1:caption or shapes:9000:0:3:caption,color@0.3") from None
  unknown = [t for t in tasks if t not in shapes.TASKS]
  if unknown or not 1 <= max_objects <= 3 or not all(0 < r <= 1 for r in rates.values()):
    raise ValueError(f"{spec!r}: tasks are {', '.join(shapes.TASKS)}, MAX_OBJECTS 1-3 and "
                     "rates in (0, 1]")
  return num, seed, max_objects, tasks, rates


def prepare(spec: str, cache_dir: str, vae_path: str) -> str:
  """A `shapes:` spec (see `parse`) -> the path of its JSONL (all its tasks), written on first
  use."""
  num, seed, max_objects, tasks, rates = parse(spec)
  name = "shapes_" + spec[len(PREFIX):].replace(":", "_").replace(",", "-")
  folder = os.path.join(os.path.expanduser(cache_dir), name)
  done = os.path.join(folder, "data.jsonl")
  if os.path.exists(done):
    return done
  encode = _encoder(vae_path) if "segment" in tasks else None
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=os.path.dirname(folder))
  shapes.write(tmp, num, seed, encode, tasks, max_objects=max_objects, rates=rates)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  return done


def write_split(out: str, num_scenes: int, seed: int, vae_path: str) -> dict:
  """Fresh scenes as JSONL files, all tasks and one per task (`shapes.write`) -> paths."""
  return shapes.write(out, num_scenes, seed, _encoder(vae_path))


if __name__ == "__main__":  # python -m paligemma_jax.train.shapes_recipe --out=DIR ...
  import argparse
  parser = argparse.ArgumentParser(description="Write shapes scenes as JSONL (held-out sets).")
  parser.add_argument("--out", required=True)
  parser.add_argument("--scenes", type=int, default=500)
  parser.add_argument("--seed", type=int, default=500)
  parser.add_argument("--vae", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.dirname(os.path.abspath(__file__)))), "checkpoints", "shapes", "vae.npz"))
  args = parser.parse_args()
  for task, path in write_split(args.out, args.scenes, args.seed, args.vae).items():
    print(f"{task}: {path}")
