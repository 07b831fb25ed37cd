"""Gemma 1 and Gemma 2 decoders, parameter tree as big_vision's `models/ppp/gemma.py` (`llm/...`).

Axis letters: B batch, T query time, S key time (cache slots), D width,
N query heads, K kv heads, G query heads per kv head, H head dim, F mlp, V vocab, L depth.

Plain einsums over the stored tree. Faster paths for inference (other weight layouts, kernels,
the sharded decode step) are installed around these modules from outside, with
`nn.intercept_methods`.
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

RMS_EPS = 1e-6
ROPE_BASE = 10_000
MASK_VALUE = -2.3819763e38  # big_vision's "minus infinity" that keeps softmax finite


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  width: int = 2048
  depth: int = 18
  mlp_dim: int = 16384
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  vocab_size: int = 257152
  post_norms: bool = False  # Gemma 2: post_attention_norm and post_ffw_norm
  attn_logits_softcap: Optional[float] = None
  final_logits_softcap: Optional[float] = None
  query_scale: str = "head_dim"  # or "width_over_heads" (Gemma 2 27B)

  @property
  def query_pre_attn_scalar(self) -> float:
    if self.query_scale == "head_dim":
      return float(self.head_dim)
    if self.query_scale == "width_over_heads":
      return self.width / self.num_heads
    raise ValueError(f"query_scale must be 'head_dim' or 'width_over_heads', got {self.query_scale!r}")


def softcap(x, cap):
  return x if not cap else jnp.tanh(x / cap) * cap


def rope_table(positions, head_dim, num_positions):
  """positions (B, T) int in [0, num_positions) -> (cos, sin), each (B, T, 1, 2, H/2) float32:
  (cos, cos) and (-sin, sin) over the two halves of a head.

  Looked up in a table made at trace time and shared by every layer: computed in the graph,
  sin and cos were fused into each layer's rotation and evaluated again per head and layer.
  """
  # Inverse frequencies rounded once from float64, angles in float32, as PyTorch computes them.
  inv_freq = (1.0 / ROPE_BASE ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
  angle = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq  # (P, H/2)
  cos, sin = np.cos(angle), np.sin(angle)
  lookup = lambda table: jnp.take(jnp.asarray(table), positions, axis=0, mode="clip")[:, :, None]
  return lookup(np.stack([cos, cos], 1)), lookup(np.stack([-sin, sin], 1))


def apply_rope(x, rope):
  """Rotary embedding, halves split: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).

  x: (B, T, N, H); rope: `rope_table` of its positions. One elementwise pass: the halves are
  swapped by reversing an axis of size 2.
  """
  cos, sin = rope
  halves = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, -1)
  return (halves * cos + halves[..., ::-1, :] * sin).reshape(x.shape).astype(x.dtype)


def dot_product_attention(q, k, v, mask, cap=None):
  """q (B,T,N,H) (already scaled), k, v (B,S,K,H), mask (B,T,S) bool -> (B,T,N,H).

  The G = N/K query heads that share a kv head are folded into the query axis, so that the
  two products and the softmax run on (B, K, T*G, S) with S last: with one kv head every
  reshape here is free, where a 5-axis einsum transposed the scores and the queries in
  every layer.
  """
  b, t, n, h = q.shape
  k_heads = k.shape[2]
  g = n // k_heads
  q = q.reshape(b, t, k_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(b, k_heads, t * g, h)
  logits = jnp.einsum("BKQH,BSKH->BKQS", q, k, preferred_element_type=jnp.float32)
  logits = softcap(logits, cap).reshape(b, k_heads, t, g, -1)
  logits = jnp.where(mask[:, None, :, None, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype).reshape(b, k_heads, t * g, -1)
  out = jnp.einsum("BKQS,BSKH->BKQH", probs, v)
  return out.reshape(b, k_heads, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + RMS_EPS)
    return (normed * (1 + scale.astype(jnp.float32))).astype(x.dtype)


class Einsum(nn.Module):
  """A weight `w` of a given shape, applied with an einsum equation."""
  shape: tuple
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", nn.initializers.normal(), self.shape)
    return jnp.einsum(eqn, x, w.astype(self.dtype))


class Embedder(nn.Module):
  vocab_size: int
  width: int
  dtype: jnp.dtype

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(), (self.vocab_size, self.width))

  def encode(self, tokens):
    """(B, T) int -> (B, T, D), scaled by sqrt(D) as Gemma does for text."""
    x = self.input_embedding[(tokens,)].astype(self.dtype)
    return x * jnp.sqrt(self.width).astype(self.dtype)

  def decode(self, x):
    """(B, T, D) -> float32 logits (B, T, V) through the tied embedding."""
    table = self.input_embedding.astype(x.dtype)
    return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


def take_rows(x, index):
  """x (B, T, ...), index (B,) int -> (B, 1, ...): row index[b] of each batch row b."""
  return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


class Attention(nn.Module):
  config: GemmaConfig
  dtype: jnp.dtype
  layer: Optional[int] = None  # set: the cache holds every layer, (L, B, S_cache, K, H)

  def write_cache(self, buffer, new, index):
    """buffer with `new` (cast to buffer's dtype) written at `index` (dynamic_update_slice)."""
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), index)

  @nn.compact
  def __call__(self, x, rope, mask, cache, write_index, keep=None):
    """x: (B,T,D); rope: `rope_table` of x's positions; mask: (B,T,S), S = T (attend to these
    inputs) or S = cache size.

    cache: None or {"k", "v"}: (B, S_cache, K, H), or (L, B, S_cache, K, H) when `layer` is
    set. The new keys/values are written at `write_index` (in layer `layer`); when the mask
    spans the cache, attention reads the whole cache.
    keep: None, or (B,) the one query row per batch row to compute (keys and values are
    still made for all T): the output is then (B, 1, D).
    """
    c = self.config
    n, k_heads, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.width
    q_rope = rope if keep is None else tuple(take_rows(a, keep) for a in rope)
    if keep is not None:
      mask = take_rows(mask, keep)
    if n == k_heads:
      q, k, v = Einsum((3, n, d, h), self.dtype, name="qkv_einsum")("BTD,SNDH->SBTNH", x)
      q = q if keep is None else take_rows(q, keep)
    else:
      q = Einsum((n, d, h), self.dtype, name="q_einsum")(
          "BTD,NDH->BTNH", x if keep is None else take_rows(x, keep))
      k, v = Einsum((2, k_heads, d, h), self.dtype, name="kv_einsum")("BSD,CKDH->CBSKH", x)
    q = apply_rope(q, q_rope) * jnp.asarray(c.query_pre_attn_scalar**-0.5, self.dtype)
    k = apply_rope(k, rope)

    new_cache = None
    if cache is not None:
      stacked = self.layer is not None
      idx = ((self.layer,) if stacked else ()) + (0, write_index, 0, 0)
      write = lambda c, new: self.write_cache(c, new[None] if stacked else new, idx)
      new_cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
      if mask.shape[-1] == cache["k"].shape[-3]:
        read = lambda c: (c[self.layer] if stacked else c).astype(self.dtype)
        k, v = read(new_cache["k"]), read(new_cache["v"])

    encoded = dot_product_attention(q, k, v, mask, c.attn_logits_softcap)
    out = Einsum((n, h, d), self.dtype, name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)
    return out, new_cache


