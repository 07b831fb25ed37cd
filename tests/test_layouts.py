"""The weight layouts (`model/layouts.py`), and the plain model against the speed paths that
read them (`backends/`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import bv_fixtures
from tests.conftest import SPEC_NAMES, spec_config
from paligemma_jax.ckpt import checkpoint
import contextlib

from paligemma_jax.backends import cpu, out_major as out_major_backend
from paligemma_jax.model import layouts, paligemma


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("out_major", [False, True])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_unstacked_tree_shapes_and_exact_round_trip(name, out_major):
  spec = bv_fixtures.SPECS[name]
  config = spec_config(spec)
  params = paligemma.init_params(config, seed=3)
  inference = _flat(layouts.unstacked(params, out_major=out_major))
  stacked = _flat(params)
  towers = {"llm/layers": config.llm.depth, "img/Transformer/encoderblock": config.vit.depth}
  assert not any(k.startswith(tuple(t + "/" for t in towers)) for k in inference)
  for key, value in stacked.items():
    tower = next((t for t in towers if key.startswith(t + "/")), None)
    if tower is None:
      assert inference[key] is value  # nothing but the layers of the two towers changes
      continue
    name_in_layer = key[len(tower) + 1:]
    for i in range(towers[tower]):
      perm = layouts.OUT_MAJOR.get(name_in_layer) if out_major and tower == "llm/layers" else None
      got = inference[f"{tower}_{i}/{name_in_layer}" + (layouts.OUT_MAJOR_SUFFIX if perm else "")]
      want = np.asarray(value[i]) if perm is None else np.transpose(np.asarray(value[i]), perm)
      assert got.shape == want.shape
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{key} layer {i}")
  back = _flat(layouts.stacked(layouts.unstacked(params, out_major=out_major)))
  assert set(back) == set(stacked)
  for key in stacked:
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(stacked[key]), err_msg=key)


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  s = config.image_size
  images = jnp.asarray(rng.uniform(-1, 1, (2, s, s, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(3, config.llm.vocab_size, (2, 9)), jnp.int32)
  mask_ar = jnp.asarray([[0] * 6 + [1] * 3] * 2, jnp.int32)
  return images, text, mask_ar


def test_plain_model_init_builds_the_per_layer_tree():
  config = spec_config(bv_fixtures.SPECS["pg2_gqa"])
  params = paligemma.init_params(config)
  fresh = paligemma.PaliGemma(config, scan_layers=False).init(
      jax.random.PRNGKey(0), *_inputs(config))["params"]
  want = {k: v.shape for k, v in _flat(layouts.unstacked(params)).items()}
  assert {k: v.shape for k, v in _flat(fresh).items()} == want


@pytest.mark.parametrize("backend", ["out_major", "cpu"])
@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa", "mha"])
def test_backends_on_the_out_major_tree_equal_the_plain_model(name, backend):
  """The out-major tree is read only under a backend's interceptor; its logits equal the
  plain model's on big_vision's tree (float32, 1e-5 of the largest), and without the
  interceptor the plain model refuses the tree (it finds no `w`)."""
  config = spec_config(bv_fixtures.SPECS[name])
  params = paligemma.init_params(config, seed=4)
  inputs = _inputs(config)
  want = np.asarray(paligemma.PaliGemma(config).apply({"params": params}, *inputs)[0])
  tree = layouts.unstacked(params, out_major=True)
  model = paligemma.PaliGemma(config, scan_layers=False)
  install = cpu.install if backend == "cpu" else out_major_backend.install
  with install():
    got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, *inputs)[0])(tree))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  with pytest.raises(Exception, match="w"):
    model.apply({"params": tree}, *inputs)


def test_consume_drops_the_stacked_layers_from_the_input():
  config = spec_config(bv_fixtures.SPECS["pg1_mqa"])
  params = paligemma.init_params(config)
  kept = layouts.unstacked(params)
  assert "layers" in params["llm"] and "layers_0" in kept["llm"]
  assert "encoderblock" in params["img"]["Transformer"]
  assert "encoderblock_0" in kept["img"]["Transformer"]
  layouts.unstacked(params, consume=True)
  # No reference left to keep the stacked arrays alive:
  assert "layers" not in params["llm"] and "encoderblock" not in params["img"]["Transformer"]


def test_save_npz_of_an_inference_tree_writes_big_vision_layout(tmp_path):
  spec = bv_fixtures.SPECS["pg2_gqa"]
  params = paligemma.init_params(spec_config(spec), seed=1)
  path = tmp_path / "ckpt.npz"
  checkpoint.save_npz(path, layouts.unstacked(params, out_major=True))
  loaded = checkpoint.load_npz(path)
  for key, want in _flat(params).items():
    np.testing.assert_array_equal(np.asarray(_flat(loaded.params)[key]), np.asarray(want))


def _decode_step_jaxpr(config, cache_dtype, install=contextlib.nullcontext):
  """The jaxpr of one decode step (`PaliGemma.extend`) on the tree the context reads."""
  params = layouts.unstacked(paligemma.init_params(config), out_major=install is not
                             contextlib.nullcontext)
  model = paligemma.PaliGemma(config, scan_layers=False)
  cache = paligemma.gemma_lib.init_cache(config.llm, 2, 32, cache_dtype)
  tokens, positions = jnp.ones((2,), jnp.int32), jnp.full((2,), 5, jnp.int32)
  valid = jnp.ones((2, 32), bool)
  with install():
    return str(jax.make_jaxpr(lambda p, c: model.apply(
        {"params": p}, tokens, positions, c, valid, 5, method=paligemma.PaliGemma.extend))(
            params, cache))


def test_the_plain_model_holds_no_backend_path():
  """No optimization barrier, no integer view of the cache, no kernel call in the plain
  model's decode step; the CPU backend brings each of them."""
  config = spec_config(bv_fixtures.SPECS["pg1_mqa"])
  plain = _decode_step_jaxpr(config, jnp.bfloat16)
  for word in ("optimization_barrier", "bitcast_convert_type", "ffi_call", "custom_call"):
    assert word not in plain, word
  with_cpu = _decode_step_jaxpr(config, jnp.bfloat16, cpu.install)
  assert "optimization_barrier" in with_cpu and "bitcast_convert_type" in with_cpu


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_cpu_product_equals_matmul(rows):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((rows, 384)).astype(np.float32)
  w = rng.standard_normal((200, 384)).astype(np.float32)
  got = np.asarray(jax.jit(cpu.product)(jnp.asarray(x), jnp.asarray(w)))
  want = x.astype(np.float64) @ w.T.astype(np.float64)
  assert got.shape == (rows, 200)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_cpu_cache_write_is_exact_and_in_place(dtype):
  """cpu.write_cache writes what dynamic_update_slice writes, and XLA's CPU backend never
  widens a 16-bit cache to float32 to do it (which copies the whole stacked cache)."""
  shape = (4, 2, 64, 1, 32)  # (L, B, S, K, H)
  cache = jnp.asarray(np.random.default_rng(0).standard_normal(shape) * 8).astype(dtype)
  new = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 1, 1, 32)) * 8, jnp.float32)
  write = jax.jit(lambda c, n, i: cpu.write_cache(c, n, (2, 0, i, 0, 0)), donate_argnums=0)
  want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (2, 0, 5, 0, 0))
  hlo = write.lower(cache, new, 5).compile().as_text()
  got = write(jnp.array(cache), new, 5)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  whole = ",".join(map(str, shape))
  assert f"f32[{whole}]" not in hlo or dtype == jnp.float32, "the cache was widened to float32"


