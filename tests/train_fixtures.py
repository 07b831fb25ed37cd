"""A tiny transfer run: images, a JSONL, an init checkpoint in big_vision's layout and the
settings that train on them (`settings`), for the trainer's tests and benchmarks."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from tests import bv_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ("a cat sitting on a red sofa", "two dogs running on the beach",
            "a plate of food with rice", "a man riding a bicycle", "a small boat on a calm lake",
            "a bowl of fruit", "a group of children playing football", "the quick brown fox")


def write_data(folder, n: int = 4, prefix: str = "caption en", name: str = "train.jsonl",
               seed: int = 0) -> str:
  """n distinct random pictures with captions -> the JSONL's path (images relative to it)."""
  folder = os.fspath(folder)
  os.makedirs(os.path.join(folder, "img"), exist_ok=True)
  rng = np.random.default_rng(seed)
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    for i in range(n):
      picture = f"img/{name.split('.')[0]}_{i}.png"
      Image.fromarray(rng.integers(0, 255, (40 + i, 60, 3), dtype=np.uint8)).save(
          os.path.join(folder, picture))
      f.write(json.dumps({"image": picture, "prefix": prefix,
                          "suffix": CAPTIONS[i % len(CAPTIONS)]}) + "\n")
  return path


def write_init(folder, spec: str = "pg2_gqa", seed: int = 0) -> str:
  path = os.path.join(os.fspath(folder), f"init_{spec}.npz")
  if not os.path.exists(path):
    bv_fixtures.write_npz(path, bv_fixtures.make_params(bv_fixtures.SPECS[spec], seed=seed))
  return path


def settings(folder, tokenizer_path: str, spec: str = "pg2_gqa", n: int = 4, **overrides) -> dict:
  """Config fields for a run on fresh data in `folder` (a few steps, no warmup, float32)."""
  s = dict(init=write_init(folder, spec), tokenizer=tokenizer_path,
           train_data=write_data(folder, n), text_len=16, batch_size=4, total_steps=4,
           warmup_steps=0, lr=1e-3, ckpt_steps=2, eval_steps=2, remat_policy="nothing_saveable")
  if spec == "pg2_wh":
    s["model.query_scale"] = "width_over_heads"
  s.update(overrides)
  return s


def config(fields: dict):
  """configs/transfer.py with `fields` set (dotted names for nested ones)."""
  spec = importlib.util.spec_from_file_location(
      "transfer_config", os.path.join(REPO, "configs", "transfer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key, value in fields.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def train_command(workdir, fields: dict, *extra) -> list:
  return [sys.executable, "-m", "paligemma_jax.train", f"--workdir={workdir}", "--noprogress",
          *[f"--config.{k}={v}" for k, v in fields.items()], *extra]


def run_cli(workdir, fields: dict, *extra, env=None, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, fields, *extra), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
