"""Orbax checkpoints: PaliGemma parameters in and out, Gemma releases as the language model.

* `save(path, params)`: the big_vision tree (`img/...`, `llm/...` as nested dicts) as an Orbax
  checkpoint directory. Orbax writes `<path>.orbax-checkpoint-tmp-<n>/`, then writes its
  commit marker `commit_success.txt` and renames the directory to `<path>`: a save that dies
  midway leaves only the temporary directory, which `check_committed` refuses.
* `load_orbax(path, mesh=...)`: the architecture from the checkpoint's metadata (shapes only,
  through `checkpoint.infer_config` and `checkpoint.validate`), then every array restored
  straight into its target `NamedSharding` (`sharding.param_spec`): each process reads only
  the slices its devices hold; nothing is assembled whole on a device or on the host.
* `load(path)`: `.npz` files and Orbax directories alike (`--ckpt`).
* `load_gemma_orbax(gemma_dir, img_npz)`: the language model from a Gemma Orbax checkpoint
  as Google publishes it, the vision tower from a big_vision `.npz`, as big_vision's
  PaliGemma `model_init` combines them.
"""
import gc
import glob
import logging
import os
import re
import sys
import threading
import time
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from paligemma_jax.ckpt import checkpoint
from paligemma_jax import sharding
from paligemma_jax.model import layouts
from paligemma_jax.ckpt.checkpoint import CheckpointError, Loaded

COMMIT_MARKER = "commit_success.txt"   # orbax's atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ".orbax-checkpoint-tmp"   # orbax's atomicity_types.TMP_DIR_SUFFIX
_METADATA_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "checkpoint", "manifest.ocdbt")
GEMMA_PADDED_VOCAB = 256_128  # Gemma releases: 256000 pieces + 128 unused rows


def _ocp():
  import orbax.checkpoint as ocp  # imported on use: `import paligemma_jax` stays light
  return ocp


def is_orbax_path(path) -> bool:
  """A directory, or the name of an Orbax save (finished or not), rather than an `.npz` file."""
  path = os.fspath(path).rstrip("/")
  return (os.path.isdir(path) or TMP_SUFFIX in os.path.basename(path)
          or bool(glob.glob(glob.escape(path) + TMP_SUFFIX + "*")))


def check_committed(path, require_commit_marker: bool = True) -> str:
  """Refuses anything but a complete Orbax checkpoint directory; returns the absolute path.

  An interrupted save leaves `<name>.orbax-checkpoint-tmp-<n>` (atomic-rename mode) or a
  directory without `commit_success.txt` (commit-file mode, object stores). Orbax releases
  before 2024 wrote no marker on local disks: `require_commit_marker=False` accepts such a
  directory when you know it is complete.
  """
  path = os.path.abspath(os.fspath(path)).rstrip("/")
  name = os.path.basename(path)
  if TMP_SUFFIX in name:
    raise CheckpointError(
        f"{path}: an unfinished Orbax save (a '{TMP_SUFFIX}' temporary directory, never "
        "committed: the save was interrupted); refused. Save the checkpoint again.")
  if not os.path.exists(path):
    partial = glob.glob(glob.escape(path) + TMP_SUFFIX + "*")
    raise CheckpointError(
        f"{path}: no such checkpoint" + (
            f"; found only the unfinished save {partial[0]} (interrupted, never committed)"
            if partial else ""))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not an Orbax checkpoint directory")
  if not any(os.path.exists(os.path.join(path, f)) for f in _METADATA_FILES):
    raise CheckpointError(
        f"{path}: not an Orbax checkpoint directory (none of {', '.join(_METADATA_FILES)})")
  if require_commit_marker and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
    raise CheckpointError(
        f"{path}: no Orbax commit marker '{COMMIT_MARKER}': the save that wrote it did not "
        "complete; refused. (Orbax before 2024 wrote no marker on local disks: pass "
        "require_commit_marker=False, or --orbax_unmarked_ok, if you know it is complete.)")
  return path


def _tree_metadata(path: str):
  """The checkpoint's tree of ArrayMetadata (shape, dtype), read without any array data."""
  missing = _missing_manifest(path)
  if missing:  # refused here: Orbax's reads would fail in its background threads
    raise CheckpointError(f"{path}: damaged Orbax checkpoint: {missing}")
  ocp = _ocp()
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path}: unreadable Orbax metadata ({e})") from e
  meta = getattr(meta, "item_metadata", meta)
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{path}: Orbax metadata holds no tree of arrays")
  return tree


