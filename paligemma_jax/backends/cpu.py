"""XLA:CPU inference on one device: the out-major tree (`out_major.py`) with CPU products.

Measured on the benchmarks' `small` preset (benchmarks/README.md):
- Few rows (decoding), float32: XLA's CPU dot runs (O, I) @ (I, X) 2-3x faster than
  (X, I) @ (I, O); the optimization barriers keep layout assignment from folding the
  activation transposes back into the slow form.
- bfloat16 weights: XLA's CPU backend has no bfloat16 dot on most x86 CPUs and writes a
  float32 copy of each weight first (hoisting it out of the decode loop, so it keeps them
  all); `cpu_kernels` widens in registers instead (`matvec` for few rows, `gemm` for many
  where the CPU has AVX-512, `cpu_kernels.gemm_is_fast`),
  and looks up bfloat16 embedding rows (XLA widened the whole table, ~0.35 s a call).
- 16-bit KV caches: XLA's CPU backend widens a 16-bit float update-slice to float32, the
  whole buffer and back; on the 16-bit integer view it writes in place.
"""
import jax
import jax.numpy as jnp

from paligemma_jax.backends import cpu_kernels, out_major

DECODE_ROWS = 16  # up to this many rows a product is bound by reading the weight


def product(x, w, out_dtype=None):
  """x (X, I), w (O, I) as stored -> (X, O) in out_dtype (default x's), computed in x's
  dtype (a bfloat16 w through the kernels: accumulated in float32)."""
  out_dtype = out_dtype or x.dtype
  if w.dtype == jnp.bfloat16 and cpu_kernels.available():
    if x.shape[0] <= DECODE_ROWS:
      return cpu_kernels.matvec(x, w).astype(out_dtype)
    if cpu_kernels.gemm_is_fast():
      return cpu_kernels.gemm(x, w).astype(out_dtype)
  if x.shape[0] > DECODE_ROWS:  # prefill is bound by arithmetic: the plain product
    return out_major.plain_product(x, w, out_dtype)
  barrier = jax.lax.optimization_barrier
  w = w.astype(x.dtype)
  return barrier(jnp.einsum("OI,IX->OX", w, barrier(x.T), preferred_element_type=out_dtype)).T


def lookup(table, tokens):
  """table (V, D)[tokens]; a bfloat16 table through `cpu_kernels.rows`."""
  if table.dtype == jnp.bfloat16 and cpu_kernels.available():
    return cpu_kernels.rows(table, tokens)
  return table[(tokens,)]


def write_cache(buffer, update, index):
  """dynamic_update_slice(buffer, update cast to buffer's dtype, index), in place for
  16-bit floats too (through their 16-bit integer view)."""
  update = update.astype(buffer.dtype)
  if buffer.dtype.itemsize != 2 or not jnp.issubdtype(buffer.dtype, jnp.floating):
    return jax.lax.dynamic_update_slice(buffer, update, index)
  bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
  written = jax.lax.dynamic_update_slice(bits(buffer), bits(update), index)
  return jax.lax.bitcast_convert_type(written, buffer.dtype)


def install():
  """Context: trace the model (on the out-major tree) with the CPU's products."""
  return out_major.install(product=product, lookup=lookup, write_cache=write_cache)
