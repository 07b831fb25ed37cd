"""Orbax checkpoints: big_vision trees in and out (bit-identical, atomic, refused when
unfinished), Gemma releases + a big_vision vision tower, restores straight onto a 2x4 mesh.

The mesh checks (`check_*`) run in a child pytest on 8 CPU devices (see test_sharding.py).
"""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import traverse_util

from tests import bv_fixtures
from tests.conftest import spec_overrides
from tests.multidevice import INNER, MESH_SPEC, export_checks, make_outer_test, report_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def write_gemma_release(path, flat, *, transpose_gating, pad_rows=128):
  """The language model of `flat` (big_vision names) as a Gemma release holds it.

  Written here, independently of the loader, after google-deepmind/gemma's params.py: one
  subtree per layer `transformer/layer_{i}/<module>` -> {param: array}; the MLP weights in
  their own einsum modules (`mlp/gating_einsum` -> {"w"}, `mlp/linear` -> {"w"});
  `transformer/embedder` -> {"input_embedding"} with `pad_rows` unused rows;
  `transformer/final_norm` -> {"scale"}; gating stored (2, F, D) when `transpose_gating`.
  """
  import orbax.checkpoint as ocp
  depth = flat["llm/layers/pre_attention_norm/scale"].shape[0]
  tree = {}
  for key, value in flat.items():
    if not key.startswith("llm/"):
      continue
    module, param = key[len("llm/"):].rsplit("/", 1)
    if module == "layers/mlp":
      module, param = f"layers/mlp/{param}", "w"
    if module.startswith("layers/"):
      for i in range(depth):
        layer = value[i]
        if module == "layers/mlp/gating_einsum" and transpose_gating:
          layer = np.swapaxes(layer, -1, -2)
        tree.setdefault(f"transformer/layer_{i}/{module[len('layers/'):]}", {})[param] = layer
    else:
      if key == "llm/embedder/input_embedding":
        pad = np.random.default_rng(1).normal(0, 0.02, (pad_rows, value.shape[1]))
        value = np.concatenate([value, pad.astype(value.dtype)])
      tree.setdefault(f"transformer/{module}", {})[param] = value
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree)
  return str(path)


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory, ckpt_path):
  """pg2_gqa: its bfloat16 npz read as float32, saved with orbax_io.save."""
  from paligemma_jax.ckpt import checkpoint, orbax_io
  loaded = checkpoint.load_npz(ckpt_path("pg2_gqa", "bfloat16"))
  return orbax_io.save(tmp_path_factory.mktemp("orbax") / "pg2_gqa", loaded.params)


# ---------------------------------------------------------------------------
# One device.

def test_round_trip_is_bit_identical(orbax_dir, ckpt_path):
  import jax.numpy as jnp
  from paligemma_jax.ckpt import checkpoint, orbax_io
  npz = checkpoint.load_npz(ckpt_path("pg2_gqa", "bfloat16"))
  back = orbax_io.load(orbax_dir)
  assert back.config == npz.config
  a, b = _flat(npz.params), _flat(back.params)
  assert set(a) == set(b)
  for key in a:
    assert b[key].dtype == a[key].dtype and b[key].shape == a[key].shape, key
    np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=key)
  # Read as bfloat16: the same values as the bfloat16 file read as bfloat16.
  b16, ref16 = orbax_io.load(orbax_dir, dtype=jnp.bfloat16), checkpoint.load_npz(
      ckpt_path("pg2_gqa", "bfloat16"), dtype=jnp.bfloat16)
  for key, x in _flat(b16.params).items():
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x), np.asarray(_flat(ref16.params)[key]))


