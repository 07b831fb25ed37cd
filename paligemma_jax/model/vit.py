"""SigLIP vision tower, parameter tree as big_vision's `models/vit.py` (`img/...`).

Pre-LayerNorm encoder blocks (stacked over depth in big_vision's tree), learned position
embedding, no pooling; `head` projects every patch token to the language model width.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224
  patch: int = 14
  width: int = 1152
  depth: int = 27
  mlp_dim: int = 4304
  num_heads: int = 16
  out_dim: int = 2048  # language model width D (the `head` output)

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch) ** 2


def _dense(features, dtype, name, axis=-1):
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, name=name)


class MultiHeadDotProductAttention(nn.Module):
  """Full self-attention. x: (B, T, W) -> (B, T, W)."""
  num_heads: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    q = _dense((self.num_heads, head_dim), self.dtype, "query")(x)  # BTNH
    k = _dense((self.num_heads, head_dim), self.dtype, "key")(x)
    v = _dense((self.num_heads, head_dim), self.dtype, "value")(x)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k).astype(jnp.float32)
    logits = logits * head_dim**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
    return _dense(width, self.dtype, "out", axis=(-2, -1))(out)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: jnp.dtype
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    x = nn.gelu(x, approximate=True)
    x = nn.Dropout(self.dropout)(x, deterministic)
    return nn.Dense(width, dtype=self.dtype, name="Dense_1")(x)


def _layer_norm(name):
  # Statistics in float32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)


class Encoder1DBlock(nn.Module):
  """One pre-LN block; returns (carry, None), the form nn.scan takes.

  dropout: after the attention and inside and after the MLP, as big_vision's ViT.
  """
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = _layer_norm("LayerNorm_0")(x).astype(self.dtype)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(y)
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = _layer_norm("LayerNorm_1")(x).astype(self.dtype)
    y = MlpBlock(self.mlp_dim, self.dtype, self.dropout, name="MlpBlock_0")(y, deterministic)
    return x + nn.Dropout(self.dropout)(y, deterministic), None


class Transformer(nn.Module):
  """scan_layers: big_vision's tree (`encoderblock` stacked over depth), else one
  `encoderblock_i` per layer (`layouts.unstacked`). remat_policy: see `gemma.Gemma`."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype
  scan_layers: bool = True
  dropout: float = 0.0
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, deterministic=True):
    block = Encoder1DBlock
    if self.remat_policy != "none":  # 0 = self, 2 = deterministic
      block = nn.remat(block, prevent_cse=not self.scan_layers, static_argnums=(2,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    args = (self.num_heads, self.mlp_dim, self.dtype, self.dropout)
    if self.scan_layers:
      blocks = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast,
          length=self.depth)
      x, _ = blocks(*args, name="encoderblock")(x, deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(*args, name=f"encoderblock_{i}")(x, deterministic)
    return _layer_norm("encoder_norm")(x)


class ViT(nn.Module):
  """images: (B, S, S, 3) in [-1, 1] -> tokens (B, (S/P)^2, out_dim)."""
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  dropout: float = 0.0
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, images, deterministic=True):
    c = self.config
    x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch),
                padding="VALID", dtype=self.dtype, name="embedding")(
                    images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    pos = self.param("pos_embedding", nn.initializers.normal(1 / d**0.5),
                     (1, h * w, d), jnp.float32)
    x = x.astype(jnp.float32) + pos.astype(jnp.float32)
    x = Transformer(c.depth, c.num_heads, c.mlp_dim, self.dtype, self.scan_layers,
                    self.dropout, self.remat_policy, name="Transformer")(
                        x.astype(self.dtype), deterministic)
    return nn.Dense(c.out_dim, dtype=self.dtype, name="head")(
        x.astype(self.dtype))
