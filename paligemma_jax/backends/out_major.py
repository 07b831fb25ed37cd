"""Inference on one device over the out-major tree (`layouts.unstacked(out_major=True)`).

Decoding is bound by reading the weights. Each language-model product is phrased as
x (X, I) against a weight stored (O, I), its contracted axes last, which the compilers read
fastest at few rows; the modules' own einsums over big_vision's layout would copy a
transposed weight per call. `interceptor` reads the out-major weights in place of the
modules' and calls `product` for every product; a backend passes its own (`cpu.py`).
"""
import flax.linen as nn
import jax.numpy as jnp

from paligemma_jax.model import gemma, layouts


def plain_product(x, w, out_dtype=None):
  """x (X, I), w (O, I) -> (X, O) in out_dtype (default x's), computed in x's dtype."""
  out_dtype = out_dtype or x.dtype
  return jnp.einsum("XI,OI->XO", x, w.astype(x.dtype), preferred_element_type=out_dtype)


def _weight(module, name):
  key = name + layouts.OUT_MAJOR_SUFFIX
  return module.get_variable("params", key) if module.has_variable("params", key) else None


def _einsum(eqn, x, w, product):
  """The attention block's `gemma.Einsum` equations over the out-major w."""
  b, t = x.shape[:2]
  if eqn == "BTNH,NHD->BTD":  # w (D, N, H)
    return product(x.reshape(b * t, -1), w.reshape(w.shape[0], -1)).reshape(b, t, -1)
  # "BTD,NDH->BTNH" w (N, H, D); "BTD,SNDH->SBTNH" (S, N, H, D); "BSD,CKDH->CBSKH" (C, K, H, D)
  out = product(x.reshape(b * t, -1), w.reshape(-1, w.shape[-1])).reshape(b, t, *w.shape[:-1])
  return out if eqn == "BTD,NDH->BTNH" else jnp.moveaxis(out, 2, 0)


def interceptor(product=plain_product, lookup=None, write_cache=None):
  """A `nn.intercept_methods` interceptor for the language model on the out-major tree.

  product(x (X, I), w (O, I), out_dtype=None) -> (X, O): every weight product.
  lookup(table (V, D), tokens) -> rows (..., D): the embedding lookup (None: the module's).
  write_cache(buffer, new, index) -> buffer: the KV-cache update (None: the module's).
  """
  def intercept(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if isinstance(module, gemma.Einsum) and method == "__call__":
      w = _weight(module, "w")
      if w is not None:
        eqn, x = args
        return _einsum(eqn, x, w, product)
    elif isinstance(module, gemma.FeedForward) and method == "__call__":
      w_gating, w_linear = _weight(module, "gating_einsum"), _weight(module, "linear")
      if w_gating is not None:
        (x,) = args  # w_gating (2, F, D), w_linear (D, F)
        b, t, d = x.shape
        f = w_linear.shape[1]
        gate_up = product(x.reshape(b * t, d), w_gating.reshape(2 * f, d)).reshape(b, t, 2, f)
        hidden = nn.gelu(gate_up[:, :, 0], approximate=True) * gate_up[:, :, 1]
        return product(hidden.reshape(b * t, f), w_linear).reshape(b, t, d)
    elif isinstance(module, gemma.Embedder) and method == "decode":
      (x,) = args  # the table (V, D) is already out-major
      b, t, d = x.shape
      return product(x.reshape(b * t, d), module.input_embedding, jnp.float32).reshape(b, t, -1)
    elif isinstance(module, gemma.Embedder) and method == "encode" and lookup is not None:
      (tokens,) = args
      x = lookup(module.input_embedding, tokens).astype(module.dtype)
      return x * jnp.sqrt(module.width).astype(module.dtype)
    elif isinstance(module, gemma.Attention) and method == "write_cache" \
        and write_cache is not None:
      return write_cache(*args)
    return next_fun(*args, **kwargs)

  return intercept


def install(**kw):
  """Context: trace the model under `interceptor(**kw)`."""
  return nn.intercept_methods(interceptor(**kw))