def test_interrupted_save_is_never_loaded(tmp_path, ckpt_path, tokenizer):
  """A process killed (SIGKILL) at orbax's commit point leaves only the temporary directory."""
  from paligemma_jax.ckpt import orbax_io
  from paligemma_jax.ckpt.checkpoint import CheckpointError
  from paligemma_jax.pipeline import PaliGemmaPipeline
  target = tmp_path / "ckpt"
  script = textwrap.dedent(f"""
      import os, signal, sys
      from orbax.checkpoint._src.path import atomicity
      from paligemma_jax.ckpt import checkpoint, orbax_io
      async def die(self):  # every array is written; the commit (marker + rename) never runs
        os.kill(os.getpid(), signal.SIGKILL)
      atomicity.AtomicRenameTemporaryPath.finalize = die
      orbax_io.save({str(target)!r}, checkpoint.load_npz({ckpt_path("pg1_mqa")!r}).params)
      print("save returned")
      """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
  assert "save returned" not in r.stdout
  assert not target.exists()
  [partial] = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt" + orbax_io.TMP_SUFFIX)]
  assert any(partial.rglob("*"))  # it holds data, yet:
  with pytest.raises(CheckpointError, match="unfinished Orbax save"):
    orbax_io.load(partial)
  with pytest.raises(CheckpointError, match="unfinished Orbax save"):
    PaliGemmaPipeline.from_files(str(partial), tokenizer.path)
  with pytest.raises(CheckpointError, match="no such checkpoint; found only the unfinished save"):
    orbax_io.load(target)
  r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), f"--ckpt={target}",
                      f"--tokenizer={tokenizer.path}"], capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path)), timeout=300)
  assert r.returncode == 2 and "found only the unfinished save" in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_directory_without_commit_marker_is_refused(tmp_path, orbax_dir):
  from paligemma_jax.ckpt import orbax_io
  from paligemma_jax.ckpt.checkpoint import CheckpointError
  copy = tmp_path / "copy"
  shutil.copytree(orbax_dir, copy)
  (copy / orbax_io.COMMIT_MARKER).unlink()
  with pytest.raises(CheckpointError, match="no Orbax commit marker 'commit_success.txt'"):
    orbax_io.load(copy)
  assert orbax_io.load(copy, require_commit_marker=False).config.llm.post_norms
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(CheckpointError, match="not an Orbax checkpoint directory"):
    orbax_io.load(empty)
  with pytest.raises(CheckpointError, match="already exists"):
    orbax_io.save(orbax_dir, {})


@pytest.mark.parametrize("name, transpose_gating, img_only", [
    ("pg2_gqa", True, False),    # Gemma 2: post-norms, GQA kv_einsum, gating stored (2, F, D)
    ("mha", False, True),        # Gemma 1 7B style: qkv_einsum; gating (2, D, F); img-only npz
    ("pg1_mqa", False, False),   # Gemma 1 2B style: MQA
])
def test_gemma_release_plus_vision_tower(name, transpose_gating, img_only, tmp_path, flat_params,
                                         ckpt_path):
  """Same arrays, hence the same logits, as the big_vision npz of the same model."""
  import jax
  import jax.numpy as jnp
  from paligemma_jax.ckpt import checkpoint, orbax_io
  from paligemma_jax.model import paligemma
  flat = flat_params[name]
  gemma_dir = write_gemma_release(tmp_path / "gemma", flat, transpose_gating=transpose_gating)
  img_npz = bv_fixtures.write_npz(tmp_path / "img.npz", {k: v for k, v in flat.items()
                                                         if k.startswith("img/")}) \
      if img_only else ckpt_path(name)
  overrides = spec_overrides(bv_fixtures.SPECS[name])
  got = orbax_io.load_gemma_orbax(gemma_dir, img_npz, overrides=overrides, pad_rows=128)
  ref = checkpoint.load_npz(ckpt_path(name), overrides=overrides)
  assert got.config == ref.config
  a, b = _flat(ref.params), _flat(got.params)
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=key)
  if name != "pg2_gqa":
    return
  model = paligemma.PaliGemma(ref.config)
  s = ref.config.image_size
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, s, s, 3)), jnp.float32)
  text = jnp.asarray([[2, 40, 41, 42, 108, 300, 301]], jnp.int32)
  mask_ar = jnp.asarray([[0, 0, 0, 0, 0, 1, 1]], jnp.int32)
  forward = jax.jit(lambda p: model.apply({"params": p}, images, text, mask_ar)[0])
  np.testing.assert_array_equal(np.asarray(forward(got.params)), np.asarray(forward(ref.params)))


