"""Device meshes and named-axis sharding rules for PaliGemma parameters, batches and KV caches.

Only `jax.sharding` is used: a `Mesh` with axes ('data', 'model'), `NamedSharding` and
`PartitionSpec` per array, `with_sharding_constraint` on the KV cache inside prefill and the
decode loop (`decode.py`) and on a decode step's activations (`weight_stationary`). XLA's
SPMD partitioner inserts the collectives.

Parameters (big_vision names; the leading depth axis L of scanned layers is never split, so
the layer scan slices locally):

| parameter (per-layer dims after L)              | data       | model      |
| ----------------------------------------------- | ---------- | ---------- |
| llm attn/q_einsum/w (N, D, H)                    | D          | N          |
| llm attn/kv_einsum/w (2, K, D, H)                | D          | K          |
| llm attn/qkv_einsum/w (3, N, D, H)               | D          | N          |
| llm attn/attn_vec_einsum/w (N, H, D)             | D          | N          |
| llm mlp/gating_einsum (2, D, F)                  | D          | F          |
| llm mlp/linear (F, D)                            | D          | F          |
| llm embedder/input_embedding (V, D)              | D          | V          |
| img .../{query,key,value}/kernel (W, Hv, W/Hv)   | W          | Hv         |
| img .../{query,key,value}/bias (Hv, W/Hv)        | -          | Hv         |
| img .../out/kernel (Hv, W/Hv, W)                 | W          | Hv         |
| img .../Dense_0/kernel (W, M), bias (M)          | W          | M          |
| img .../Dense_1/kernel (M, W)                    | W          | M          |
| img head/kernel (W, D)                           | W          | D          |
| norms, other biases, pos/patch embedding          | -          | -          |

Model axis: Megatron-style, the heads and the MLP hidden dimension are split, so each
attention/MLP block needs one all-reduce of its (B, T, D) output. The embedding is split by
vocabulary rows on the model axis (vocab-parallel): the tied output head then computes each
device's slice of the logits with no partial sums (splitting D instead would all-reduce full
(B, V) logits every token), and the lookup costs one all-reduce of a (B, T, D) activation.
Data axis: FSDP-style, every large matrix is also split along its width-sized dimension (D or
W) so that parameter memory per device is 1/(data*model) of the model. Any dimension a mesh
axis does not divide stays whole on that axis (replicated), e.g. Gemma 2B's single kv head.

Batch: the leading batch axis over 'data' (replicated when it does not divide). KV cache
(L, B, S, K, H): B over 'data', K over 'model' when it divides (else replicated over
'model': each model shard then holds all kv heads, which MQA needs anyway).
"""
import re
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# (regex on the flat key, spec of the per-layer dims: for scanned keys the leading L axis is
# prepended as None). First match wins; no match = replicated.
_SCANNED = re.compile(r"^(llm/layers/|img/Transformer/encoderblock/)")
RULES = (
    (r"attn/q_einsum/w$", (MODEL, DATA, None)),
    (r"attn/kv_einsum/w$", (None, MODEL, DATA, None)),
    (r"attn/qkv_einsum/w$", (None, MODEL, DATA, None)),
    (r"attn/attn_vec_einsum/w$", (MODEL, None, DATA)),
    (r"mlp/gating_einsum$", (None, DATA, MODEL)),
    (r"mlp/linear$", (MODEL, DATA)),
    (r"embedder/input_embedding$", (MODEL, DATA)),
    (r"(query|key|value)/kernel$", (DATA, MODEL, None)),
    (r"(query|key|value)/bias$", (MODEL, None)),
    (r"MultiHeadDotProductAttention_0/out/kernel$", (MODEL, None, DATA)),
    (r"Dense_0/kernel$", (DATA, MODEL)),
    (r"Dense_0/bias$", (MODEL,)),
    (r"Dense_1/kernel$", (MODEL, DATA)),
    (r"^img/head/kernel$", (DATA, MODEL)),
)


# ---------------------------------------------------------------------------
# Meshes.

def parse_mesh(spec: Optional[str]) -> Optional[tuple]:
  """'2x4' -> (2, 4) (data, model); '', None or 'none' -> None (one device, no mesh)."""
  if spec is None or not str(spec).strip() or str(spec).strip().lower() == "none":
    return None
  m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", str(spec))
  if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f"--mesh={spec!r}: expected DATAxMODEL with positive integers, e.g. 2x4")
  return int(m.group(1)), int(m.group(2))


