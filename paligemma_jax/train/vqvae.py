"""Trains the mask VQ-VAE (`model/vqvae.py`, vae-oid.npz's architecture) on procedural masks:

  python -m paligemma_jax.train.vqvae --out=checkpoints/shapes/vae.npz [--steps=1500]

The VQ-VAE objective (van den Oord et al. 2017): reconstruction error of the decoded
straight-through quantised latents, plus the codebook term |sg(z) - e|^2 and the commitment
term 0.25 |z - sg(e)|^2. The codebook starts from encoder outputs of the first batch, so that
every row is near the latents it must serve.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paligemma_jax.data import shapes
from paligemma_jax.model import vqvae

COMMITMENT = 0.25


def training_masks(rng: np.random.Generator, n: int) -> np.ndarray:
  """Half varied random masks, half the shapes' own box crops -> (n, 64, 64) in [-1, 1]."""
  k = n // 2
  objs = [shapes.Obj(shapes.SHAPES[rng.integers(3)], "red", (0, 0, s, s))
          for s in rng.choice(shapes.SIDES, n - k)]
  return np.concatenate([shapes.random_masks(rng, k), shapes.crop_masks(objs)])


def _loss(params, masks):
  model = vqvae.VQVAE()
  apply = lambda method, *a: model.apply({"params": params}, *a, method=method)
  z = apply(vqvae.VQVAE.encode_latents, (masks + 1) / 2)
  e = apply(vqvae.VQVAE.embed_codes, apply(vqvae.VQVAE.nearest_codes, z))
  recon = apply(vqvae.VQVAE.decode_latents, z + jax.lax.stop_gradient(e - z))
  rec = jnp.mean((recon - masks) ** 2)
  sg = jax.lax.stop_gradient
  return rec + jnp.mean((sg(z) - e) ** 2) + COMMITMENT * jnp.mean((z - sg(e)) ** 2), rec


def mask_iou(a, b) -> np.ndarray:
  """(n, H, W) masks in [-1, 1] (object > 0) -> (n,) IoU."""
  a, b = np.asarray(a) > 0, np.asarray(b) > 0
  return (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)


def train(steps: int = 1500, batch: int = 64, lr: float = 1e-3, seed: int = 0,
          log=print) -> dict:
  """-> trained params {npz key: float32 array}."""
  rng = np.random.default_rng(seed)
  params = {k: jnp.asarray(v) for k, v in vqvae.init_vae_params(seed).items()}
  first = training_masks(rng, batch)
  z = vqvae.VQVAE().apply({"params": params}, (jnp.asarray(first) + 1) / 2,
                          method=vqvae.VQVAE.encode_latents).reshape(-1, vqvae.CODE_DIM)
  rows = rng.choice(z.shape[0], vqvae.NUM_CODES, replace=z.shape[0] < vqvae.NUM_CODES)
  params[vqvae.EMBEDDING] = z[rows] + 0.01 * jnp.asarray(
      rng.standard_normal((vqvae.NUM_CODES, vqvae.CODE_DIM)), jnp.float32)
  tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
  state = tx.init(params)

  @jax.jit
  def step(params, state, masks):
    (loss, rec), grads = jax.value_and_grad(_loss, has_aux=True)(params, masks)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, rec

  t0 = time.perf_counter()
  for i in range(steps):
    params, state, loss, rec = step(params, state, jnp.asarray(training_masks(rng, batch)))
    if (i + 1) % max(steps // 10, 1) == 0:
      log(f"vqvae step {i + 1}/{steps}: loss {float(loss):.4f} reconstruction "
          f"{float(rec):.4f} ({time.perf_counter() - t0:.0f} s)")
  return {k: np.asarray(v) for k, v in params.items()}


def round_trip_iou(params, masks) -> np.ndarray:
  codes = vqvae.encode_masks(params, (masks + 1) / 2)
  return mask_iou(vqvae.decode_masks(params, codes), masks)


def main(argv):
  from absl import flags
  f = flags.FLAGS
  params = train(f.steps, f.batch, f.lr, f.seed)
  rng = np.random.default_rng(f.seed + 1)
  objs = [shapes.Obj(s, "red", (0, 0, side, side)) for s in shapes.SHAPES for side in shapes.SIDES]
  print(f"round-trip IoU: shape crops min {round_trip_iou(params, shapes.crop_masks(objs)).min():.3f}, "
        f"random masks mean {round_trip_iou(params, shapes.random_masks(rng, 256)).mean():.3f}")
  vqvae.save_vae(f.out, params)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("out", None, "Where to write the npz (vae-oid.npz's keys).", required=True)
  flags.DEFINE_integer("steps", 1500, "Training steps.")
  flags.DEFINE_integer("batch", 64, "Masks per step.")
  flags.DEFINE_float("lr", 1e-3, "Peak learning rate (cosine decay).")
  flags.DEFINE_integer("seed", 0, "Seed of the masks and the initialisation.")
  app.run(main)