def _flat_metadata(path: str) -> dict:
  """Flat '/'-joined key -> (tree path tuple, ArrayMetadata)."""
  flat = traverse_util.flatten_dict(_tree_metadata(path))
  return {"/".join(k): (k, v) for k, v in flat.items()}


def _restore(path: str, restore_args_flat: Mapping[tuple, object]):
  """Restores exactly the leaves of `restore_args_flat` (tree path -> ArrayRestoreArgs)."""
  ocp = _ocp()
  restore_args = traverse_util.unflatten_dict(dict(restore_args_flat))
  real, held, failure = sys.stderr, _Held(), None
  asyncio_log = logging.getLogger("asyncio")  # its handlers write to the real stderr
  sys.stderr = held
  asyncio_log.addFilter(held)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # tensorstore's errors, often in an ExceptionGroup
    failure = _read_failure(e)  # not chained: the error would keep the failed reads alive
  finally:
    if failure is not None:
      held.wait_until_quiet()
    sys.stderr = real
    asyncio_log.removeFilter(held)
  if failure is not None:
    raise CheckpointError(f"{path}: {failure}")
  real.write("".join(held.parts))
  for record in held.records:
    asyncio_log.handle(record)
  return traverse_util.flatten_dict(tree)


class _Held:
  """sys.stderr (and a filter on asyncio's log) during a restore. When a read fails, the reads
  still in flight finish on tensorstore's threads and post to Orbax's event loop, by then
  closed, each printing an 'Event loop is closed' traceback, before and after the error reaches
  us; their coroutines and tasks, once collected, print and log more. So all of it is held:
  written out after a success, dropped after a failure once stderr has been quiet for a while
  and the garbage collected, and the caller's error is the only one."""

  def __init__(self):
    self.parts, self.records, self.last = [], [], time.monotonic()

  def filter(self, record) -> bool:  # asyncio's log ('Task exception was never retrieved')
    self.records.append(record)
    self.last = time.monotonic()
    return False

  def write(self, text):
    self.parts.append(text)
    self.last = time.monotonic()
    return len(text)

  def flush(self):
    pass

  def wait_until_quiet(self, quiet_s: float = 0.3, limit_s: float = 3.0):
    start = time.monotonic()
    while time.monotonic() - self.last < quiet_s and time.monotonic() - start < limit_s:
      time.sleep(0.02)
    gc.collect()  # the failed reads' coroutines: 'Exception ignored in' when collected later


_TS_READ = re.compile(r'Error reading "([^"]+?)(?:/[\d.]*)?" in [^:]*: (.*)')


def _read_failure(error: BaseException) -> str:
  """One line: the array tensorstore could not read and why, from an error or its causes."""
  seen, todo, first = set(), [error], None
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    m = _TS_READ.search(str(e))
    if m:
      return (f"damaged Orbax checkpoint: cannot read array '{m.group(1).replace('.', '/')}' "
              f"({m.group(2).strip()})")
    if first is None and str(e):
      first = str(e).splitlines()[0]
    todo += list(getattr(e, "exceptions", ())) + [e.__cause__, e.__context__]
  return f"Orbax restore failed ({type(error).__name__}: {first})"


def _missing_manifest(path: str) -> str:
  """'' or why an OCDBT checkpoint (arrays in ocdbt.process_*/) cannot be read."""
  if glob.glob(os.path.join(glob.escape(path), "ocdbt.process_*")) and \
      not os.path.exists(os.path.join(path, "manifest.ocdbt")):
    return "its 'manifest.ocdbt' (the index of ocdbt.process_*/) is missing"
  return ""


def _target(mesh, key: str, shape) -> jax.sharding.Sharding:
  if mesh is None:
    return SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(mesh, sharding.param_spec(key, shape, mesh))


# ---------------------------------------------------------------------------
# PaliGemma in big_vision's tree.