def make_mesh(data: int, model: int, devices: Optional[Sequence] = None) -> Mesh:
  """A ('data', 'model') mesh over all devices (of every process) by default."""
  devices = list(jax.devices() if devices is None else devices)
  if data * model != len(devices):
    raise ValueError(
        f"mesh {data}x{model} needs {data * model} devices but {len(devices)} are available "
        f"({devices[0].platform}); choose DATAxMODEL with DATA*MODEL = {len(devices)}")
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_from_flag(spec: Optional[str]) -> Optional[Mesh]:
  shape = parse_mesh(spec)
  return None if shape is None else make_mesh(*shape)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None):
  """jax.distributed.initialize(); with no arguments the cluster is auto-detected
  (SLURM, TPU pods, ...). Call before anything touches a device."""
  kw = {k: v for k, v in dict(coordinator_address=coordinator_address,
                              num_processes=num_processes, process_id=process_id).items()
        if v is not None}
  jax.distributed.initialize(**kw)


# ---------------------------------------------------------------------------
# Rules.

def _fit(spec: Sequence, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops (replicates) every mesh axis that does not divide its dimension."""
  out = []
  for axis, size in zip(spec, shape):
    out.append(axis if axis is not None and size % mesh.shape[axis] == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_spec(key: str, shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec of the parameter `key` (flat big_vision name, no `params/`)."""
  for pattern, spec in RULES:
    if re.search(pattern, key):
      if _SCANNED.match(key):
        spec = (None,) + tuple(spec)
      if len(spec) != len(shape):
        raise ValueError(f"sharding rule {pattern!r} has {len(spec)} axes but '{key}' has "
                         f"shape {tuple(shape)}")
      return _fit(spec, shape, mesh)
  return P()


def param_shardings(tree, mesh: Mesh):
  """Nested dict of NamedSharding for a nested parameter tree (arrays or ShapeDtypeStructs)."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict(
      {k: NamedSharding(mesh, param_spec(k, v.shape, mesh)) for k, v in flat.items()}, sep="/")


def shard_params(params, mesh: Mesh):
  """Places (or re-places) a parameter tree by the rules; already-placed leaves are left as is."""
  shardings = param_shardings(params, mesh)

  def put(x, s):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim):
      return x
    return jax.device_put(x, s)
  return jax.tree_util.tree_map(put, params, shardings)


def batch_spec(batch: int, mesh: Mesh) -> P:
  return P(DATA) if batch % mesh.shape[DATA] == 0 else P()


def batch_sharding(batch: int, mesh: Mesh) -> NamedSharding:
  """For arrays with the batch as leading axis (images, text, masks, logits, tokens)."""
  return NamedSharding(mesh, batch_spec(batch, mesh))


def _cache_spec(num_kv_heads: int, batch: int, mesh: Mesh) -> tuple:
  spec = _fit((None, DATA, None, MODEL, None), (1, batch, 1, num_kv_heads, 1), mesh)
  return tuple(spec) + (None,) * (5 - len(spec))


def cache_sharding(num_kv_heads: int, batch: int, mesh: Mesh) -> NamedSharding:
  """KV cache (L, B, S, K, H): B over 'data', K over 'model' when they divide."""
  return NamedSharding(mesh, P(*_cache_spec(num_kv_heads, batch, mesh)))


def put_global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole; each device gets its slice.

  Works across processes (each fills only its addressable shards) and for memory-mapped
  arrays (only the slices are read)."""
  host = np.asarray(host) if not isinstance(host, np.ndarray) else host
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array as one host numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------
# Accounting (tests and logs).

def per_device_bytes(tree) -> dict:
  """device -> bytes of the addressable shards of every array in `tree`."""
  total = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      total[shard.device] = total.get(shard.device, 0) + shard.data.nbytes
  return total


def describe(params, mesh: Mesh) -> Mapping[str, str]:
  """Flat key -> 'shape spec' (for logs and the README table)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: f"{tuple(v.shape)} {param_spec(k, v.shape, mesh)}" for k, v in flat.items()}

# ---------------------------------------------------------------------------
# Weight-stationary decode.

# Per-layer weight specs of the language model, by the name of the module that owns them.
_LLM_WEIGHT_SPECS = {
    "q_einsum": (MODEL, DATA, None),
    "kv_einsum": (None, MODEL, DATA, None),
    "qkv_einsum": (None, MODEL, DATA, None),
    "attn_vec_einsum": (MODEL, None, DATA),
}


def _constrain(x, spec, mesh):
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit(spec, x.shape, mesh)))


def _einsum_specs(eqn: str, weight_spec: Sequence, batch_letter: str = "B"):
  """Input and output specs that keep an einsum's weight where it lies.

  The input takes the weight's sharding on every contracted letter (and is whole on the
  rest, the batch included): each device multiplies its own weight block, and the partial
  sums over a split contraction are reduced by XLA (all-reduce / reduce-scatter of
  activations). The output puts the batch back on 'data' and keeps the weight's 'model'
  split of the letters it carries over.
  """
  lhs, rhs_out = eqn.replace(" ", "").split(",")
  rhs, out = rhs_out.split("->")
  by_letter = dict(zip(rhs, weight_spec))
  x_spec = tuple(by_letter.get(c) if c in rhs else None for c in lhs)
  out_spec = [by_letter.get(c) for c in out]
  if DATA not in out_spec and batch_letter in out:
    out_spec[out.index(batch_letter)] = DATA
  return x_spec, tuple(out_spec)


def weight_stationary(mesh: Mesh):
  """Context (flax method interceptor) for tracing one decode step with the weights fixed.

  Without it XLA's partitioner meets `x (B over data) @ W (D over data)` by all-gathering
  W over 'data' (FSDP): every token would move the whole language model between devices.
  A decode step has a few activations per row against megabytes of weights, so the
  activations move instead: each einsum's input is laid out like the weight's contracted
  axes and XLA reduces the partial sums; the output keeps the weight's split of the axes
  it carries (the batch over 'data' where 'data' is still free). The layer's cache keeps
  `cache_sharding`'s layout in and out. Only activations (a few values per row) are then
  exchanged in the loop: see tests/test_sharding.py, which reads the compiled HLO.
  Applies to the language model's einsums, its MLP and the tied output head (used only
  around `PaliGemma.extend`; the prefill keeps XLA's FSDP choice, where the activations
  are the large side).
  """
  import flax.linen as nn
  from paligemma_jax.model import gemma

  def interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if kwargs:  # every call this knows is positional; anything else runs unconstrained
      return next_fun(*args, **kwargs)
    if isinstance(module, gemma.Einsum) and method == "__call__" and len(args) == 2 \
        and module.name in _LLM_WEIGHT_SPECS:
      eqn, x = args
      x_spec, out_spec = _einsum_specs(eqn, _LLM_WEIGHT_SPECS[module.name])
      w = module.get_variable("params", "w").astype(module.dtype)
      out = jnp.einsum(eqn, _constrain(x, x_spec, mesh), w)
      return _constrain(out, out_spec, mesh)
    if isinstance(module, gemma.Attention) and method == "__call__" and len(args) == 6 \
        and args[5] is None:
      # The cache stays in the loop's layout on the way in and out, so the layers never
      # re-lay it out (e.g. when K does not divide the model axis).
      x, rope, mask, cache, write_index, _ = args
      spec = _cache_spec(module.config.num_kv_heads, x.shape[0], mesh)
      spec = spec if module.layer is not None else spec[1:]  # whole cache or one layer's
      cache = jax.tree_util.tree_map(lambda c: _constrain(c, spec, mesh), cache)
      out, new_cache = next_fun(x, rope, mask, cache, write_index, None)
      return out, jax.tree_util.tree_map(lambda c: _constrain(c, spec, mesh), new_cache)
    if isinstance(module, gemma.FeedForward) and method == "__call__" and len(args) == 1:
      (x,) = args  # (B, T, D): gating_einsum (2, D over data, F over model)
      out = next_fun(_constrain(x, (None, None, DATA), mesh))
      return _constrain(out, (None, None, DATA), mesh)  # linear (F over model, D over data)
    if isinstance(module, gemma.Embedder) and method == "decode" and len(args) == 1:
      (x,) = args  # tied head: input_embedding (V over model, D over data)
      out = next_fun(_constrain(x, (None, None, DATA), mesh))
      return _constrain(out, (DATA, None, MODEL), mesh)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def constrain_cache(cache, mesh: Optional[Mesh]):
  """with_sharding_constraint of a {"k", "v"} (L, B, S, K, H) cache to `cache_sharding`;
  identity without a mesh."""
  if mesh is None:
    return cache
  k = cache["k"]
  s = cache_sharding(k.shape[3], k.shape[1], mesh)
  return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, s), cache)


# ---------------------------------------------------------------------------
# Placing host (memory-mapped) arrays.

def place_host_array(host: np.ndarray, target: jax.sharding.Sharding, dtype) -> jax.Array:
  """A host array (e.g. a memory-mapped `.npz` member) on `target`, cast slice by slice.

  Each device receives only its slice, read from the host array and cast on its own: no
  device, and no host buffer, ever holds the whole array (unless the sharding replicates it).
  """
  dtype = np.dtype(dtype)

  def piece(index):
    part = np.asarray(host[index])
    return part if part.dtype == dtype else part.astype(dtype)
  return jax.make_array_from_callback(tuple(host.shape), target, piece)


def load_npz_sharded(path: str, mesh: Mesh, dtype=np.float32,
                     overrides: Optional[Mapping] = None):
  """`checkpoint.load_npz` onto a mesh: each array goes straight to its rule's sharding."""
  from paligemma_jax.ckpt import checkpoint
  path = str(path)
  index, config = checkpoint.npz_config(path, overrides)
  flat = dict(checkpoint.read_npz(path, index, lambda key, host: place_host_array(
      host, NamedSharding(mesh, param_spec(key, host.shape, mesh)), dtype)))
  return checkpoint.Loaded(config, traverse_util.unflatten_dict(flat, sep="/"), path)