class FeedForward(nn.Module):
  """Gated GELU MLP: gelu_tanh(x W_gate) * (x W_up) -> W_down. x (B,T,D) -> (B,T,D)."""
  width: int
  mlp_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    gate, up = self.project("gating_einsum", "BTD,CDF->CBTF", x, (2, self.width, self.mlp_dim))
    hidden = nn.gelu(gate, approximate=True) * up
    return self.project("linear", "BTF,FD->BTD", hidden, (self.mlp_dim, self.width))

  def project(self, name, eqn, x, shape):
    """The einsum of x with the weight `name` (a method of its own, like `Einsum.__call__`,
    so that interceptors such as LoRA see every weight product)."""
    w = self.param(name, nn.initializers.normal(), shape)
    return jnp.einsum(eqn, x, w.astype(self.dtype))


class Block(nn.Module):
  """One decoder layer: (x, cache) -> (x, new cache).

  Scanned (layer None) it sees its own cache slice; unrolled, the whole stacked cache.
  dropout: on the attention and MLP outputs (big_vision's places), when not deterministic.
  """
  config: GemmaConfig
  dtype: jnp.dtype
  layer: Optional[int] = None
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, cache, rope, mask, write_index, keep=None, deterministic=True):
    """keep: see `Attention`; the residual stream then continues for those rows only."""
    c = self.config
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic) if self.dropout else y
    y = RMSNorm(name="pre_attention_norm")(x)
    y, new_cache = Attention(c, self.dtype, self.layer, name="attn")(
        y, rope, mask, cache, write_index, keep)
    if keep is not None:
      x = take_rows(x, keep)
    if c.post_norms:
      y = RMSNorm(name="post_attention_norm")(y)
    x = x + drop(y)
    y = RMSNorm(name="pre_ffw_norm")(x)
    y = drop(FeedForward(c.width, c.mlp_dim, self.dtype, name="mlp")(y))
    if c.post_norms:
      y = RMSNorm(name="post_ffw_norm")(y)
    return x + y, new_cache


