"""The CPU backend (`backends/cpu.py`) and its bfloat16 kernels (`cpu_kernels`): exact
indexing, float32 accuracy, when the model uses them, and the fallback when they cannot be
built."""
import contextlib
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests import bv_fixtures
from tests import hf_reference
from tests.conftest import spec_overrides
from paligemma_jax.ckpt import checkpoint
from paligemma_jax.data import image
from paligemma_jax.backends import cpu, cpu_kernels
from paligemma_jax.model import gemma, layouts, paligemma
from paligemma_jax.pipeline import PaliGemmaPipeline


def test_kernel_is_built_on_this_machine():
  # CI runs on x86-64 Linux with g++ (.ci/run installs it): there the kernel must be in use.
  assert shutil.which(os.environ.get("CXX", "g++")), "no C++ compiler: .ci/run installs g++"
  assert cpu_kernels.available()


def _bf16(a):
  return jnp.asarray(a, jnp.float32).astype(jnp.bfloat16)


# matvec: rows under, at and over a group of 4; inputs none, under one step of 32 weights, a
# tail of 8 or 4 after whole steps; outputs under one group of 4, a tail, several chunks (128
# outputs of 1024 inputs make one chunk, so 1000 x 1024 is 8 of them and 4133 x 64 is 3).
MATVEC_SHAPES = [(1, 7, 40), (3, 1000, 1024), (4, 5, 16), (5, 4133, 64), (8, 33, 4100),
                 (16, 300, 96), (2, 5, 0), (0, 5, 64), (2, 0, 64)]
# gemm: rows a panel of 16, of 32, one over, several (272 = the small preset's prefill);
# outputs under, at and over the 12 rows of a block and the 48 of a chunk; inputs none, one,
# under, at and over the 256 of a block.
GEMM_SHAPES = [(17, 13, 40), (16, 12, 256), (33, 49, 257), (32, 48, 600), (272, 1000, 1024),
               (1, 1, 1), (48, 47, 5), (5, 3, 0), (0, 4, 8), (4, 0, 8)]


@pytest.mark.parametrize("product,rows,outs,ins", [("matvec", *s) for s in MATVEC_SHAPES] +
                         [("gemm", *s) for s in GEMM_SHAPES])
def test_products_exact_on_integers(product, rows, outs, ins):
  """Small integers are exact in bfloat16 and their sums exact in float32: any misplaced
  weight, row or output shows as an exact mismatch."""
  rng = np.random.default_rng(rows * 7919 + outs + ins)
  x = rng.integers(-8, 9, (rows, ins)).astype(np.float32)
  w = rng.integers(-8, 9, (outs, ins)).astype(np.float32)
  got = jax.jit(getattr(cpu_kernels, product))(jnp.asarray(x), _bf16(w))
  assert got.shape == (rows, outs) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), x @ w.T)


# gemm: 4 blocks of inputs, the sums carried between them.
@pytest.mark.parametrize("product,rows,outs,ins", [
    ("matvec", 1, 1000, 1024), ("matvec", 8, 513, 2048), ("matvec", 16, 64, 4100),
    ("gemm", 100, 70, 1030)])
def test_products_float32_accuracy(product, rows, outs, ins):
  """Against a float64 product of the same bfloat16 weights: float32 accumulation, relative
  error under 1e-5 of the largest output (XLA's own float32 dot lands at ~1e-7 here)."""
  rng = np.random.default_rng(outs)
  x = rng.standard_normal((rows, ins)).astype(np.float32)
  w = _bf16(rng.standard_normal((outs, ins)))
  ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T
  got = np.asarray(jax.jit(getattr(cpu_kernels, product))(jnp.asarray(x), w))
  assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5


def test_matvec_rejects_shapes_and_dtypes_with_both_named():
  with pytest.raises(ValueError, match=r"x \(2, 8\).*w \(3, 9\)"):
    cpu_kernels.matvec(jnp.ones((2, 8)), jnp.ones((3, 9), jnp.bfloat16))
  with pytest.raises(ValueError, match="float32"):
    cpu_kernels.matvec(jnp.ones((2, 8)), jnp.ones((3, 8), jnp.float32))
  with pytest.raises(ValueError, match=r"gemm: .*x \(40, 8\).*w \(3, 9\)"):
    cpu_kernels.gemm(jnp.ones((40, 8)), jnp.ones((3, 9), jnp.bfloat16))


