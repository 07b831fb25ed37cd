"""What training needs from the plain model: dropout behind `train`, a remat policy for the
layers, and named intermediates beside the logits (as big_vision's `(text_logits, out)`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import bv_fixtures
from tests.conftest import spec_config
from paligemma_jax.model import layouts, paligemma


def _setup(name="pg2_gqa", **kw):
  config = spec_config(bv_fixtures.SPECS[name])
  rng = np.random.default_rng(0)
  s = config.image_size
  inputs = (jnp.asarray(rng.uniform(-1, 1, (2, s, s, 3)), jnp.float32),
            jnp.asarray(rng.integers(3, config.llm.vocab_size, (2, 7)), jnp.int32),
            jnp.asarray([[0, 0, 0, 0, 1, 1, 1]] * 2, jnp.int32))
  return config, paligemma.init_params(config, seed=1), inputs


def test_intermediates_are_the_image_embeddings_and_pre_logits():
  config, params, inputs = _setup()
  model = paligemma.PaliGemma(config)
  logits, out = model.apply({"params": params}, *inputs)
  ni, d, t = config.num_image_tokens, config.llm.width, inputs[1].shape[1]
  assert logits.shape == (2, t, config.llm.vocab_size) and logits.dtype == jnp.float32
  assert out["img/zimg"].shape == (2, ni, d) and out["llm/pre_logits"].shape == (2, ni + t, d)
  zimg = model.apply({"params": params}, inputs[0], method=lambda m, x: m.img(x))
  np.testing.assert_array_equal(np.asarray(out["img/zimg"]), np.asarray(zimg))
  again = model.apply({"params": params}, out["llm/pre_logits"][:, ni:],
                      method=lambda m, h: m.llm.logits(h))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(again))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_dropout_acts_only_when_training(scan_layers):
  config, params, inputs = _setup()
  if not scan_layers:
    params = layouts.unstacked(params)
  plain = paligemma.PaliGemma(config, scan_layers=scan_layers)
  dropped = paligemma.PaliGemma(config, scan_layers=scan_layers, llm_dropout=0.3,
                                img_dropout=0.3)
  want = np.asarray(plain.apply({"params": params}, *inputs)[0])
  # Evaluation (train=False, the default) ignores the rates.
  np.testing.assert_array_equal(np.asarray(dropped.apply({"params": params}, *inputs)[0]), want)
  run = lambda key: np.asarray(dropped.apply({"params": params}, *inputs, train=True,
                                             rngs={"dropout": key})[0])
  a, b, a_again = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(0))
  assert np.abs(a - want).max() > 1e-2 and np.abs(a - b).max() > 1e-2
  np.testing.assert_array_equal(a, a_again)
  with pytest.raises(Exception, match="dropout"):  # training needs its rng
    dropped.apply({"params": params}, *inputs, train=True)
  # Rate 0 with train=True is the evaluation forward.
  np.testing.assert_array_equal(np.asarray(plain.apply({"params": params}, *inputs, train=True)[0]),
                                want)


def test_remat_policy_keeps_values_and_gradients():
  """nothing_saveable recomputes each layer in the backward pass: same loss and gradients
  (float32, within 1e-5 of the largest gradient), and the gradient's jaxpr holds the
  checkpointed layers."""
  config, params, inputs = _setup("pg1_mqa")

  def loss(model, p):
    logits, _ = model.apply({"params": p}, *inputs, train=True,
                            rngs={"dropout": jax.random.PRNGKey(0)})
    return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

  plain = paligemma.PaliGemma(config)
  remat = paligemma.PaliGemma(config, remat_policy="nothing_saveable")
  (v0, g0), (v1, g1) = (jax.value_and_grad(lambda p, m=m: loss(m, p))(params)
                        for m in (plain, remat))
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  scale = max(np.abs(np.asarray(a)).max() for a in jax.tree_util.tree_leaves(g0))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert "checkpoint" not in str(jax.make_jaxpr(jax.grad(lambda p: loss(plain, p)))(params))
