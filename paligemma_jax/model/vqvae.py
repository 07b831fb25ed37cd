"""VQ-VAE that turns PaliGemma's 16 `<segNNN>` codes into 64x64 masks and back.

The architecture is the mask VQ-VAE of https://arxiv.org/abs/2301.02229 that
big_vision ships as `vae-oid.npz` (PyTorch layout). Parameters are a flat dict
keyed by the npz names and used as stored: conv kernels OIHW, ConvTranspose
kernels (in, out, kh, kw). Activations are NHWC so that the 4x4 grid of codes
is read row-major, as big_vision does.

Encoder: 64x64x1 -> 4 stride-2 4x4 convs (1->16->32->64->128, relu)
         -> 2 res blocks -> 1x1 conv 128->512 -> nearest of 128 codebook rows.
Decoder: 16 codes -> 4x4x512 -> 1x1 conv 512->128, relu -> 2 res blocks
         -> 4 ConvTranspose(k=4, s=2, p=1) 128->128->64->32->16, relu
         -> 1x1 conv 16->1: a 64x64 mask in [-1, 1] (object where > 0).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CODES = 128  # codebook rows: <seg000>..<seg127>
CODE_DIM = 512
TOKENS_PER_MASK = 16  # a 4x4 grid
MASK_SIZE = 64
EMBEDDING = "_vq_vae._embedding"

_ENC_CHANNELS = (1, 16, 32, 64, 128)
_DEC_CHANNELS = (128, 128, 64, 32, 16)
_RES_DIM = 128


def _conv_shapes(name, cout, cin, k):
  return {f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)}


def _resblock_shapes(name, dim):
  shapes = {}
  for i, k in ((0, 3), (2, 3), (4, 1)):
    shapes.update(_conv_shapes(f"{name}.net.{i}", dim, dim, k))
  return shapes


def _vae_shapes():
  shapes = {EMBEDDING: (NUM_CODES, CODE_DIM)}
  for n, (cin, cout) in enumerate(zip(_ENC_CHANNELS[:-1], _ENC_CHANNELS[1:])):
    shapes.update(_conv_shapes(f"encoder.{2 * n}", cout, cin, 4))
  shapes.update(_resblock_shapes("encoder.8", _RES_DIM))
  shapes.update(_resblock_shapes("encoder.9", _RES_DIM))
  shapes.update(_conv_shapes("encoder.10", CODE_DIM, _RES_DIM, 1))
  shapes.update(_conv_shapes("decoder.0", _RES_DIM, CODE_DIM, 1))
  shapes.update(_resblock_shapes("decoder.2", _RES_DIM))
  shapes.update(_resblock_shapes("decoder.3", _RES_DIM))
  for n, (cin, cout) in enumerate(zip(_DEC_CHANNELS[:-1], _DEC_CHANNELS[1:])):
    # ConvTranspose2d stores its weight as (in, out, kh, kw).
    shapes[f"decoder.{4 + 2 * n}.weight"] = (cin, cout, 4, 4)
    shapes[f"decoder.{4 + 2 * n}.bias"] = (cout,)
  shapes.update(_conv_shapes("decoder.12", 1, _DEC_CHANNELS[-1], 1))
  return shapes


# Every key of vae-oid.npz this module uses, with its shape. The real file may
# hold more (e.g. the EMA statistics of the quantiser); those are ignored.
VAE_SHAPES = _vae_shapes()


def vae_keys(parts=("decoder",)) -> dict:
  """The keys (with shapes) that `parts` ("encoder", "decoder") need, the codebook included:
  drawing masks needs only the decoder, making `<seg>` targets the encoder."""
  return {k: s for k, s in VAE_SHAPES.items()
          if k == EMBEDDING or k.split(".", 1)[0] in parts}


def _init_bound(name):
  """PyTorch's default init is U(-b, b), b = 1/sqrt(fan_in), for weights and
  biases alike, with fan_in = `weight.shape[1] * kh * kw` (for ConvTranspose
  that is the *output* channels, as in PyTorch). The codebook is N(0, 1)."""
  weight = VAE_SHAPES[name.rsplit(".", 1)[0] + ".weight"]
  return 1.0 / np.sqrt(np.prod(weight[1:]))


def _symmetric_uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv(p, name, x, stride=1, padding=0):
  """Conv2d with a PyTorch OIHW kernel on NHWC `x`."""
  y = jax.lax.conv_general_dilated(
      x, p[f"{name}.weight"], window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "OIHW", "NHWC"))
  return y + p[f"{name}.bias"]


def _conv_transpose(p, name, x):
  """PyTorch ConvTranspose2d(k=4, s=2, p=1) on NHWC `x`: (B,H,W,I) -> (B,2H,2W,O).

  Output row 2m+a sums input rows m-1+a and m+a against kernel rows 3-a and 1-a (the same
  for columns), so each of the four output phases (a, b) is a 2x2 convolution of the input
  padded by one, and the phases interleave into the output. This is the transposed conv's
  sum exactly, without the stride-dilated input: on XLA:CPU the dilated form's gradient was
  13x its forward. Kernel layout as stored: (in, out, kh, kw), named "IOHW".
  """
  w, (b, h, wd, _) = p[f"{name}.weight"], x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = lambda a: [3 - a, 1 - a]
  phases = [[jax.lax.conv_general_dilated(
      xp[:, a:a + h + 1, c:c + wd + 1], w[:, :, rows(a)][:, :, :, rows(c)], (1, 1), "VALID",
      dimension_numbers=("NHWC", "IOHW", "NHWC")) for c in (0, 1)] for a in (0, 1)]
  y = jnp.stack([jnp.stack(row, 3) for row in phases], 2)  # (B, H, 2, W, 2, O)
  return y.reshape(b, 2 * h, 2 * wd, -1) + p[f"{name}.bias"]


def _resblock(p, name, x):
  """3x3 conv, relu, 3x3 conv, relu, 1x1 conv, plus the input."""
  y = nn.relu(_conv(p, f"{name}.net.0", x, padding=1))
  y = nn.relu(_conv(p, f"{name}.net.2", y, padding=1))
  return _conv(p, f"{name}.net.4", y) + x


class VQVAE(nn.Module):
  """The mask VQ-VAE; its params are the flat npz-keyed dict `VAE_SHAPES` (applied, it takes
  any part of it: decoding needs only the codebook and the decoder, `vae_keys`)."""

  def setup(self):
    p = {}
    for name, shape in VAE_SHAPES.items():
      if not (self.is_initializing() or self.has_variable("params", name)):
        continue
      if name == EMBEDDING:
        init = nn.initializers.normal(1.0)
      else:
        init = _symmetric_uniform(_init_bound(name))
      p[name] = self.param(name, init, shape)
    self.p = p

  def encode_latents(self, masks):
    """(B,64,64) masks in [0,1] -> (B,4,4,512) encoder outputs."""
    x = 2.0 * (masks[..., None].astype(jnp.float32) - 0.5)
    for n in range(4):
      # padding 1 with k=4, s=2 on an even size equals TF's SAME (big_vision).
      x = nn.relu(_conv(self.p, f"encoder.{2 * n}", x, stride=2, padding=1))
    x = _resblock(self.p, "encoder.8", x)
    x = _resblock(self.p, "encoder.9", x)
    return _conv(self.p, "encoder.10", x)

  def nearest_codes(self, z):
    """(B,4,4,512) latents -> (B,16) int32 indices of the nearest codebook rows."""
    emb = self.p[EMBEDDING]
    flat = z.reshape(-1, emb.shape[1])
    dist = (jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(emb**2, axis=1)
            - 2.0 * flat @ emb.T)
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(
        z.shape[0], TOKENS_PER_MASK)

  def embed_codes(self, codes):
    """(B,16) ints -> (B,4,4,512) codebook rows, row-major over the 4x4 grid."""
    q = jnp.take(self.p[EMBEDDING], codes.reshape(-1), axis=0)
    return q.reshape(codes.shape[0], 4, 4, CODE_DIM)

  def decode_latents(self, q):
    """(B,4,4,512) -> (B,64,64) mask logits, nominally in [-1,1]."""
    x = nn.relu(_conv(self.p, "decoder.0", q))
    x = _resblock(self.p, "decoder.2", x)
    x = _resblock(self.p, "decoder.3", x)
    for n in range(4):
      x = nn.relu(_conv_transpose(self.p, f"decoder.{4 + 2 * n}", x))
    return _conv(self.p, "decoder.12", x)[..., 0]

  def encode(self, masks):
    """(B,64,64) in [0,1] -> (B,16) int32 codes."""
    return self.nearest_codes(self.encode_latents(masks))

  def decode(self, codes):
    """(B,16) codes -> (B,64,64) masks in [-1,1]."""
    return self.decode_latents(self.embed_codes(codes))

  def declare(self):
    """Does nothing but declare the parameters (for `init`)."""
    return self.p[EMBEDDING]

  def __call__(self, masks):
    """(B,64,64) in [0,1] -> (reconstruction (B,64,64), codes (B,16))."""
    codes = self.encode(masks)
    return self.decode(codes), codes


@jax.jit
def _decode(params, codes):
  return VQVAE().apply({"params": params}, codes, method=VQVAE.decode)


@jax.jit
def _encode(params, masks):
  return VQVAE().apply({"params": params}, masks, method=VQVAE.encode)


def _pad_batch(x):
  """Pads the batch axis with zeros to a power of two: fewer compilations."""
  n = x.shape[0]
  size = 1 << (n - 1).bit_length()
  return np.concatenate([x, np.zeros((size - n,) + x.shape[1:], x.dtype)])


def decode_masks(params, codes):
  """Decodes (B,16) codes in [0,128) into (B,64,64) float32 masks in [-1,1]."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != TOKENS_PER_MASK:
    raise ValueError(f"codes must be (B, 16), got {codes.shape}")
  if codes.size and (codes.min() < 0 or codes.max() >= NUM_CODES):
    raise ValueError(f"codes must lie in [0, {NUM_CODES}), got "
                     f"[{codes.min()}, {codes.max()}]")
  if codes.shape[0] == 0:
    return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
  n = codes.shape[0]
  out = _decode(params, jnp.asarray(_pad_batch(codes.astype(np.int32))))
  return np.asarray(out[:n])