class Gemma(nn.Module):
  """Decoder over already-embedded inputs; the caller embeds text and images.

  scan_layers=True: big_vision's tree, one `layers` subtree stacked over depth (L, ...).
  scan_layers=False: the inference tree, `layers_0` ... `layers_{L-1}` (`layouts.unstacked`):
  a scan slices (copies) every layer's weights out of the stacked arrays on every call,
  which in decoding costs more than the step's own reads.
  dropout, remat_policy: training knobs as big_vision's (`remat_policy` names a
  `jax.checkpoint_policies` member, e.g. "nothing_saveable"; "none" keeps activations).
  """
  config: GemmaConfig
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  dropout: float = 0.0
  remat_policy: str = "none"

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.width, self.dtype)
    block = Block
    if self.remat_policy != "none":  # 0 = self, 7 = deterministic
      block = nn.remat(Block, prevent_cse=not self.scan_layers, static_argnums=(7,),
                       policy=getattr(jax.checkpoint_policies, self.remat_policy))
    if self.scan_layers:
      self.layers = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(0,) + (nn.broadcast,) * 5,
          length=c.depth)(c, self.dtype, dropout=self.dropout)
    else:
      self.layers = [block(c, self.dtype, layer=i, dropout=self.dropout)
                     for i in range(c.depth)]
    self.final_norm = RMSNorm()

  def embed(self, tokens):
    return self.embedder.encode(tokens)

  def __call__(self, x, positions, mask, cache=None, write_index=0, keep=None,
               deterministic=True):
    """x: (B,T,D) embedded inputs -> (final-normed hidden (B,T,D), new cache).

    positions (B,T) int; mask (B,T,S) bool; cache: None or {"k", "v"} of shape (L, B, S, K, H).
    keep: None, or (B,) int: return only that position's hidden state per row, (B, 1, D).
    Unrolled, the last layer then computes its query, attention output and MLP for those
    rows alone (every layer's keys and values are still computed for all T).
    """
    x = x.astype(self.dtype)
    num_positions = x.shape[1] if cache is None else cache["k"].shape[-3]
    rope = rope_table(positions, self.config.head_dim, num_positions)
    if self.scan_layers:
      x, cache = self.layers(x, cache, rope, mask, write_index, None, deterministic)
      x = x if keep is None else take_rows(x, keep)
    else:
      for i, block in enumerate(self.layers):
        last = i == len(self.layers) - 1
        x, cache = block(x, cache, rope, mask, write_index, keep if last else None,
                         deterministic)
    return self.final_norm(x), cache

  def logits(self, hidden):
    """(B, T, D) -> float32 (B, T, V), final softcap applied when configured."""
    return softcap(self.embedder.decode(hidden), self.config.final_logits_softcap)


def init_cache(config: GemmaConfig, batch: int, size: int, dtype) -> dict:
  shape = (config.depth, batch, size, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
