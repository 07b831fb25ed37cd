"""Gemma 1 and Gemma 2 decoders, parameter tree as big_vision's `models/ppp/gemma.py` (`llm/...`).

Axis letters: B batch, T query time, S key time (cache slots), D width,
N query heads, K kv heads, G query heads per kv head, H head dim, F mlp, V vocab, L depth.
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paligemma_jax import cpu_matvec

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

  Looked up in a table made at trace time and shared by every layer. Computed in the graph,
  XLA's CPU backend fuses sin and cos into each layer's rotation and evaluates them again
  per head and layer (~2 ms a layer in prefill).
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
  reshape here is free, where a 5-axis einsum made XLA's CPU backend transpose the scores
  and the queries in every layer.
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


# A product with few rows (decoding) is bound by reading the weight; contracting the major
# axis of a (D_in, D_out) weight in one dot reaches ~45% of memory bandwidth on XLA's CPU
# backend, in 8 chunks summed afterwards ~100% (benchmarks/README.md). Many rows (prefill)
# are bound by arithmetic, and one long contraction is then best.
DECODE_ROWS = 16
DECODE_CHUNKS = 8  # a power of two


def contract_stored(x, w):
  """x (X, I), w (G, I, O) -> (X, G, O) = x @ w[g] for each g, reading w as stored.

  A matmul batched over G (and, for few rows, over chunks of I), so XLA's CPU dot reads
  each (I, O) block where it lies: no transposed or sliced copy of w per call.
  """
  rows, (g, i, o) = x.shape[0], w.shape
  chunks = 1
  if rows <= DECODE_ROWS:  # halve I while blocks stay >= 512 KiB of float32 (smaller: slower)
    while chunks < DECODE_CHUNKS and i % (2 * chunks) == 0 and i // (2 * chunks) * o >= 2**17:
      chunks *= 2
  xs = x.reshape(rows, chunks, i // chunks).transpose(1, 0, 2)  # (c, X, I/c)
  xs = jnp.broadcast_to(xs[None], (g, chunks, rows, i // chunks))
  out = jnp.einsum("BXI,BIO->XBO", xs.reshape(g * chunks, rows, i // chunks),
                   w.reshape(g * chunks, i // chunks, o))
  out = out.reshape(rows, g, chunks, o)
  while out.shape[2] > 1:  # pairwise adds: XLA hands a reduce to YNNPACK, ~0.3 ms a call here
    half = out.shape[2] // 2
    out = out[:, :, :half] + out[:, :, half:]
  return out[:, :, 0]


def project_heads(x, w):
  """x (B,T,D), w (N,D,H) -> (B,T,N,H)."""
  b, t, d = x.shape
  return contract_stored(x.reshape(b * t, d), w).reshape(b, t, w.shape[0], w.shape[2])


def einsum_stored_layout(eqn, x, w):
  """jnp.einsum(eqn, x, w), phrased so that XLA's CPU dot reads w as stored (`contract_stored`).

  Written plainly, the head projections and the stacked q/k/v weights make XLA copy a
  transposed weight on every call, which in decoding costs more than the product itself
  (measured: 2.4x slower decode steps on the `small` benchmark preset).
  """
  if eqn == "BTD,NDH->BTNH":
    return project_heads(x, w)
  if eqn in ("BTD,SNDH->SBTNH", "BSD,CKDH->CBSKH"):  # stacked (q, k, v) or (k, v)
    # (S, N, D, H) viewed as (S*N, D, H) is free; slicing w[i] would copy it every call.
    s, n, d, h = w.shape
    out = project_heads(x, w.reshape(s * n, d, h))
    return jnp.moveaxis(out.reshape(*x.shape[:2], s, n, h), 2, 0)
  if eqn == "BTNH,NHD->BTD":  # (N, H, D) viewed as (1, N*H, D) is free
    b, t, n, h = x.shape
    return contract_stored(x.reshape(b * t, n * h), w.reshape(1, n * h, -1)).reshape(b, t, -1)
  return jnp.einsum(eqn, x, w)


# The out-major inference layout (`unstack_layers(out_major=True)`): each language-model
# layer weight transposed once at load so that its contracted (input) axes come last, stored
# as `<name>_out_major`. Per-layer axis permutations from big_vision's layout:
OUT_MAJOR = {"attn/q_einsum/w": (0, 2, 1),             # (N, D, H) -> (N, H, D)
             "attn/kv_einsum/w": (0, 1, 3, 2),         # (2, K, D, H) -> (2, K, H, D)
             "attn/qkv_einsum/w": (0, 1, 3, 2),        # (3, N, D, H) -> (3, N, H, D)
             "attn/attn_vec_einsum/w": (2, 0, 1),      # (N, H, D) -> (D, N, H)
             "mlp/gating_einsum": (0, 2, 1),           # (2, D, F) -> (2, F, D)
             "mlp/linear": (1, 0)}                     # (F, D) -> (D, F)
OUT_MAJOR_SUFFIX = "_out_major"


def on_cpu() -> bool:
  """Whether jax computes on the CPU: the layout workarounds below are for XLA's CPU backend."""
  return jax.default_backend() == "cpu"