def encode_masks(params, masks):
  """Encodes (B,64,64) masks with values in [0,1] into (B,16) int32 codes."""
  masks = np.asarray(masks, np.float32)
  if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
    raise ValueError(f"masks must be (B, 64, 64), got {masks.shape}")
  if masks.shape[0] == 0:
    return np.zeros((0, TOKENS_PER_MASK), np.int32)
  n = masks.shape[0]
  return np.asarray(_encode(params, jnp.asarray(_pad_batch(masks)))[:n])


def init_vae_params(seed=0):
  """Random parameters in the vae-oid.npz layout: {npz key: float32 array}.

  Same distributions as `VQVAE().init`, drawn with numpy: XLA takes minutes on
  a small CPU to compile its 47 random draws.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in VAE_SHAPES.items():
    if name == EMBEDDING:
      params[name] = rng.standard_normal(shape).astype(np.float32)
    else:
      b = _init_bound(name)
      params[name] = rng.uniform(-b, b, shape).astype(np.float32)
  return params


def save_vae(path, params):
  """Writes `params` (all of `VAE_SHAPES`, or a part) as an npz with the vae-oid.npz key names,
  at `path` exactly."""
  arrays = {k: np.asarray(params[k], np.float32) for k in VAE_SHAPES if k in params}
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def load_vae(path, parts=("decoder", "encoder")):
  """Reads vae-oid.npz (no pickle) into {npz key: float32 jax array}: the keys `parts` need
  (`vae_keys`), so a decoder-only file draws masks.

  Raises FileNotFoundError or ValueError naming the file, and for a bad key
  its expected and found shape. Keys this module does not use are ignored.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VQ-VAE checkpoint not found: {path}")
  try:
    npz = np.load(path, allow_pickle=False)
  except Exception as e:  # zipfile/pickle/format errors all mean "not an npz"
    raise ValueError(f"{path}: not a readable .npz file ({e})") from e
  if not hasattr(npz, "files"):
    raise ValueError(f"{path}: holds a single array, not an .npz of named arrays")
  params, problems = {}, []
  with npz:
    for key, shape in vae_keys(parts).items():
      if key not in npz.files:
        problems.append(f"key '{key}' missing (expected shape {shape})")
        continue
      try:
        arr = npz[key]
      except ValueError as e:  # object arrays need pickle: refuse them
        problems.append(f"key '{key}' unreadable without pickle ({e})")
        continue
      if arr.shape != shape:
        problems.append(
            f"key '{key}' expected shape {shape}, found {arr.shape}")
      elif not np.issubdtype(arr.dtype, np.floating):
        problems.append(
            f"key '{key}' expected a float array, found dtype {arr.dtype}")
      else:
        params[key] = arr.astype(np.float32)
  if problems:
    shown = problems[:10] + ([f"... and {len(problems) - 10} more"]
                             if len(problems) > 10 else [])
    raise ValueError(f"{path}: not a vae-oid.npz VQ-VAE checkpoint:\n  "
                     + "\n  ".join(shown))
  return {k: jnp.asarray(v) for k, v in params.items()}
