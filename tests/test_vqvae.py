"""VQ-VAE: npz layout and loader, parity with a PyTorch reference, round trip."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from tests import torch_vqvae_reference as ref
from paligemma_jax.model import vqvae


def _rel_l2(got, want):
  """||got - want||_2 / ||want||_2 over the whole batch (Frobenius norm)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _shapes(rng, n):
  """(n,64,64) float32 masks: ellipses and rectangles that roughly fill the
  frame, as big_vision's crops-to-the-box resized to 64x64 do."""
  yy, xx = np.mgrid[0:64, 0:64] + 0.5
  out = np.zeros((n, 64, 64), np.float32)
  for i in range(n):
    cy, cx = rng.uniform(24, 40, 2)
    ry, rx = rng.uniform(14, 32, 2)
    if rng.random() < 0.5:
      out[i] = ((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 <= 1
    else:
      out[i] = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
  return out


def _iou(a, b):
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  return (a & b).sum(axis=(-2, -1)) / (a | b).sum(axis=(-2, -1))


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory):
  """A random VAE in the vae-oid.npz layout whose codebook rows lie near the
  encoder's outputs, so that encoding picks many different codes."""
  params = vqvae.init_vae_params(1)
  rng = np.random.default_rng(1)
  z = jax.jit(_encode_latents)(params, _shapes(rng, 16))
  z = np.asarray(z).reshape(-1, vqvae.CODE_DIM)
  rows = z[rng.choice(len(z), vqvae.NUM_CODES, replace=False)]
  params[vqvae.EMBEDDING] = (rows + z.std(axis=0) * rng.standard_normal(
      rows.shape)).astype(np.float32)
  path = tmp_path_factory.mktemp("vae") / "vae-oid-random.npz"
  vqvae.save_vae(path, params)
  return path


# --- layout and loader -------------------------------------------------------


def test_layout_matches_pytorch_state_dict():
  torch_shapes = {k: tuple(v.shape) for k, v in ref.VQVAE().state_dict().items()}
  assert torch_shapes == vqvae.VAE_SHAPES
  params = vqvae.init_vae_params(0)
  assert {k: v.shape for k, v in params.items()} == vqvae.VAE_SHAPES
  assert params["decoder.4.weight"].shape == (128, 128, 4, 4)  # (in, out, kh, kw)
  assert params["encoder.0.weight"].shape == (16, 1, 4, 4)  # OIHW


def test_save_load_keeps_arrays_and_ignores_extra_keys(tmp_path):
  params = vqvae.init_vae_params(3)
  path = tmp_path / "v.npz"
  # The released file may also hold the quantiser's EMA statistics.
  np.savez(path, **params, **{"_vq_vae._ema_w": np.zeros((128, 512), np.float32),
                              "_vq_vae._ema_cluster_size": np.zeros(128)})
  loaded = vqvae.load_vae(path)
  assert set(loaded) == set(vqvae.VAE_SHAPES)
  for k, v in params.items():
    np.testing.assert_array_equal(np.asarray(loaded[k]), v)
  vqvae.save_vae(tmp_path / "w.npz", loaded)
  with np.load(tmp_path / "w.npz") as again:
    assert set(again.files) == set(vqvae.VAE_SHAPES)


def test_load_errors_name_file_key_and_shapes(tmp_path):
  params = vqvae.init_vae_params(0)
  bad = dict(params)
  bad["decoder.6.weight"] = np.zeros((64, 128, 4, 4), np.float32)
  del bad["encoder.10.bias"]
  path = tmp_path / "bad.npz"
  np.savez(path, **bad)
  with pytest.raises(ValueError) as e:
    vqvae.load_vae(path)
  msg = str(e.value)
  assert str(path) in msg
  assert "'decoder.6.weight' expected shape (128, 64, 4, 4), found (64, 128, 4, 4)" in msg
  assert "'encoder.10.bias' missing" in msg

  with pytest.raises(FileNotFoundError, match="nope.npz"):
    vqvae.load_vae(tmp_path / "nope.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="junk.npz"):
    vqvae.load_vae(tmp_path / "junk.npz")
  objs = dict(params)
  objs[vqvae.EMBEDDING] = np.array([None] * 4, dtype=object)
  np.savez(tmp_path / "pickled.npz", **objs)  # needs pickle to read: refused
  with pytest.raises(ValueError, match="_vq_vae._embedding"):
    vqvae.load_vae(tmp_path / "pickled.npz")


def test_bad_codes_and_masks_are_refused():
  params = vqvae.init_vae_params(0)
  with pytest.raises(ValueError, match="128"):
    vqvae.decode_masks(params, np.full((1, 16), 128))
  with pytest.raises(ValueError, match="16"):
    vqvae.decode_masks(params, np.zeros((1, 15), int))
  with pytest.raises(ValueError, match="64"):
    vqvae.encode_masks(params, np.zeros((1, 32, 32)))
  assert vqvae.decode_masks(params, np.zeros((0, 16), int)).shape == (0, 64, 64)


# --- parity with PyTorch ------------------------------------------------------


def test_decoder_matches_pytorch(random_npz):
  params = vqvae.load_vae(random_npz)
  codes = np.random.default_rng(0).integers(0, 128, (6, 16))
  got = vqvae.decode_masks(params, codes)
  assert got.shape == (6, 64, 64) and got.dtype == np.float32
  with torch.no_grad():
    want = ref.load_npz(random_npz).decode(torch.from_numpy(codes)).numpy()
    want64 = ref.load_npz(random_npz, torch.float64).decode(
        torch.from_numpy(codes)).numpy()
  err, err64 = _rel_l2(got, want), _rel_l2(got, want64)
  print(f"decoder rel L2 error vs torch f32 {err:.2e}, vs torch f64 {err64:.2e}")
  assert err < 1e-5 and err64 < 1e-5
  # Batched over objects: each row is what it would be alone.
  np.testing.assert_allclose(vqvae.decode_masks(params, codes[2:3])[0], got[2],
                             rtol=0, atol=1e-6 * np.abs(got).max())


def test_encoder_matches_pytorch(random_npz):
  params = vqvae.load_vae(random_npz)
  masks = _shapes(np.random.default_rng(2), 12)
  masks[-1] = np.random.default_rng(3).random((64, 64)) > 0.5  # noise too
  got = vqvae.encode_masks(params, masks)
  with torch.no_grad():
    want = ref.load_npz(random_npz, torch.float64).encode(
        torch.from_numpy(masks).double()).numpy()
  assert got.shape == (12, 16) and got.dtype == np.int32
  assert len(np.unique(want)) >= 8  # the codebook is really being searched
  np.testing.assert_array_equal(got, want)


# --- round trip with a trained VAE ---------------------------------------------

# Training goes through the same npz-keyed params, but runs each decoder
# ConvTranspose(k=4, s=2, p=1) as one 2x2 conv per output parity ("sub-pixel").
# The module's dilated-conv form is what inference uses; its gradient is ~10x
# slower on XLA:CPU, which would not fit the time budget of the test.
_TAPS = ((3, 1), (2, 0))  # kernel rows feeding even / odd output rows


def _conv_transpose_subpixel(p, name, x):
  w = p[f"{name}.weight"]  # (in, out, 4, 4)
  out_ch = w.shape[1]
  k = jnp.transpose(w, (2, 3, 0, 1))  # (kh, kw, in, out)
  k = jnp.concatenate([k[np.array(_TAPS[a])][:, np.array(_TAPS[b])]
                       for a in (0, 1) for b in (0, 1)], axis=-1)
  b, h, wd = x.shape[:3]
  y = jax.lax.conv_general_dilated(
      jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), k, (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  parts = [y[:, a:a + h, c:c + wd, (2 * a + c) * out_ch:(2 * a + c + 1) * out_ch]
           for a in (0, 1) for c in (0, 1)]
  y = jnp.stack(parts).reshape(2, 2, b, h, wd, out_ch)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * h, 2 * wd, out_ch)
  return y + p[f"{name}.bias"]


def _decode_latents_fast(p, q):
  x = jax.nn.relu(vqvae._conv(p, "decoder.0", q))
  x = vqvae._resblock(p, "decoder.2", x)
  x = vqvae._resblock(p, "decoder.3", x)
  for n in range(4):
    x = jax.nn.relu(_conv_transpose_subpixel(p, f"decoder.{4 + 2 * n}", x))
  return vqvae._conv(p, "decoder.12", x)[..., 0]


def _encode_latents(p, m):
  return vqvae.VQVAE().apply({"params": p}, m,
                             method=vqvae.VQVAE.encode_latents)


def _kmeans(x, k, rng, iters=10):
  centres = x[rng.choice(len(x), k, replace=False)].copy()
  for _ in range(iters):
    d = ((x**2).sum(1)[:, None] + (centres**2).sum(1)[None]
         - 2 * x @ centres.T)
    assign = d.argmin(1)
    for j in range(k):
      members = x[assign == j]
      centres[j] = members.mean(0) if len(members) else x[rng.integers(len(x))]
  return centres


@pytest.fixture(scope="module")
def trained_params():
  """A VAE trained for 300 steps of 4 masks (~30 s on 2 idle CPU cores), seeded.

  Encoder and decoder are trained as a plain autoencoder (MSE to the mask in
  [-1,1]); the 128 codebook rows are then set by k-means over the encoder's
  outputs. This avoids the codebook collapse that straight-through VQ training
  shows when it has only a few hundred steps. (Tried within the budget: He
  init, noise on the latents, straight-through fine-tuning after k-means; none
  beat this on the quantised round trip, which is limited to ~0.92 IoU by 128
  codes per 16x16 patch rather than by the autoencoder.)
  """
  steps, batch = 300, 4
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(v) for k, v in vqvae.init_vae_params(0).items()}
  sched = optax.warmup_cosine_decay_schedule(2e-4, 2e-3, 20, steps, 1e-4)
  opt = optax.adam(sched)

  def loss_fn(p, m):
    rec = _decode_latents_fast(p, _encode_latents(p, m))
    return jnp.mean((rec - (2 * m - 1))**2)

  @jax.jit
  def step(p, state, m):
    loss, grads = jax.value_and_grad(loss_fn)(p, m)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  start = time.time()
  state = opt.init(params)
  for _ in range(steps):
    params, state, loss = step(params, state, jnp.asarray(_shapes(rng, batch)))
  z = jax.jit(_encode_latents)(params, jnp.asarray(_shapes(rng, 128)))
  params = dict(params)
  params[vqvae.EMBEDDING] = jnp.asarray(
      _kmeans(np.asarray(z).reshape(-1, vqvae.CODE_DIM), vqvae.NUM_CODES, rng))
  print(f"trained VAE: final loss {float(loss):.3f} in {time.time() - start:.1f}s")
  return params


def test_subpixel_training_decoder_equals_module_decoder():
  p = {k: jnp.asarray(v) for k, v in vqvae.init_vae_params(5).items()}
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, vqvae.CODE_DIM))
  want = jax.jit(vqvae.VQVAE().apply, static_argnames="method")(
      {"params": p}, q, method=vqvae.VQVAE.decode_latents)
  assert _rel_l2(jax.jit(_decode_latents_fast)(p, q), want) < 1e-5