def test_gemma_release_errors(tmp_path, flat_params, ckpt_path):
  from paligemma_jax.ckpt import orbax_io
  from paligemma_jax.ckpt.checkpoint import CheckpointError
  flat = dict(flat_params["pg1_mqa"])
  gemma_dir = write_gemma_release(tmp_path / "gemma", flat, transpose_gating=False)
  vocab = bv_fixtures.SPECS["pg1_mqa"]["vocab"]
  with pytest.raises(CheckpointError, match="cannot drop"):
    orbax_io.load_gemma_orbax(gemma_dir, ckpt_path("pg1_mqa"), pad_rows=10**6)
  # Extra rows (PaliGemma's loc/seg tokens over Gemma's vocabulary) are drawn, as big_vision.
  got = orbax_io.load_gemma_orbax(gemma_dir, ckpt_path("pg1_mqa"), pad_rows=128 + 64,
                                  min_vocab_size=vocab)
  emb = np.asarray(got.params["llm"]["embedder"]["input_embedding"])
  np.testing.assert_array_equal(emb[:vocab - 64], flat["llm/embedder/input_embedding"][:-64])
  assert 0.015 < emb[vocab - 64:].std() < 0.025
  no_img = bv_fixtures.write_npz(tmp_path / "llm.npz", {k: v for k, v in flat.items()
                                                        if k.startswith("llm/")})
  with pytest.raises(CheckpointError, match="no 'img/...' arrays"):
    orbax_io.load_gemma_orbax(gemma_dir, no_img, pad_rows=128)
  broken = tmp_path / "broken"
  write_gemma_release(broken, {k: v for k, v in flat.items() if "final_norm" not in k},
                      transpose_gating=False)
  with pytest.raises(CheckpointError, match="final_norm"):
    orbax_io.load_gemma_orbax(broken, ckpt_path("pg1_mqa"), pad_rows=128)


