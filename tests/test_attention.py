"""Gemma's rotary embedding and attention core against float64 references written here."""
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import spec_config
from tests import bv_fixtures
from paligemma_jax.sample import decode
from paligemma_jax.model import gemma, layouts, paligemma


def rope_reference(x, positions):
  """float64 rotation of halves (x1, x2) by angle position * 10000^(-2i/H)."""
  h = x.shape[-1]
  angle = positions[..., None, None] * 10_000.0 ** (-np.arange(0, h, 2) / h)  # BT1(H/2)
  x1, x2 = x[..., :h // 2], x[..., h // 2:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rope_matches_float64_rotation(dtype):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 3, 16))
  positions = rng.integers(0, 300, (2, 7))
  rope = gemma.rope_table(jnp.asarray(positions), 16, 300)
  assert [a.shape for a in rope] == [(2, 7, 1, 2, 8)] * 2
  got = gemma.apply_rope(jnp.asarray(x, dtype), rope)
  assert got.shape == x.shape and got.dtype == dtype
  # float32: the angle is rounded to float32 (as PyTorch does), ~3e-5 rad at position 300.
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  x_in = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), rope_reference(x_in, positions),
                             rtol=0, atol=tol * np.abs(x).max())


def attention_reference(q, k, v, mask, cap):
  """float64, one head at a time: q (B,T,N,H), k, v (B,S,K,H), mask (B,T,S)."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  for head in range(n):
    kv = head // g  # query heads n*G .. n*G+G-1 share kv head n
    logits = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, kv])
    if cap:
      logits = np.tanh(logits / cap) * cap
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bts,bsh->bth", probs, v[:, :, kv])
  return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_attention_matches_per_head_reference(heads, kv_heads, t, cap):
  rng = np.random.default_rng(heads * 10 + kv_heads + t)
  b, s, h = 2, 9, 8
  q = rng.standard_normal((b, t, heads, h))
  k = rng.standard_normal((b, s, kv_heads, h))
  v = rng.standard_normal((b, s, kv_heads, h))
  mask = rng.random((b, t, s)) < 0.6
  mask[:, :, 0] = True  # every query sees at least one key
  got = gemma.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                    jnp.asarray(mask), cap)
  assert got.shape == (b, t, heads, h)
  np.testing.assert_allclose(np.asarray(got), attention_reference(q, k, v, mask, cap),
                             rtol=0, atol=1e-5)
  # Masked keys carry no weight at all: changing their values changes nothing.
  v_masked = np.where(mask.any(1)[:, :, None, None], v, 1e3)
  again = gemma.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v_masked)),
                                      jnp.asarray(mask), cap)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


def test_prefill_looks_sin_and_cos_up_once():
  """The compiled prefill evaluates no sine or cosine (the rotation reads the shared table);
  before the table, XLA's CPU backend computed them again inside every layer's rotation."""
  config = spec_config(bv_fixtures.SPECS["pg1_mqa"])
  model = paligemma.PaliGemma(config, scan_layers=False)
  params = layouts.unstacked(paligemma.init_params(config))
  s = config.image_size
  cache_size = config.num_image_tokens + 8
  prefill = decode.jit_prefill(model, cache_size=cache_size, cache_dtype=jnp.float32)
  hlo = prefill.lower(params, jnp.zeros((1, s, s, 3)), jnp.ones((1, 5), jnp.int32),
                      jnp.ones((1, 5), bool), jnp.zeros((1, 5), jnp.int32)).compile().as_text()
  assert " sine(" not in hlo and " cosine(" not in hlo
  assert hlo.count(" gather(") >= 1