@pytest.mark.parametrize("shape", [(1,), (2, 7), (0,)])
def test_rows_equal_jnp_indexing(shape):
  """Every row exact (bfloat16 widens exactly), negative indices counted from the end and
  out-of-range ones clamped, as `table[index]` does."""
  rng = np.random.default_rng(len(shape))
  table = _bf16(rng.standard_normal((300, 70)))
  index = jnp.asarray(rng.integers(-310, 310, shape), jnp.int32)
  got = jax.jit(cpu_kernels.rows)(table, index)
  assert got.shape == (*shape, 70) and got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(table[index].astype(jnp.float32)))
  with pytest.raises(ValueError, match=r"bfloat16 table.*\(300, 70\) float32"):
    cpu_kernels.rows(table.astype(jnp.float32), index)


def _hlo(f, *args):
  return jax.jit(lambda *a: f(*a)).lower(*args).as_text()  # a fresh trace, never a cached one


def test_cpu_product_takes_the_kernels_for_bfloat16_weights(monkeypatch):
  """matvec up to DECODE_ROWS rows, gemm above where it is fast (AVX-512), else XLA's dot;
  float32 weights and no kernel: XLA's dot. Both gemm routings checked, whatever this CPU."""
  w = _bf16(np.random.default_rng(0).standard_normal((300, 128)))
  few, many = jnp.ones((cpu.DECODE_ROWS, 128), jnp.bfloat16), jnp.ones((17, 128), jnp.bfloat16)
  targets = lambda x, w: [t for t in (cpu_kernels.TARGET, cpu_kernels.GEMM_TARGET)
                          if t in _hlo(cpu.product, x, w)]
  assert targets(few, w) == [cpu_kernels.TARGET]
  monkeypatch.setattr(cpu_kernels, "gemm_is_fast", lambda: False)
  assert targets(few, w) == [cpu_kernels.TARGET] and targets(many, w) == []
  monkeypatch.setattr(cpu_kernels, "gemm_is_fast", lambda: True)
  assert targets(many, w) == [cpu_kernels.GEMM_TARGET]
  assert targets(few.astype(jnp.float32), w.astype(jnp.float32)) == []
  assert targets(many.astype(jnp.float32), w.astype(jnp.float32)) == []
  # Same values as XLA's path (bfloat16 out: both round one float32 sum).
  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.standard_normal((r, 128)), jnp.float32) for r in (3, 40)]
  with_kernel = [np.asarray(cpu.product(x, w)) for x in xs]
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  assert targets(few, w) == targets(many, w) == []
  for x, got in zip(xs, with_kernel):
    np.testing.assert_allclose(got, np.asarray(cpu.product(x, w)),
                               rtol=1e-5, atol=1e-5)


def test_without_a_compiler_it_falls_back_and_says_why(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  monkeypatch.setenv("PALIGEMMA_JAX_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match="no-such-compiler-xyz"):
    cpu_kernels._build(tmp_path)
  with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
    assert cpu_kernels.available.__wrapped__() is False
  assert "no-such-compiler-xyz" in caplog.text
  monkeypatch.setenv("PALIGEMMA_JAX_CPU_MATVEC", "0")
  assert cpu_kernels.available.__wrapped__() is False
  assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_gemm_is_fast_reads_avx512_from_the_cpu_flags(monkeypatch):
  cpu_kernels.gemm_is_fast.cache_clear()
  try:
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "model name: x\nflags: fma avx2 avx512f")
    assert cpu_kernels.gemm_is_fast()
    cpu_kernels.gemm_is_fast.cache_clear()
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "model name: x\nflags: fma avx2")
    assert not cpu_kernels.gemm_is_fast()
  finally:
    cpu_kernels.gemm_is_fast.cache_clear()


def test_build_is_cached_by_content(tmp_path):
  first = cpu_kernels._build(tmp_path)
  stamp = first.stat().st_mtime_ns
  assert cpu_kernels._build(tmp_path) == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa"])
