"""The embedded default's recipe: the shapes data set (`data/shapes.py`) with segmentation
codes from the shipped VQ-VAE, and its tokenizer.

A data setting `shapes:NUM_SCENES:SEED` (e.g. `--config.train_data=shapes:6000:0`) is written
once into a cache folder and then read like any JSONL.
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


def prepare(spec: str, cache_dir: str, vae_path: str) -> str:
  """`shapes:NUM:SEED` -> the path of its JSONL (all tasks), written on first use."""
  try:
    num, seed = (int(x) for x in spec[len(PREFIX):].split(":"))
  except ValueError:
    raise ValueError(f"{spec!r}: expected shapes:NUM_SCENES:SEED, e.g. shapes:6000:0") from None
  folder = os.path.join(os.path.expanduser(cache_dir), f"shapes_{num}_{seed}")
  done = os.path.join(folder, "data.jsonl")
  if os.path.exists(done):
    return done
  params = vqvae.load_vae(vae_path, parts=("encoder",))
  encode = lambda masks: vqvae.encode_masks(params, (np.asarray(masks) + 1) / 2)
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=os.path.dirname(folder))
  shapes.write(tmp, num, seed, encode)
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  return done


def write_split(out: str, num_scenes: int, seed: int, vae_path: str) -> dict:
  """Fresh scenes as JSONL files, all tasks and one per task (`shapes.write`) -> paths."""
  params = vqvae.load_vae(vae_path, parts=("encoder",))
  encode = lambda masks: vqvae.encode_masks(params, (np.asarray(masks) + 1) / 2)
  return shapes.write(out, num_scenes, seed, encode)


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