def bf16_kernel_reads(w, allowed: bool = True) -> bool:
  """Whether `cpu_matvec` reads w: a bfloat16 w on the CPU, where the caller allows it (w is
  whole on this device: a sharded w would be gathered for it)."""
  return allowed and on_cpu() and w.dtype == jnp.bfloat16 and cpu_matvec.available()


def contract_out_major(x, w, out_dtype=None, kernel=True):
  """x (X, I), w (O, I) as stored -> (X, O) in out_dtype (default x's), computed in x's dtype.

  On the CPU a bfloat16 w goes to `cpu_matvec` if `kernel` (`bf16_kernel_reads`), `matvec` for
  few rows and `gemm` for many: they widen w as they read it (accumulating in float32) where
  XLA would write a float32 copy in a pass of its own. Otherwise, with few rows, the
  product is phrased (O, I) @ (I, X), which XLA's CPU dot runs 2-3x faster than
  (X, I) @ (I, O) (measured at 8 rows). The barriers keep layout assignment from folding the
  activation transposes into the dot, which turns it back into the slow form. Off the CPU
  the product is one plain dot, which XLA's GPU backend reads at 2.8-3.0 TB/s on an H100 for
  the large decode weights (benchmarks/README.md).
  """
  out_dtype = out_dtype or x.dtype
  rows = x.shape[0]
  cpu = on_cpu()
  if bf16_kernel_reads(w, kernel):
    product = cpu_matvec.matvec if rows <= DECODE_ROWS else cpu_matvec.gemm
    return product(x, w).astype(out_dtype)
  w = w.astype(x.dtype)
  if rows > DECODE_ROWS or not cpu:  # prefill is bound by arithmetic: the plain product
    return jnp.einsum("XI,OI->XO", x, w, preferred_element_type=out_dtype)
  barrier = jax.lax.optimization_barrier
  return barrier(jnp.einsum("OI,IX->OX", w, barrier(x.T), preferred_element_type=out_dtype)).T


class Einsum(nn.Module):
  """A weight `w` of a given shape, applied with an einsum equation.

  out_major: the weight is held as `w_out_major`, transposed by `OUT_MAJOR` (equations of
  the attention block only).
  """
  shape: tuple
  dtype: jnp.dtype
  out_major: bool = False

  @nn.compact
  def __call__(self, eqn, x):
    if not self.out_major:
      w = self.param("w", nn.initializers.normal(), self.shape)
      return einsum_stored_layout(eqn, x, w.astype(self.dtype))
    perm = OUT_MAJOR[f"attn/{self.name}/w"]
    w = self.param("w" + OUT_MAJOR_SUFFIX, nn.initializers.normal(),
                   tuple(self.shape[i] for i in perm))  # contract_out_major casts it
    b, t = x.shape[:2]
    if eqn == "BTNH,NHD->BTD":
      return contract_out_major(x.reshape(b * t, -1), w.reshape(w.shape[0], -1)).reshape(b, t, -1)
    out = contract_out_major(x.reshape(b * t, -1), w.reshape(-1, w.shape[-1]))
    out = out.reshape(b, t, *w.shape[:-1])
    return out if eqn == "BTD,NDH->BTNH" else jnp.moveaxis(out, 2, 0)