def save(path, params, *, overwrite: bool = False) -> str:
  """Writes `params` (nested `img/...`, `llm/...`, sharded or not; big_vision's tree or the
  pipeline's unstacked one) as an Orbax checkpoint in big_vision's tree.

  Atomic: orbax writes a temporary directory, commits it (`commit_success.txt`), then renames
  it to `path`. Every process must call it (multi-host: each writes its own shards).
  """
  from paligemma_jax import paths
  ocp = _ocp()
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path}: already exists; choose a new directory (or overwrite=True)")
  try:
    if not overwrite:
      paths.check_new_dir(path, None)
  except paths.PathError as e:
    raise CheckpointError(str(e)) from None
  before = set(threading.enumerate())
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, layouts.stacked(params), force=overwrite)
      ckptr.wait_until_finished()
  except Exception as e:
    _release_waiting_threads(before)
    raise CheckpointError(f"{path}: the Orbax save failed ({type(e).__name__}: {e})") from e
  return path


def _release_waiting_threads(before):
  """After a failed save, Orbax's commit threads still wait for signals that never come
  (`blocking_key_value_get`, for hours) and keep the interpreter from exiting: cancel them and
  send the signals they wait for, so that they return."""
  try:  # Orbax internals (0.12): tests/test_bad_input_cli.py fails if they change
    from orbax.checkpoint._src.futures import future
    for t in set(threading.enumerate()) - before:
      if isinstance(t, future._SignalingThread) and t.is_alive():  # noqa: SLF001
        t.cancel()
        future.set_signals(t._receive_signals, operation_id=t._operation_id)  # noqa: SLF001
    for t in set(threading.enumerate()) - before:
      if isinstance(t, future._SignalingThread):  # noqa: SLF001
        threading.Thread.join(t, timeout=10)
  except (ImportError, AttributeError):  # the save's own error matters more
    pass


def load_orbax(path, dtype=jnp.float32, overrides: Optional[Mapping] = None, mesh=None,
               require_commit_marker: bool = True) -> Loaded:
  """A PaliGemma Orbax checkpoint (big_vision names; optionally under `params/`) -> Loaded.

  The architecture comes from the metadata's shapes; each array is read into its target
  sharding (`mesh` given: `sharding.param_spec`; else the first local device) and cast to
  `dtype` as it is read.
  """
  path = check_committed(path, require_commit_marker)
  meta = _flat_metadata(path)
  shapes = {checkpoint.strip_prefix(k): tuple(m.shape) for k, (_, m) in meta.items()}
  config = checkpoint.infer_config(shapes, path, overrides)
  checkpoint.validate(shapes, config, path)
  ocp = _ocp()
  args = {tree_path: ocp.ArrayRestoreArgs(
      sharding=_target(mesh, checkpoint.strip_prefix(k), m.shape), dtype=jnp.dtype(dtype),
      global_shape=tuple(m.shape)) for k, (tree_path, m) in meta.items()}
  restored = _restore(path, args)
  flat = {checkpoint.strip_prefix(k): restored[tree_path] for k, (tree_path, _) in meta.items()}
  return Loaded(config, traverse_util.unflatten_dict(flat, sep="/"), path)


def load(path, dtype=jnp.float32, overrides: Optional[Mapping] = None, mesh=None,
         require_commit_marker: bool = True) -> Loaded:
  """`.npz` file, Orbax directory or transformers directory -> Loaded (on `mesh` when given,
  already sharded)."""
  from paligemma_jax.ckpt import hf_checkpoint
  if hf_checkpoint.is_hf_dir(path):
    return hf_checkpoint.load_hf(path, dtype, overrides, mesh=mesh)
  if is_orbax_path(path):
    return load_orbax(path, dtype, overrides, mesh, require_commit_marker)
  if mesh is not None:
    return sharding.load_npz_sharded(path, mesh, dtype, overrides)
  return checkpoint.load_npz(path, dtype=dtype, overrides=overrides)


# ---------------------------------------------------------------------------
# Gemma releases (language model only) + a big_vision vision tower.

_LAYER = re.compile(r"^layer_(\d+)/(.+)$")
_MLP_W = re.compile(r"^mlp/(gating_einsum|linear)/w$")


def _gemma_name(key: str) -> str:
  """A Gemma release key without `transformer/` -> big_vision's name below `llm/`."""
  m = _MLP_W.match(key)
  return f"mlp/{m.group(1)}" if m else key


