"""Weight layouts: the one owner of how a parameter tree is laid out for a model.

- big_vision's tree (what checkpoints hold, what `PaliGemma(scan_layers=True)` and training
  run): each tower's layers stacked over depth, `llm/layers/...` and
  `img/Transformer/encoderblock/...`, every array with a leading L axis.
- The inference tree (`unstacked`, for `PaliGemma(scan_layers=False)`): one subtree per
  layer, `llm/layers_i`, `img/Transformer/encoderblock_i`. A scan slices (copies) every
  layer's weights out of the stacked arrays on every call: in decoding that costs more than
  the step's own reads.
- Out-major (`unstacked(out_major=True)`, language model only): each layer weight
  transposed once so that its contracted (input) axes come last, stored as
  `<name>_out_major`. Only an inference speed path reads it (`backends.out_major`); the
  plain model does not.

Loaders split layers off memory-mapped arrays one at a time with `split_layers`; the pipeline
asks `backends.select` once which layout its speed path reads.
"""
import numpy as np
import jax.numpy as jnp
from flax import traverse_util

# Per-layer axis permutations from big_vision's layout to out-major:
OUT_MAJOR = {"attn/q_einsum/w": (0, 2, 1),             # (N, D, H) -> (N, H, D)
             "attn/kv_einsum/w": (0, 1, 3, 2),         # (2, K, D, H) -> (2, K, H, D)
             "attn/qkv_einsum/w": (0, 1, 3, 2),        # (3, N, D, H) -> (3, N, H, D)
             "attn/attn_vec_einsum/w": (2, 0, 1),      # (N, H, D) -> (D, N, H)
             "mlp/gating_einsum": (0, 2, 1),           # (2, D, F) -> (2, F, D)
             "mlp/linear": (1, 0)}                     # (F, D) -> (D, F)
OUT_MAJOR_SUFFIX = "_out_major"
LLM_LAYERS = "llm/layers"
IMG_LAYERS = "img/Transformer/encoderblock"
STACKED_TOWERS = (LLM_LAYERS, IMG_LAYERS)  # the subtrees big_vision stacks over depth


def split_layers(name: str, stacked, out_major: bool = False):
  """One stacked layer array `name` (below `layers/`, e.g. "mlp/linear"), (L, ...) ->
  [(name in layer i's tree, its array)] for i < L; a numpy array (e.g. memory-mapped) or a
  jax.Array. out_major: the arrays named in `OUT_MAJOR` are transposed (`<name>_out_major`)."""
  perm = OUT_MAJOR.get(name) if out_major else None
  if perm is None:
    return [(name, stacked[i]) for i in range(stacked.shape[0])]
  return [(name + OUT_MAJOR_SUFFIX, stacked[i].transpose(perm)) for i in range(stacked.shape[0])]


def stored_layer(name: str, array):
  """One layer's array `name` (below `layers/`), out-major -> big_vision's per-layer layout."""
  return array.transpose(tuple(np.argsort(OUT_MAJOR[name])))


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
    out_major = key.endswith(OUT_MAJOR_SUFFIX)
    leaf = key[:-len(OUT_MAJOR_SUFFIX)] if out_major else key
    per_layer = [traverse_util.flatten_dict(params[n], sep="/")[key] for n in names]
    layers[leaf] = jnp.stack([stored_layer(leaf, jnp.asarray(a)) if out_major else a
                              for a in per_layer])
  out[name] = traverse_util.unflatten_dict(layers, sep="/")
  return out


def unstacked(params: dict, consume: bool = False, out_major: bool = False) -> dict:
  """big_vision's tree -> the inference tree: `llm/layers` split into `llm/layers_0` ...,
  `img/Transformer/encoderblock` into `encoderblock_0` ... A tree already split is returned
  as is. out_major (language model only), consume: see `unstack_layers`."""
  img = dict(params["img"])
  img["Transformer"] = unstack_layers(img["Transformer"], consume, name="encoderblock")
  return {**params, "img": img, "llm": unstack_layers(params["llm"], consume, out_major)}


def stacked(params: dict) -> dict:
  """Either tree -> big_vision's (what checkpoints hold)."""
  img = dict(params["img"])
  img["Transformer"] = stack_layers(img["Transformer"], name="encoderblock")
  return {**params, "img": img, "llm": stack_layers(params["llm"])}

