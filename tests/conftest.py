"""Shared fixtures: tiny big_vision checkpoints (written by bv_fixtures, not by the model
code), a tiny sentencepiece tokenizer with the loc/seg pieces, and a test image."""

import numpy as np
import pytest

from tests import bv_fixtures
from paligemma_jax.data.tokenizer import Tokenizer, train_tiny_tokenizer  # noqa: E402
from tests.specs import spec_config  # noqa: E402,F401 (tests import it from here)

SPEC_NAMES = tuple(bv_fixtures.SPECS)


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def flat_params():
  """spec name -> float32 flat arrays (keys without params/)."""
  return {name: bv_fixtures.make_params(spec, seed=i) for i, (name, spec)
          in enumerate(bv_fixtures.SPECS.items())}


@pytest.fixture(scope="session")
def ckpt_path(fixture_dir, flat_params):
  """ckpt_path(spec_name, dtype='float32', prefix='params/', compressed=False) -> path."""
  written = {}

  def get(name, dtype="float32", prefix="params/", compressed=False):
    key = (name, dtype, prefix, compressed)
    if key not in written:
      tag = f"{name}_{dtype}_{'p' if prefix else 'np'}{'_z' if compressed else ''}.npz"
      written[key] = bv_fixtures.write_npz(fixture_dir / tag, flat_params[name], dtype,
                                           prefix=prefix, compressed=compressed)
    return written[key]
  return get


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  return Tokenizer(train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="session")
def test_image():
  """A deterministic 300x200 RGB uint8 picture with structure (not noise only)."""
  rng = np.random.default_rng(7)
  y, x = np.mgrid[0:200, 0:300]
  img = np.stack([x * 255 // 300, y * 255 // 200, (x + y) % 256], -1).astype(np.float64)
  img += rng.normal(0, 20, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def spec_pipeline(name: str, tokenizer, seed: int = 0, edit=None, **kw):
  """A pipeline on `bv_fixtures.make_params(SPECS[name], seed)` (`edit(flat)` may change the
  arrays first); float32 KV cache unless kw says otherwise."""
  from flax import traverse_util
  import jax.numpy as jnp
  from paligemma_jax.pipeline import PaliGemmaPipeline
  spec = bv_fixtures.SPECS[name]
  flat = bv_fixtures.make_params(spec, seed=seed)
  if edit:
    edit(flat)
  params = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")
  return PaliGemmaPipeline(spec_config(spec), params, tokenizer,
                           **{"cache_dtype": "float32", **kw})


def demo_pipeline(tokenizer, **kw):
  """A pipeline on the embedded demo's architecture (random weights, seed 0); float32 KV cache
  unless kw says otherwise."""
  from paligemma_jax import demo
  from paligemma_jax.model import paligemma
  from paligemma_jax.pipeline import PaliGemmaPipeline
  config = demo.demo_config()
  return PaliGemmaPipeline(config, paligemma.init_params(config, seed=0), tokenizer,
                           **{"cache_dtype": "float32", **kw})


@pytest.fixture(scope="session")
def demo_pipe(tokenizer):
  return demo_pipeline(tokenizer)


@pytest.fixture(scope="session")
def pg2_pipe(tokenizer):
  """PaliGemma 2 (GQA, softcaps) at the fixtures' tiny sizes, float32 cache."""
  return spec_pipeline("pg2_gqa", tokenizer, seed=3)


def spec_overrides(spec) -> dict:
  """What a user would put in configs/ for settings no shape tells (the 27B query scale)."""
  return {"query_scale": spec["query_pre_attn_norm"]}


def pytest_terminal_summary(terminalreporter):
  """Names the reference oracles' versions under the results (pinned in pyproject.toml)."""
  from importlib import metadata
  found = []
  for name in ("torch", "transformers", "jax", "flax"):
    try:
      found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      found.append(f"{name} (not installed)")
  terminalreporter.write_line("versions: " + ", ".join(found))