class Embedder(nn.Module):
  vocab_size: int
  width: int
  dtype: jnp.dtype
  out_major: bool = False  # the one-device inference tree: the bfloat16 kernels may read it

  def setup(self):
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(), (self.vocab_size, self.width))

  def encode(self, tokens):
    """(B, T) int -> (B, T, D), scaled by sqrt(D) as Gemma does for text."""
    table = self.input_embedding
    if bf16_kernel_reads(table, self.out_major):
      x = cpu_matvec.rows(table, tokens).astype(self.dtype)  # see cpu_matvec.rows
    else:
      x = table[(tokens,)].astype(self.dtype)
    return x * jnp.sqrt(self.width).astype(self.dtype)

  def decode(self, x):
    """(B, T, D) -> float32 logits (B, T, V) through the tied embedding."""
    b, t, d = x.shape
    # The embedding (V, D) is already out-major: read as stored, vocabulary-major.
    logits = contract_out_major(x.reshape(b * t, d), self.input_embedding, jnp.float32,
                                kernel=self.out_major)
    return logits.reshape(b, t, -1)


def update_in_place(buffer, update, index):
  """dynamic_update_slice(buffer, update cast to buffer's dtype, index), in place.

  XLA's CPU backend widens a 16-bit float update-slice to float32, the whole buffer and back
  (a copy of the stacked cache per layer and step); on the 16-bit integer view it writes in
  place. Other backends update 16-bit floats in place as they are.
  """
  update = update.astype(buffer.dtype)
  if buffer.dtype.itemsize != 2 or not jnp.issubdtype(buffer.dtype, jnp.floating) \
      or not on_cpu():
    return jax.lax.dynamic_update_slice(buffer, update, index)
  bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
  written = jax.lax.dynamic_update_slice(bits(buffer), bits(update), index)
  return jax.lax.bitcast_convert_type(written, buffer.dtype)


