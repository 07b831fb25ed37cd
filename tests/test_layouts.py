"""The inference trees (`paligemma.unstacked`) and the CPU-layout products they run on."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import bv_fixtures
from tests.conftest import SPEC_NAMES, spec_config
from paligemma_jax import checkpoint, gemma, paligemma


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("out_major", [False, True])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_unstacked_tree_shapes_and_exact_round_trip(name, out_major):
  spec = bv_fixtures.SPECS[name]
  config = spec_config(spec)
  params = paligemma.init_params(config, seed=3)
  inference = _flat(paligemma.unstacked(params, out_major=out_major))
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
      perm = gemma.OUT_MAJOR.get(name_in_layer) if out_major and tower == "llm/layers" else None
      got = inference[f"{tower}_{i}/{name_in_layer}" + (gemma.OUT_MAJOR_SUFFIX if perm else "")]
      want = np.asarray(value[i]) if perm is None else np.transpose(np.asarray(value[i]), perm)
      assert got.shape == want.shape
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{key} layer {i}")
  back = _flat(paligemma.stacked(paligemma.unstacked(params, out_major=out_major)))
  assert set(back) == set(stacked)
  for key in stacked:
    np.testing.assert_array_equal(np.asarray(back[key]), np.asarray(stacked[key]), err_msg=key)


def test_model_init_builds_the_inference_tree_it_reads():
  config = spec_config(bv_fixtures.SPECS["pg2_gqa"])
  params = paligemma.init_params(config)
  for kw in (dict(out_major=False), dict(out_major=True)):
    s = config.image_size
    fresh = paligemma.PaliGemma(config, scan_layers=False, **kw).init(
        jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, 2), jnp.int32))["params"]
    want = {k: v.shape for k, v in _flat(paligemma.unstacked(params, **kw)).items()}
    assert {k: v.shape for k, v in _flat(fresh).items()} == want


def test_consume_drops_the_stacked_layers_from_the_input():
  config = spec_config(bv_fixtures.SPECS["pg1_mqa"])
  params = paligemma.init_params(config)
  kept = paligemma.unstacked(params)
  assert "layers" in params["llm"] and "layers_0" in kept["llm"]
  assert "encoderblock" in params["img"]["Transformer"]
  assert "encoderblock_0" in kept["img"]["Transformer"]
  paligemma.unstacked(params, consume=True)
  # No reference left to keep the stacked arrays alive:
  assert "layers" not in params["llm"] and "encoderblock" not in params["img"]["Transformer"]


def test_save_npz_of_an_inference_tree_writes_big_vision_layout(tmp_path):
  spec = bv_fixtures.SPECS["pg2_gqa"]
  params = paligemma.init_params(spec_config(spec), seed=1)
  path = tmp_path / "ckpt.npz"
  checkpoint.save_npz(path, paligemma.unstacked(params, out_major=True))
  loaded = checkpoint.load_npz(path)
  for key, want in _flat(params).items():
    np.testing.assert_array_equal(np.asarray(_flat(loaded.params)[key]), np.asarray(want))


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("shape", [(2, 1024, 512), (1, 2048, 256), (3, 64, 32), (1, 1000, 300)])
def test_contract_stored_equals_einsum(rows, shape):
  """Chunked (rows <= 16 and big blocks: the first two shapes split 4 ways) or not."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((rows, shape[1])).astype(np.float32)
  w = rng.standard_normal(shape).astype(np.float32)
  got = np.asarray(gemma.contract_stored(jnp.asarray(x), jnp.asarray(w)))
  want = np.einsum("xi,gio->xgo", x.astype(np.float64), w.astype(np.float64))
  assert got.shape == (rows, shape[0], shape[2])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 8, 40])