@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_accelerator_product_is_one_plain_dot(rows, dtype):
  """On one accelerator (`out_major.plain_product`) the product is one dot with no layout
  barriers and no CPU kernel, and gives the CPU path's values."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((rows, 384)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((200, 384)), dtype)
  on_cpu = np.asarray(jax.jit(cpu.product)(x, w))
  jaxpr = str(jax.make_jaxpr(out_major_backend.plain_product)(x, w))
  assert jaxpr.count("dot_general") == 1
  assert "optimization_barrier" not in jaxpr and "ffi" not in jaxpr and "custom_call" not in jaxpr
  off_cpu = np.asarray(jax.jit(out_major_backend.plain_product)(x, w))
  assert off_cpu.shape == (rows, 200) and off_cpu.dtype == np.float32
  np.testing.assert_allclose(off_cpu, on_cpu, rtol=0, atol=1e-5 * np.abs(on_cpu).max())


@pytest.mark.parametrize("out_major", [False, True])
def test_load_npz_unstack_gives_the_inference_tree(ckpt_path, out_major):
  """Splitting both towers off the memory-mapped members gives `unstacked`'s tree exactly."""
  path = ckpt_path("pg2_gqa")
  direct = _flat(checkpoint.load_npz(path, unstack=True, out_major=out_major).params)
  want = _flat(layouts.unstacked(checkpoint.load_npz(path).params, out_major=out_major))
  assert set(direct) == set(want)
  assert any(k.startswith("img/Transformer/encoderblock_0/") for k in direct)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(direct[key]), np.asarray(value), err_msg=key)