def test_main_saves_orbax_from_a_mesh_and_loads_it_back(tmp_path, tokenizer):
  """main.py --mesh=2x4 --save_orbax on 8 CPU devices; the directory then serves --ckpt."""
  import json
  from paligemma_jax.ckpt import checkpoint, orbax_io
  from paligemma_jax.data.image import load_image
  from paligemma_jax.pipeline import PaliGemmaPipeline
  npz = bv_fixtures.write_npz(tmp_path / "small.npz", bv_fixtures.make_params(MESH_SPEC, 2))
  out, saved = tmp_path / "a.json", tmp_path / "saved"
  image = os.path.join(REPO, "assets", "demo.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run(
      [sys.executable, os.path.join(REPO, "main.py"), f"--ckpt={npz}",
       f"--tokenizer={tokenizer.path}", f"--image={image}", "--max_decode_len=6",
       "--mesh=2x4", f"--save_orbax={saved}", f"--output_json={out}",
       "--config.cache_dtype=float32", "--config.compilation_cache_dir="],
      capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"wrote {saved}" in r.stdout
  ref = checkpoint.load_npz(npz)
  back = orbax_io.load(saved)
  for key, x in _flat(ref.params).items():
    np.testing.assert_array_equal(np.asarray(_flat(back.params)[key]), np.asarray(x))
  pipe = PaliGemmaPipeline.from_files(str(saved), tokenizer.path, cache_dtype="float32")
  [answer] = pipe.generate([load_image(image)], ["caption en"], max_decode_len=6)
  assert json.loads(out.read_text())["tokens"] == answer.tokens


# ---------------------------------------------------------------------------
# 2x4 mesh on 8 devices.

def _mesh_2x4():
  from paligemma_jax import sharding
  mesh = sharding.make_mesh(2, 4)
  assert mesh.devices.size == 8
  return mesh


def _assert_on_mesh(params, mesh, reference):
  """Rule shardings, 1/N of every split array per device, values equal to `reference`."""
  import jax
  from paligemma_jax import sharding
  expected = 0
  flat = _flat(params)
  assert set(flat) == set(reference)
  for key, x in flat.items():
    spec = sharding.param_spec(key, x.shape, mesh)
    assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim), key
    parts = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
    assert {s.data.size for s in x.addressable_shards} == {x.size // parts}, key
    expected += x.nbytes // parts
    np.testing.assert_array_equal(np.asarray(x), reference[key], err_msg=key)
  assert set(sharding.per_device_bytes(flat).values()) == {expected}
  whole = sum(x.nbytes for x in flat.values())
  assert expected < whole / 3  # a device holds far less than the model


def _no_whole_copies(params):
  """No live array anywhere is an unsplit, single-device copy of a split parameter.

  Run right after loading: reading shards (`.addressable_shards[i].data`, `np.asarray`)
  creates single-device views of the shards, which could share a shape with a parameter.
  """
  import gc
  import jax
  gc.collect()
  leaves = _flat(params).values()
  mine = {id(x) for x in leaves}
  split = {tuple(x.shape) for x in leaves if not x.sharding.is_fully_replicated}
  for a in jax.live_arrays():
    if id(a) not in mine and tuple(a.shape) in split:
      assert not a.sharding.is_fully_replicated, (a.shape, a.sharding)


def check_orbax_restores_sharded_onto_2x4(tmp_path, ckpt_path):
  import gc
  from paligemma_jax.ckpt import checkpoint, orbax_io
  loaded = checkpoint.load_npz(ckpt_path("pg2_gqa", "bfloat16"))
  reference = {k: np.array(v, copy=True) for k, v in _flat(loaded.params).items()}
  path = orbax_io.save(tmp_path / "ck", loaded.params)
  del loaded
  gc.collect()
  mesh = _mesh_2x4()
  restored = orbax_io.load(path, mesh=mesh)
  _no_whole_copies(restored.params)
  _assert_on_mesh(restored.params, mesh, reference)


def check_gemma_release_restores_sharded_onto_2x4(tmp_path, flat_params, ckpt_path):
  import gc
  from paligemma_jax.ckpt import orbax_io
  flat = flat_params["pg2_gqa"]
  gemma_dir = write_gemma_release(tmp_path / "gemma", flat, transpose_gating=True)
  gc.collect()
  mesh = _mesh_2x4()
  got = orbax_io.load_gemma_orbax(gemma_dir, ckpt_path("pg2_gqa"), mesh=mesh, pad_rows=128)
  gc.collect()
  _no_whole_copies(got.params)
  _assert_on_mesh(got.params, mesh, flat)


def check_npz_loads_sharded_onto_2x4(ckpt_path, flat_params):
  from paligemma_jax.ckpt import orbax_io
  mesh = _mesh_2x4()
  got = orbax_io.load(ckpt_path("mha", "float16"), mesh=mesh)
  reference = {k: v.astype(np.float16).astype(np.float32) for k, v in flat_params["mha"].items()}
  _no_whole_copies(got.params)
  _assert_on_mesh(got.params, mesh, reference)


if INNER:
  export_checks(globals())
else:
  test_on_8_devices = make_outer_test(__file__, report_ids(globals()))


def test_cli_gemma_release_plus_vision_tower_answers_as_the_npz(tmp_path, flat_params,
                                                                 ckpt_path, tokenizer):
  """main.py --ckpt=<Gemma release> --img_ckpt=<npz>: the same greedy tokens as the npz."""
  import json
  gemma_dir = write_gemma_release(tmp_path / "gemma", dict(flat_params["pg1_mqa"]),
                                  transpose_gating=False)
  answers = {}
  for name, ckpt_args in {"npz": [f"--ckpt={ckpt_path('pg1_mqa')}"],
                          "release": [f"--ckpt={gemma_dir}",
                                      f"--img_ckpt={ckpt_path('pg1_mqa')}"]}.items():
    out = tmp_path / f"{name}.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *ckpt_args,
                        f"--tokenizer={tokenizer.path}", "--max_decode_len=8",
                        "--config.cache_dtype=float32", f"--output_json={out}"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    answers[name] = json.loads(out.read_text())["tokens"]
  assert len(answers["npz"]) > 0 and answers["release"] == answers["npz"]