def load_gemma_orbax(gemma_path, img_npz, dtype=jnp.float32,
                     overrides: Optional[Mapping] = None, mesh=None, *,
                     pad_rows="auto", min_vocab_size: Optional[int] = None, seed: int = 0,
                     require_commit_marker: bool = True) -> Loaded:
  """PaliGemma from a Gemma Orbax checkpoint (language model) and a big_vision `.npz` (`img/...`).

  The Gemma release layout: `transformer/layer_{i}/...` one subtree per layer,
  `transformer/embedder/input_embedding`, `transformer/final_norm/scale`; the MLP weights under
  an extra `w` (`mlp/gating_einsum/w`, `mlp/linear/w`); `mlp/gating_einsum` stored (2, D, F)
  or, in later releases, (2, F, D). Attention and norm names are big_vision's already
  (`attn/q_einsum/w`, `attn/kv_einsum/w` or `attn/qkv_einsum/w`, `attn/attn_vec_einsum/w`,
  `pre_attention_norm/scale`, ...).

  This is the one place where arrays change layout: the per-layer arrays are stacked into
  the scanned (L, ...) arrays big_vision's model uses, and a (2, F, D) gating einsum is
  transposed to (2, D, F). Both happen on the devices, in jitted functions whose inputs are
  already sharded like their outputs (the stacked axis L is never split), so they move no
  data between devices and never hold a whole array on one device.

  pad_rows: embedding rows to drop; "auto" drops 128 from a 256128-row embedding (Gemma's
  unused rows). min_vocab_size: rows the table must have (the tokenizer's size); missing rows
  (e.g. PaliGemma's 1024 `<loc>` + 128 `<seg>` tokens over Gemma's 256000) are drawn
  N(0, 0.02^2) with `seed`, as big_vision's loader does; they are untrained.
  The `.npz` may hold a full PaliGemma (its `llm/...` is ignored) or only `img/...`.
  """
  ocp = _ocp()
  gemma_path = check_committed(gemma_path, require_commit_marker)
  meta = _flat_metadata(gemma_path)

  layers, top = {}, {}
  for key, (tree_path, m) in meta.items():
    if not key.startswith("transformer/"):
      raise CheckpointError(f"{gemma_path}: unexpected key '{key}'; a Gemma release keeps "
                            "everything under 'transformer/'")
    rest = key[len("transformer/"):]
    lm = _LAYER.match(rest)
    if lm:
      layers.setdefault(_gemma_name(lm.group(2)), {})[int(lm.group(1))] = (tree_path, m)
    else:
      top[_gemma_name(rest)] = (tree_path, m)
  if not layers:
    raise CheckpointError(f"{gemma_path}: no 'transformer/layer_0/...' keys: not a Gemma "
                          "release checkpoint")
  depth = 1 + max(max(per) for per in layers.values())
  for name, per in sorted(layers.items()):
    missing = sorted(set(range(depth)) - set(per))
    if missing:
      raise CheckpointError(f"{gemma_path}: missing key 'transformer/layer_{missing[0]}/"
                            f"{name}' (the checkpoint has {depth} layers)")
    shapes = {tuple(m.shape) for _, m in per.values()}
    if len(shapes) != 1:
      raise CheckpointError(f"{gemma_path}: '{name}' has different shapes across layers: "
                            f"{sorted(shapes)}")

  # Shapes in big_vision's layout, before reading anything.
  if "embedder/input_embedding" not in top:
    raise CheckpointError(f"{gemma_path}: missing key 'transformer/embedder/input_embedding'")
  stored_rows, width = top["embedder/input_embedding"][1].shape
  drop = (128 if stored_rows == GEMMA_PADDED_VOCAB else 0) if pad_rows == "auto" \
      else int(pad_rows)
  rows = stored_rows - drop
  if not 0 < rows <= stored_rows:
    raise CheckpointError(f"{gemma_path}: cannot drop {drop} of the {stored_rows} embedding rows")
  vocab = max(rows, int(min_vocab_size or 0))
  transpose_gating = False
  if "mlp/gating_einsum" in layers and "mlp/linear" in layers:
    g = tuple(next(iter(layers["mlp/gating_einsum"].values()))[1].shape)
    f, d = tuple(next(iter(layers["mlp/linear"].values()))[1].shape)
    if len(g) == 3 and g[1:] == (f, d) and f != d:
      transpose_gating = True
    elif f == d and len(g) == 3 and g[1:] == (f, d):
      raise CheckpointError(f"{gemma_path}: mlp width equals model width ({d}): cannot tell "
                            "whether gating_einsum is stored (2, D, F) or (2, F, D)")

  def llm_shape(name, stored):
    stored = tuple(stored)
    if name == "mlp/gating_einsum" and transpose_gating:
      stored = (stored[0], stored[2], stored[1])
    return stored

  llm_shapes = {f"llm/layers/{name}": (depth,) + llm_shape(name, next(iter(per.values()))[1].shape)
                for name, per in layers.items()}
  llm_shapes.update({f"llm/{name}": tuple(m.shape) for name, (_, m) in top.items()})
  llm_shapes["llm/embedder/input_embedding"] = (vocab, width)

  img = checkpoint.npz_index(img_npz, keep=lambda key: key.startswith("img/"))
  if not img:
    raise CheckpointError(f"{img_npz}: no 'img/...' arrays (the vision tower)")
  shapes = dict(llm_shapes, **{k: a.shape for k, a in img.items()})
  where = f"{gemma_path} + {img_npz}"
  config = checkpoint.infer_config(shapes, where, overrides)
  checkpoint.validate(shapes, config, where)

  # Read every Gemma array into the per-layer slice of its final sharding.
  dtype = jnp.dtype(dtype)

  def final_sharding(key, shape):
    return _target(mesh, key, shape)

  def layer_sharding(name, stored_shape):
    """The sharding of one stored layer: the stacked one without L (and transposed back)."""
    full = final_sharding(f"llm/layers/{name}", llm_shapes[f"llm/layers/{name}"])
    if not isinstance(full, NamedSharding):
      return full
    spec = tuple(full.spec) + (None,) * (len(stored_shape) + 1 - len(full.spec))
    spec = spec[1:]
    if name == "mlp/gating_einsum" and transpose_gating:
      spec = (spec[0], spec[2], spec[1])
    return NamedSharding(full.mesh, P(*spec))

  args = {}
  for name, per in layers.items():
    for _, (tree_path, m) in per.items():
      args[tree_path] = ocp.ArrayRestoreArgs(sharding=layer_sharding(name, m.shape),
                                             dtype=dtype, global_shape=tuple(m.shape))
  for name, (tree_path, m) in top.items():
    key = f"llm/{name}"
    shape = llm_shapes[key]
    # The embedding is read as its first `rows` rows, zero-padded to `vocab` (orbax reads
    # only each device's rows: no full copy of the 256128-row table anywhere).
    args[tree_path] = ocp.ArrayRestoreArgs(
        sharding=final_sharding(key, shape), dtype=dtype, global_shape=tuple(shape),
        strict=tuple(shape) == tuple(m.shape))
  restored = _restore(gemma_path, args)

  flat = {}
  for name, per in sorted(layers.items()):
    key = f"llm/layers/{name}"
    out = final_sharding(key, llm_shapes[key])
    swap = name == "mlp/gating_einsum" and transpose_gating
    stack = jax.jit(lambda *xs, swap=swap: jnp.stack(
        [jnp.swapaxes(x, -1, -2) if swap else x for x in xs]), out_shardings=out)
    parts = [restored.pop(per[i][0]) for i in range(depth)]
    flat[key] = stack(*parts)
    del parts
  for name, (tree_path, _) in top.items():
    flat[f"llm/{name}"] = restored.pop(tree_path)
  if vocab > rows:  # new rows for tokens Gemma lacks, drawn on the devices that hold them
    emb = flat["llm/embedder/input_embedding"]
    fill = jax.jit(lambda e, key: e.at[rows:].set(
        (0.02 * jax.random.normal(key, (vocab - rows, width), jnp.float32)).astype(e.dtype)),
        out_shardings=emb.sharding, donate_argnums=0)
    flat["llm/embedder/input_embedding"] = fill(emb, jax.random.PRNGKey(seed))

  flat.update(checkpoint.read_npz(img_npz, img, lambda key, host: sharding.place_host_array(
      host, final_sharding(key, shapes[key]), dtype)))
  return Loaded(config, traverse_util.unflatten_dict(flat, sep="/"), where)