def test_round_trip_keeps_masks(trained_params, tmp_path):
  # Held-out masks (another seed than training), and one plain ellipse.
  masks = _shapes(np.random.default_rng(123), 16)
  yy, xx = np.mgrid[0:64, 0:64] + 0.5
  masks[0] = ((yy - 32) / 28)**2 + ((xx - 32) / 20)**2 <= 1
  codes = vqvae.encode_masks(trained_params, masks)
  assert codes.shape == (16, 16) and codes.min() >= 0 and codes.max() < 128
  decoded = vqvae.decode_masks(trained_params, codes)
  ious = _iou(decoded > 0, masks > 0)
  print(f"round-trip IoU: ellipse {ious[0]:.3f}, mean {ious.mean():.3f}, "
        f"min {ious.min():.3f}")
  assert ious[0] > 0.9
  assert ious.mean() > 0.9
  # Trained weights give masks of real magnitude: parity holds there too.
  vqvae.save_vae(tmp_path / "trained.npz", trained_params)
  with torch.no_grad():
    want = ref.load_npz(tmp_path / "trained.npz").decode(
        torch.from_numpy(codes.astype(np.int64))).numpy()
    want_codes = ref.load_npz(tmp_path / "trained.npz").encode(
        torch.from_numpy(masks)).numpy()
  err = _rel_l2(decoded, want)
  print(f"trained decoder rel L2 error vs torch f32 {err:.2e}")
  assert err < 1e-5
  np.testing.assert_array_equal(codes, want_codes)


def test_a_decoder_only_file_draws_masks(tmp_path):
  """Drawing needs only the codebook and the decoder: a file without the encoder loads for
  it, passes main.py's check, and decodes the same masks as the whole file; asking it to
  encode names the missing encoder keys."""
  from paligemma_jax import paths
  whole = vqvae.init_vae_params(seed=3)
  part = {k: v for k, v in whole.items() if k in vqvae.vae_keys(("decoder",))}
  assert len(part) < len(whole) and not any(k.startswith("encoder.") for k in part)
  path = tmp_path / "decoder_only.npz"
  vqvae.save_vae(path, part)
  paths.check_vae(str(path))
  codes = np.arange(32, dtype=np.int32).reshape(2, 16) % vqvae.NUM_CODES
  got = vqvae.decode_masks(vqvae.load_vae(path, parts=("decoder",)), codes)
  want = vqvae.decode_masks({k: jnp.asarray(v) for k, v in whole.items()}, codes)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match=r"encoder\.0\.weight.*missing"):
    vqvae.load_vae(path)