def test_contract_out_major_equals_matmul(rows):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((rows, 384)).astype(np.float32)
  w = rng.standard_normal((200, 384)).astype(np.float32)
  got = np.asarray(jax.jit(gemma.contract_out_major)(jnp.asarray(x), jnp.asarray(w)))
  want = x.astype(np.float64) @ w.T.astype(np.float64)
  assert got.shape == (rows, 200)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.int32])
def test_cache_update_is_exact_and_in_place(dtype):
  """update_in_place writes what dynamic_update_slice writes, and XLA's CPU backend never
  widens a 16-bit cache to float32 to do it (which copies the whole stacked cache)."""
  shape = (4, 2, 64, 1, 32)  # (L, B, S, K, H)
  cache = jnp.asarray(np.random.default_rng(0).standard_normal(shape) * 8).astype(dtype)
  new = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 1, 1, 32)) * 8, jnp.float32)
  write = jax.jit(lambda c, n, i: gemma.update_in_place(c, n, (2, 0, i, 0, 0)), donate_argnums=0)
  want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (2, 0, 5, 0, 0))
  hlo = write.lower(cache, new, 5).compile().as_text()
  got = write(jnp.array(cache), new, 5)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  whole = ",".join(map(str, shape))
  assert f"f32[{whole}]" not in hlo or dtype == jnp.float32, "the cache was widened to float32"


@pytest.mark.parametrize("rows", [1, 8, 40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_contract_out_major_off_the_cpu_is_one_plain_product(rows, dtype, monkeypatch):
  """On an accelerator (backend patched here) the product is one dot with no layout barriers
  and no CPU kernel, and gives the CPU path's values."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((rows, 384)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((200, 384)), dtype)
  on_cpu = np.asarray(jax.jit(gemma.contract_out_major)(x, w))
  monkeypatch.setattr(gemma, "on_cpu", lambda: False)
  product = lambda x, w: gemma.contract_out_major(x, w)  # new function: jax's caches miss
  jaxpr = str(jax.make_jaxpr(product)(x, w))
  assert jaxpr.count("dot_general") == 1
  assert "optimization_barrier" not in jaxpr and "ffi" not in jaxpr and "custom_call" not in jaxpr
  off_cpu = np.asarray(jax.jit(product)(x, w))
  assert off_cpu.shape == (rows, 200) and off_cpu.dtype == np.float32
  np.testing.assert_allclose(off_cpu, on_cpu, rtol=0, atol=1e-5 * np.abs(on_cpu).max())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_cache_update_off_the_cpu_is_a_plain_update(dtype, monkeypatch):
  """Off the CPU no integer view is taken (only XLA:CPU widens a 16-bit update); the values
  are those of dynamic_update_slice."""
  cache = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, 16, 1, 8)), dtype)
  new = jnp.asarray(np.random.default_rng(1).standard_normal((1, 1, 1, 1, 8)), jnp.float32)
  monkeypatch.setattr(gemma, "on_cpu", lambda: False)
  write = lambda c, n: gemma.update_in_place(c, n, (1, 0, 7, 0, 0))
  assert "bitcast_convert_type" not in str(jax.make_jaxpr(write)(cache, new))
  want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (1, 0, 7, 0, 0))
  np.testing.assert_array_equal(np.asarray(jax.jit(write)(cache, new)), np.asarray(want))


@pytest.mark.parametrize("out_major", [False, True])
def test_load_npz_unstack_gives_the_inference_tree(ckpt_path, out_major):
  """Splitting both towers off the memory-mapped members gives `unstacked`'s tree exactly."""
  path = ckpt_path("pg2_gqa")
  direct = _flat(checkpoint.load_npz(path, unstack=True, out_major=out_major).params)
  want = _flat(paligemma.unstacked(checkpoint.load_npz(path).params, out_major=out_major))
  assert set(direct) == set(want)
  assert any(k.startswith("img/Transformer/encoderblock_0/") for k in direct)
  for key, value in want.items():
    np.testing.assert_array_equal(np.asarray(direct[key]), np.asarray(value), err_msg=key)
