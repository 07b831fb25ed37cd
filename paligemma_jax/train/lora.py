"""LoRA: low-rank adapters on the language model's einsum weights, installed from outside.

For a weight W used as `einsum(eqn, x, W)`, the adapter adds `(x @ A) @ B * alpha / rank`:
A holds W's input (contracted) axes and the rank, B the rank and W's output axes. The
adapters live in the parameter tree beside their weight (`.../q_einsum/w_lora_a`,
`.../mlp/linear_lora_b`), stacked over depth like the layer they belong to, so the scanned
model slices them with its layer. The base tree is never changed; `merge` writes
`W + alpha / rank * A B` back into it, so the merged model is an ordinary checkpoint.

B starts at zero: before the first update the model is exactly the base model.
"""
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from paligemma_jax.model import gemma

SUFFIXES = ("_lora_a", "_lora_b")


def _weight_call(context, args):
  """-> (weight name, eqn, x, weight shape) when the intercepted call is a weight product."""
  m = context.module
  if isinstance(m, gemma.Einsum) and context.method_name == "__call__":
    eqn, x = args
    return "w", eqn, x, m.shape
  if isinstance(m, gemma.FeedForward) and context.method_name == "project":
    name, eqn, x, shape = args
    return name, eqn, x, shape
  return None


def _split(eqn: str):
  """'BTD,NDH->BTNH' -> (x letters, w letters, out letters, w's input letters, w's output
  letters)."""
  inputs, out = eqn.replace(" ", "").split("->")
  lhs, w = inputs.split(",")
  return lhs, w, out, "".join(c for c in w if c in lhs), "".join(c for c in w if c not in lhs)


def interceptor(targets: str, rank: int, alpha: float, found: dict = None):
  """An `nn.intercept_methods` interceptor adding adapters to the weights whose path (e.g.
  `llm/layers/attn/q_einsum/w`) matches `targets`. `found`, if given, collects
  {weight path: its einsum} as the model runs (at trace time)."""
  pattern = re.compile(targets)
  scale = alpha / rank

  def intercept(next_fun, args, kwargs, context):
    call = _weight_call(context, args)
    if call is None:
      return next_fun(*args, **kwargs)
    name, eqn, x, shape = call
    path = "/".join(context.module.path) + "/" + name
    if not pattern.fullmatch(path):
      return next_fun(*args, **kwargs)
    lhs, w, out, w_in, w_out = _split(eqn)
    if found is not None:
      found[path] = eqn
    size = dict(zip(w, shape))
    a = context.module.param(name + "_lora_a", nn.initializers.zeros_init(),
                             tuple(size[c] for c in w_in) + (rank,))
    b = context.module.param(name + "_lora_b", nn.initializers.zeros_init(),
                             (rank,) + tuple(size[c] for c in w_out))
    rest = "".join(c for c in lhs if c not in w_in)
    h = jnp.einsum(f"{lhs},{w_in}z->{rest}z", x, a.astype(x.dtype))
    delta = jnp.einsum(f"{rest}z,z{w_out}->{out}", h, b.astype(x.dtype))
    return next_fun(*args, **kwargs) + (delta * scale).astype(x.dtype)

  return intercept


def adapter_shapes(model, abstract_params, example_inputs, targets: str, rank: int) -> tuple:
  """-> ({flat adapter key: ShapeDtypeStruct}, {weight path: eqn}) for the weights that
  `targets` matches, found by tracing the model (nothing is computed)."""
  found = {}

  def init():
    with nn.intercept_methods(interceptor(targets, rank, 1.0, found)):
      return model.init(jax.random.PRNGKey(0), *example_inputs)["params"]

  tree = jax.eval_shape(init)
  flat = {"/".join(k): v for k, v in _flatten(tree).items()}
  adapters = {k: v for k, v in flat.items() if k.endswith(SUFFIXES)}
  return adapters, found


def _flatten(tree, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def init_adapters(shapes: Mapping, seed: int) -> dict:
  """A ~ N(0, 1/fan_in) over W's input axes, B = 0 (so the adapted model starts as the base)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = shapes[key].shape
    if key.endswith("_lora_a"):
      stacked = key.startswith("llm/layers/")
      fan_in = int(np.prod(shape[1 if stacked else 0:-1]))
      out[key] = jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)
    else:
      out[key] = jnp.zeros(shape, jnp.float32)
  return out


def merge(base: Mapping, adapters: Mapping, eqns: Mapping, alpha: float, rank: int) -> dict:
  """{flat key: array} base + adapters -> base with `W + alpha/rank * A B` for each adapted W
  (float32), adapter keys dropped."""
  merged = dict(base)
  for path, eqn in eqns.items():
    _, w, _, w_in, w_out = _split(eqn)
    a, b = adapters[path + "_lora_a"], adapters[path + "_lora_b"]
    layers = "L" if a.ndim == len(w_in) + 2 else ""
    delta = jnp.einsum(f"{layers}{w_in}z,{layers}z{w_out}->{layers}{w}", a.astype(jnp.float32),
                       b.astype(jnp.float32), precision="highest")
    merged[path] = (base[path].astype(jnp.float32) + alpha / rank * delta)
  return merged