def test_bfloat16_weights_decode_like_reference(name, ckpt_path, flat_params, tokenizer,
                                                test_image, monkeypatch):
  """bfloat16 weights computed in float32 go through the kernel in every decode step; HF,
  float32 on the same bfloat16-rounded weights, must give the same 16 greedy tokens, and the
  cached decode's log-probabilities must equal a full forward's (XLA's dots) within 1e-4."""
  spec = bv_fixtures.SPECS[name]
  loaded = checkpoint.load_npz(ckpt_path(name, "bfloat16"), dtype=jnp.bfloat16,
                               overrides=spec_overrides(spec))
  monkeypatch.setattr(cpu_kernels, "gemm_is_fast", lambda: True)  # its path, on any CPU
  pipe = PaliGemmaPipeline(loaded.config, loaded.params, tokenizer, dtype="float32",
                           cache_dtype="float32")
  [ours] = pipe.generate([test_image], ["caption en"], max_decode_len=16)
  [(compiled_prefill, compiled_decode)] = pipe._compiled.values()
  hlo = compiled_decode.as_text()
  assert cpu_kernels.TARGET in hlo and cpu_kernels.ROWS_TARGET in hlo
  # XLA's own lookup widened the whole embedding to float32 on every decode call.
  v, d = loaded.params["llm"]["embedder"]["input_embedding"].shape
  assert f"f32[{v},{d}]" not in hlo
  # The prefill's products: no weight widened by XLA, e.g. the (2F, D) gate and up.
  prefill_hlo = compiled_prefill.as_text()
  assert cpu_kernels.GEMM_TARGET in prefill_hlo
  widened = rf"%[\w.-]*convert[\w.-]* = f32\[{2 * loaded.config.llm.mlp_dim},{d}\]"
  assert not re.findall(widened, prefill_hlo)
  rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
             for k, v in flat_params[name].items()}
  hf = hf_reference.build_hf_paligemma(rounded, spec)
  pixels = image.preprocess(test_image, spec["image_size"])[None]
  tokens, mask_ar = tokenizer.prompt("caption en")
  ref = hf_reference.hf_greedy(hf, pixels, tokens[None], 16, vocab_limit=tokenizer.vocab_size)
  assert len(ref) == 16
  assert ours.tokens == ref.tolist()
  # Teacher-forced full forward on big_vision's tree: no kernel (all rows at once).
  text = np.concatenate([tokens, np.array(ours.tokens, np.int32)])[None]
  mask_ar = np.concatenate([mask_ar, np.ones(16, np.int32)])[None]
  model = paligemma.PaliGemma(loaded.config, jnp.float32)
  logits = np.asarray(model.apply({"params": layouts.stacked(pipe.params)},
                                  pipe.make_batch([test_image], ["caption en"])["images"],
                                  text, mask_ar)[0])
  first = len(tokens) - 1
  full = logits[0, first:first + 16].copy()
  full[:, tokenizer.vocab_size:] = -np.inf
  logp = jax.nn.log_softmax(full)[np.arange(16), ours.tokens]
  np.testing.assert_allclose(ours.logprobs, logp, atol=1e-4)


def test_the_embedder_takes_the_kernels_only_under_the_cpu_backend():
  """The plain model never calls a kernel (on a mesh the embedding is sharded, and the
  kernels would need it gathered whole); the CPU backend's interceptor does."""
  table = {"input_embedding": _bf16(np.random.default_rng(2).standard_normal((512, 64)))}
  x = jnp.ones((2, 1, 64), jnp.bfloat16)
  tokens = jnp.array([[5, 511, 0]], jnp.int32)
  embedder = gemma.Embedder(512, 64, jnp.float32)
  encoded = []
  for installed in (False, True):
    with cpu.install() if installed else contextlib.nullcontext():
      hlo = _hlo(lambda x: embedder.apply({"params": table}, x, method="decode"), x)
      assert (cpu_kernels.TARGET in hlo) == installed
      encode = lambda t: embedder.apply({"params": table}, t, method="encode")
      assert (cpu_kernels.ROWS_TARGET in _hlo(encode, tokens)) == installed
      encoded.append(np.asarray(encode(tokens)))
  np.testing.assert_array_equal(encoded[0], encoded[1])