def take_rows(x, index):
  """x (B, T, ...), index (B,) int -> (B, 1, ...): row index[b] of each batch row b."""
  return jnp.take_along_axis(x, index.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


class Attention(nn.Module):
  config: GemmaConfig
  dtype: jnp.dtype
  layer: Optional[int] = None  # set: the cache holds every layer, (L, B, S_cache, K, H)
  out_major: bool = False

  @nn.compact
  def __call__(self, x, rope, mask, cache, write_index, keep=None):
    """x: (B,T,D); rope: `rope_table` of x's positions; mask: (B,T,S), S = T (attend to these
    inputs) or S = cache size.

    cache: None or {"k", "v"}: (B, S_cache, K, H), or (L, B, S_cache, K, H) when `layer` is
    set. The new keys/values are written at `write_index` (in place, in layer `layer`);
    when the mask spans the cache, attention reads the whole cache.
    keep: None, or (B,) the one query row per batch row to compute (keys and values are
    still made for all T): the output is then (B, 1, D).
    """
    c = self.config
    n, k_heads, h, d = c.num_heads, c.num_kv_heads, c.head_dim, c.width
    q_rope = rope if keep is None else tuple(take_rows(a, keep) for a in rope)
    if keep is not None:
      mask = take_rows(mask, keep)
    if n == k_heads:
      q, k, v = Einsum((3, n, d, h), self.dtype, self.out_major,
                       name="qkv_einsum")("BTD,SNDH->SBTNH", x)
      q = q if keep is None else take_rows(q, keep)
    else:
      q = Einsum((n, d, h), self.dtype, self.out_major, name="q_einsum")(
          "BTD,NDH->BTNH", x if keep is None else take_rows(x, keep))
      k, v = Einsum((2, k_heads, d, h), self.dtype, self.out_major,
                    name="kv_einsum")("BSD,CKDH->CBSKH", x)
    q = apply_rope(q, q_rope) * jnp.asarray(c.query_pre_attn_scalar**-0.5, self.dtype)
    k = apply_rope(k, rope)

    new_cache = None
    if cache is not None:
      stacked = self.layer is not None
      idx = ((self.layer,) if stacked else ()) + (0, write_index, 0, 0)
      write = lambda c, new: update_in_place(c, new[None] if stacked else new, idx)
      new_cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
      if mask.shape[-1] == cache["k"].shape[-3]:
        read = lambda c: (c[self.layer] if stacked else c).astype(self.dtype)
        k, v = read(new_cache["k"]), read(new_cache["v"])

    encoded = dot_product_attention(q, k, v, mask, c.attn_logits_softcap)
    out = Einsum((n, h, d), self.dtype, self.out_major,
                 name="attn_vec_einsum")("BTNH,NHD->BTD", encoded)
    return out, new_cache


class FeedForward(nn.Module):
  """Gated GELU MLP: gelu_tanh(x W_gate) * (x W_up) -> W_down."""
  width: int
  mlp_dim: int
  dtype: jnp.dtype
  out_major: bool = False  # weights as `gating_einsum_out_major`, `linear_out_major`

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    f = self.mlp_dim
    init = nn.initializers.normal()
    if self.out_major:
      w_gating = self.param("gating_einsum" + OUT_MAJOR_SUFFIX, init, (2, f, d))
      w_linear = self.param("linear" + OUT_MAJOR_SUFFIX, init, (d, f))
      gate_up = contract_out_major(x.reshape(b * t, d), w_gating.reshape(2 * f, d))
      gate_up = gate_up.reshape(b, t, 2, f)
    else:
      w_gating = self.param("gating_einsum", init, (2, d, f))
      w_linear = self.param("linear", init, (f, d))
      # As the head projections, a matmul batched over the stacked (gate, up): the plain
      # einsum makes XLA's CPU dot copy a transposed weight, and w[0], w[1] copy slices.
      gate_up = project_heads(x, w_gating.astype(self.dtype))  # (B, T, 2, F)
    hidden = (nn.gelu(gate_up[:, :, 0], approximate=True) * gate_up[:, :, 1]).reshape(b * t, f)
    if self.out_major:
      out = contract_out_major(hidden, w_linear)
    else:
      out = contract_stored(hidden, w_linear.astype(self.dtype)[None])
    return out.reshape(b, t, d)


class Block(nn.Module):
  """One decoder layer: (x, cache) -> (x, new cache).

  Scanned (layer None) it sees its own cache slice; unrolled, the whole stacked cache.
  """
  config: GemmaConfig
  dtype: jnp.dtype
  layer: Optional[int] = None
  out_major: bool = False

  @nn.compact
  def __call__(self, x, cache, rope, mask, write_index, keep=None):
    """keep: see `Attention`; the residual stream then continues for those rows only."""
    c = self.config
    y = RMSNorm(name="pre_attention_norm")(x)
    y, new_cache = Attention(c, self.dtype, self.layer, self.out_major, name="attn")(
        y, rope, mask, cache, write_index, keep)
    if keep is not None:
      x = take_rows(x, keep)
    if c.post_norms:
      y = RMSNorm(name="post_attention_norm")(y)
    x = x + y
    y = RMSNorm(name="pre_ffw_norm")(x)
    y = FeedForward(c.width, c.mlp_dim, self.dtype, self.out_major, name="mlp")(y)
    if c.post_norms:
      y = RMSNorm(name="post_ffw_norm")(y)
    return x + y, new_cache


class Gemma(nn.Module):
  """Decoder over already-embedded inputs; the caller embeds text and images.

  scan_layers=True: big_vision's tree, one `layers` subtree stacked over depth (L, ...).
  scan_layers=False: the inference layout, `layers_0` ... `layers_{L-1}` (see
  `unstack_layers`). Scanning slices every layer's weights out of the stacked arrays, a
  copy of the whole model per decode step that costs more than the step's own reads.
  out_major (with scan_layers=False): the layer weights transposed as `OUT_MAJOR` says.
  """
  config: GemmaConfig
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  out_major: bool = False

  def setup(self):
    c = self.config
    self.embedder = Embedder(c.vocab_size, c.width, self.dtype, self.out_major)
    if self.scan_layers:
      self.layers = nn.scan(
          Block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
          length=c.depth)(c, self.dtype)
    else:
      self.layers = [Block(c, self.dtype, layer=i, out_major=self.out_major)
                     for i in range(c.depth)]
    self.final_norm = RMSNorm()

  def embed(self, tokens):
    return self.embedder.encode(tokens)

  def __call__(self, x, positions, mask, cache=None, write_index=0, keep=None):
    """x: (B,T,D) embedded inputs -> (final-normed hidden (B,T,D), new cache).

    cache: None or {"k", "v"} of shape (L, B, S, K, H).
    keep: None, or (B,) int: return only that position's hidden state per row, (B, 1, D).
    Unrolled, the last layer then computes its query, attention output and MLP for those
    rows alone (every layer's keys and values are still computed for all T).
    """
    x = x.astype(self.dtype)
    num_positions = x.shape[1] if cache is None else cache["k"].shape[-3]
    rope = rope_table(positions, self.config.head_dim, num_positions)
    if self.scan_layers:
      x, cache = self.layers(x, cache, rope, mask, write_index)
      x = x if keep is None else take_rows(x, keep)
    else:
      for i, block in enumerate(self.layers):
        last = i == len(self.layers) - 1
        x, cache = block(x, cache, rope, mask, write_index, keep if last else None)
    return self.final_norm(x), cache

  def logits(self, hidden):
    """(B, T, D) -> float32 (B, T, V), final softcap applied when configured."""
    return softcap(self.embedder.decode(hidden), self.config.final_logits_softcap)


def split_layers(name: str, stacked, out_major: bool = False):
  """One stacked layer array `name` (below `layers/`, e.g. "mlp/linear"), (L, ...) ->
  [(name in layer i's tree, its array)] for i < L; a numpy array (e.g. memory-mapped) or a
  jax.Array. out_major: the arrays named in `OUT_MAJOR` are transposed (`<name>_out_major`)."""
  perm = OUT_MAJOR.get(name) if out_major else None
  if perm is None:
    return [(name, stacked[i]) for i in range(stacked.shape[0])]
  return [(name + OUT_MAJOR_SUFFIX, stacked[i].transpose(perm)) for i in range(stacked.shape[0])]


def unstack_layers(params: dict, consume: bool = False, out_major: bool = False,
                   name: str = "layers") -> dict:
  """A tree with one subtree `name` stacked over depth (big_vision's `llm` with `layers`, or
  its `img/Transformer` with `encoderblock`) -> the unscanned tree (`<name>_i`, i < depth).

  out_major: see `split_layers`. consume=True pops `name` from `params` and drops each
  stacked array once it is split, so at most one array exists twice at any time (the caller
  must hold no other reference); otherwise the input is left intact.
  """
  if name not in params:
    return params
  src = params if consume else dict(params)
  flat = traverse_util.flatten_dict(src.pop(name), sep="/")
  depth = next(iter(flat.values())).shape[0]
  per_layer = [{} for _ in range(depth)]
  for key in list(flat):
    stacked = flat.pop(key)
    for i, (leaf, array) in enumerate(split_layers(key, stacked, out_major)):
      per_layer[i][leaf] = array
    del stacked
  out = dict(src)
  for i, layer in enumerate(per_layer):
    out[f"{name}_{i}"] = traverse_util.unflatten_dict(layer, sep="/")
  return out


def stack_layers(params: dict, name: str = "layers") -> dict:
  """The inverse of `unstack_layers` (a tree already stacked is returned as is)."""
  prefix = name + "_"
  is_layer = lambda k: k.startswith(prefix) and k[len(prefix):].isdigit()
  names = sorted(filter(is_layer, params), key=lambda k: int(k[len(prefix):]))
  if not names:
    return params
  out = {k: v for k, v in params.items() if not is_layer(k)}
  layers = {}
  for key in traverse_util.flatten_dict(params[names[0]], sep="/"):
    leaf, perm = key, None
    if key.endswith(OUT_MAJOR_SUFFIX):
      leaf = key[:-len(OUT_MAJOR_SUFFIX)]
      perm = tuple(np.argsort(OUT_MAJOR[leaf]))
    per_layer = [traverse_util.flatten_dict(params[n], sep="/")[key] for n in names]
    layers[leaf] = jnp.stack([a if perm is None else jnp.transpose(a, perm) for a in per_layer])
  out[name] = traverse_util.unflatten_dict(layers, sep="/")
  return out


def init_cache(config: GemmaConfig, batch: int, size: int, dtype) -> dict:
  shape = (config.depth, batch, size, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
