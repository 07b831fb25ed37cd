"""big_vision `.npz` checkpoints: read without pickle, infer the architecture, validate, place.

Arrays are used exactly as stored (big_vision names, scanned layers); the only
change is the dtype cast to the parameter dtype the user asks for. Uncompressed
members (np.savez, what big_vision writes) are memory-mapped, so a checkpoint is
never held twice in host memory; compressed members are streamed one at a time.
Every member's CRC-32 is checked as it is read (`read_npz`, the one reader of `.npz`
data): a damaged file is refused, naming the key. The check reads the memory map in
chunks (no copy) at ~2-3 GB/s on one core: +0.25-0.6 s per GB of checkpoint, 10-40% of
a load from the page cache.
"""
import dataclasses
import math
import os
import struct
import zipfile
import zlib
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from paligemma_jax.model import gemma, layouts, paligemma, vit


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message names the file and the key."""


ACCEPTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16),
                   np.dtype(np.float64))

# Settings no shape tells, per known language model. Keyed by
# (width, depth, mlp_dim, num_heads, num_kv_heads, head_dim).
KNOWN_LLMS = {
    (2048, 18, 16384, 8, 1, 256): dict(name="gemma_2b", attn_logits_softcap=None,
                                       final_logits_softcap=None, query_scale="head_dim"),
    (2304, 26, 9216, 8, 4, 256): dict(name="gemma2_2b", attn_logits_softcap=50.0,
                                      final_logits_softcap=30.0, query_scale="head_dim"),
    (3584, 42, 14336, 16, 8, 256): dict(name="gemma2_9b", attn_logits_softcap=50.0,
                                        final_logits_softcap=30.0, query_scale="head_dim"),
    (4608, 46, 36864, 32, 16, 128): dict(name="gemma2_27b", attn_logits_softcap=50.0,
                                         final_logits_softcap=30.0, query_scale="width_over_heads"),
}
GEMMA1_DEFAULTS = dict(attn_logits_softcap=None, final_logits_softcap=None, query_scale="head_dim")
GEMMA2_DEFAULTS = dict(attn_logits_softcap=50.0, final_logits_softcap=30.0, query_scale="head_dim")
OVERRIDABLE = ("attn_logits_softcap", "final_logits_softcap", "query_scale")


# ---------------------------------------------------------------------------
# Reading the zip without np.load (which cannot memory-map npz members).

def _npy_header(member, path, key):
  try:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
  except ValueError as e:
    raise CheckpointError(f"{path}: key '{key}' is not a valid .npy array: {e}") from e
  if dtype.hasobject:
    raise CheckpointError(
        f"{path}: key '{key}' holds Python objects (dtype {dtype}) and would need pickle "
        "to load; refused. Re-save the checkpoint with numeric arrays only.")
  if dtype.kind == "V" and dtype.itemsize == 2 and dtype.names is None:
    dtype = np.dtype(ml_dtypes.bfloat16)  # big_vision stores bfloat16 as void of 2 bytes
  return shape, fortran, dtype


def _local_data_start(f, info):
  f.seek(info.header_offset)
  header = f.read(30)
  if len(header) != 30 or header[:4] != b"PK\x03\x04":
    raise zipfile.BadZipFile(f"bad local header for member {info.filename}")
  name_len, extra_len = struct.unpack("<HH", header[26:30])
  return info.header_offset + 30 + name_len + extra_len


@dataclasses.dataclass(frozen=True)
class Member:
  """One `.npy` member of an `.npz`, from its headers (no data read)."""
  name: str                # the zip member name, e.g. "params/llm/final_norm/scale.npy"
  shape: tuple
  dtype: np.dtype
  order: str               # "C" or "F"
  info: zipfile.ZipInfo
  start: int               # where the member's bytes (npy header included) begin in the file
  data_offset: int         # where its array data begins, counted from `start`


def _open_zip(path):
  try:
    return zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointError(f"{path}: no such checkpoint file") from None
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(
        f"{path}: not a readable .npz (zip) file ({e}); is it truncated, or not a big_vision "
        "checkpoint?") from e


def npz_index(path, keep: Callable[[str], bool] = lambda key: True,
              dtypes=ACCEPTED_DTYPES) -> dict:
  """key (without `params/`) -> Member, for the members whose key `keep` selects.

  Reads only the headers: refuses pickled arrays, truncated members and files, and dtypes
  outside `dtypes` (None: any), each naming the file and the key.
  """
  path = os.fspath(path)
  zf = _open_zip(path)
  file_size = os.path.getsize(path)
  index = {}
  with zf, open(path, "rb") as raw:
    for info in zf.infolist():
      name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
      key = strip_prefix(name)
      if not keep(key):
        continue
      try:
        with zf.open(info) as member:
          shape, fortran, dtype = _npy_header(member, path, name)
          data_offset = member.tell()
        start = _local_data_start(raw, info)
      except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise CheckpointError(f"{path}: key '{name}' could not be read: {e}") from e
      nbytes = math.prod(shape) * dtype.itemsize
      if data_offset + nbytes > info.file_size:
        raise CheckpointError(
            f"{path}: key '{name}' of shape {shape} needs {nbytes} bytes of data but holds "
            f"{info.file_size - data_offset} (truncated member)")
      if info.compress_type == zipfile.ZIP_STORED and start + info.file_size > file_size:
        raise CheckpointError(
            f"{path}: key '{name}' needs {nbytes} bytes of data but the file ends early "
            "(truncated file)")
      if dtypes is not None and dtype not in dtypes:
        raise CheckpointError(
            f"{path}: key '{key}' has dtype {dtype}; expected one of float32, float16, bfloat16")
      index[key] = Member(info.filename, shape, dtype, "F" if fortran else "C", info, start,
                          data_offset)
  return index


CRC_CHUNK = 16 << 20


def _check_crc(path, key, member: Member, data: np.ndarray):
  """CRC-32 of a stored member's bytes (a uint8 memory map), chunk by chunk: no copy."""
  crc = 0
  for i in range(0, data.size, CRC_CHUNK):
    crc = zlib.crc32(data[i:i + CRC_CHUNK], crc)
  if crc != member.info.CRC:
    raise CheckpointError(
        f"{path}: key '{key}' fails its CRC-32 check (stored {member.info.CRC:08x}, read "
        f"{crc:08x}): the file is damaged; download or copy it again")


def _read_member(path, key, member: Member, zf) -> np.ndarray:
  """The member's array, CRC-checked: memory-mapped when stored, else decompressed once."""
  info, nbytes = member.info, math.prod(member.shape) * member.dtype.itemsize
  if info.compress_type == zipfile.ZIP_STORED:
    raw = np.memmap(path, np.uint8, mode="r", offset=member.start, shape=(info.file_size,))
    _check_crc(path, key, member, raw)
    data = raw[member.data_offset:member.data_offset + nbytes]
    return data.view(member.dtype).reshape(member.shape, order=member.order)
  array = np.empty(member.shape, member.dtype, order=member.order)
  buffer = memoryview(array.reshape(-1, order="A").view(np.uint8))
  try:
    with zf.open(info) as f:
      f.seek(member.data_offset)
      got = 0
      while got < nbytes:
        n = f.readinto(buffer[got:])
        if not n:
          break
        got += n
      while f.read(1 << 16):  # zipfile checks the CRC once the member is read to its end
        pass
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise CheckpointError(f"{path}: key '{key}' could not be read ({e}): the file is "
                          "damaged; download or copy it again") from e
  if got != nbytes:
    raise CheckpointError(
        f"{path}: key '{key}' has {got} bytes of data, expected {nbytes} (truncated file)")
  return array


def read_npz(path, index: Mapping[str, Member],
             place: Callable[[str, np.ndarray], object] = lambda key, host: host):
  """Yields (key, place(key, host)) for each member of `index` (from `npz_index`), in key order.

  The one reader of `.npz` data. `host` is the member's array, its CRC-32 verified first
  (CheckpointError naming the file and the key on a mismatch): a read-only memory map of
  the file for stored members (np.savez, what big_vision writes; the check reads the pages
  once, the map holds no copy in anonymous memory), an array decompressed once otherwise.
  `place` turns it into what the caller keeps (device_put, a sharded placement, a cast);
  `host` is dropped as soon as `place` returns.
  """
  path = os.fspath(path)
  with _open_zip(path) as zf:
    for key in sorted(index):
      host = _read_member(path, key, index[key], zf)
      placed = place(key, host)
      del host
      yield key, placed


def strip_prefix(key: str) -> str:
  return key[len("params/"):] if key.startswith("params/") else key


# ---------------------------------------------------------------------------
# Architecture from shapes.

def _shape(shapes, key, ndim, path):
  if key not in shapes:
    raise CheckpointError(f"{path}: missing key '{key}' (needed to infer the architecture)")
  shape = tuple(shapes[key])
  if len(shape) != ndim:
    raise CheckpointError(
        f"{path}: key '{key}' has shape {shape}; expected {ndim} dimensions")
  return shape


def infer_config(shapes: Mapping[str, tuple], path: str = "<checkpoint>",
                 overrides: Optional[Mapping] = None) -> paligemma.PaliGemmaConfig:
  """PaliGemmaConfig from the arrays' shapes (keys without `params/`).

  overrides: values for `attn_logits_softcap`, `final_logits_softcap` (0 or None
  = off), `query_scale`; keys set to None are ignored here and taken from the
  variant table.
  """
  patch, _, _, vit_width = _shape(shapes, "img/embedding/kernel", 4, path)
  _, num_patches, _ = _shape(shapes, "img/pos_embedding", 3, path)
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise CheckpointError(
        f"{path}: key 'img/pos_embedding' has {num_patches} positions, not a square grid")
  blk = "img/Transformer/encoderblock/"
  vit_depth, _, vit_heads, _ = _shape(shapes, blk + "MultiHeadDotProductAttention_0/query/kernel", 4, path)
  _, _, vit_mlp = _shape(shapes, blk + "MlpBlock_0/Dense_0/kernel", 3, path)
  _, out_dim = _shape(shapes, "img/head/kernel", 2, path)

  vocab, width = _shape(shapes, "llm/embedder/input_embedding", 2, path)
  if "llm/layers/attn/qkv_einsum/w" in shapes:
    depth, _, heads, _, head_dim = _shape(shapes, "llm/layers/attn/qkv_einsum/w", 5, path)
    kv_heads = heads
  else:
    depth, heads, _, head_dim = _shape(shapes, "llm/layers/attn/q_einsum/w", 4, path)
    _, _, kv_heads, _, _ = _shape(shapes, "llm/layers/attn/kv_einsum/w", 5, path)
  _, _, _, mlp_dim = _shape(shapes, "llm/layers/mlp/gating_einsum", 4, path)
  post_norms = "llm/layers/post_attention_norm/scale" in shapes

  known = KNOWN_LLMS.get((width, depth, mlp_dim, heads, kv_heads, head_dim))
  settings = dict(known or (GEMMA2_DEFAULTS if post_norms else GEMMA1_DEFAULTS))
  settings.pop("name", None)
  for name, value in (overrides or {}).items():
    if name not in OVERRIDABLE:
      raise ValueError(f"unknown model override '{name}'; known: {OVERRIDABLE}")
    if value is None:
      continue
    if name != "query_scale" and not value:
      value = None  # a softcap of 0 means off, as in big_vision's configs
    settings[name] = value

  return paligemma.PaliGemmaConfig(
      vit=vit.ViTConfig(image_size=side * patch, patch=patch, width=vit_width, depth=vit_depth,
                        mlp_dim=vit_mlp, num_heads=vit_heads, out_dim=out_dim),
      llm=gemma.GemmaConfig(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                            num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                            post_norms=post_norms, **settings))


def validate(shapes: Mapping[str, tuple], config: paligemma.PaliGemmaConfig, path: str):
  """Key for key and shape for shape against a freshly initialised tree."""
  expected = {k: v.shape for k, v in
              traverse_util.flatten_dict(paligemma.abstract_params(config), sep="/").items()}
  missing = sorted(set(expected) - set(shapes))
  if missing:
    raise CheckpointError(
        f"{path}: missing key '{missing[0]}' (expected shape {expected[missing[0]]})"
        + (f" and {len(missing) - 1} more: {missing[1:6]}" if len(missing) > 1 else ""))
  unexpected = sorted(set(shapes) - set(expected))
  if unexpected:
    raise CheckpointError(
        f"{path}: unexpected key '{unexpected[0]}' with shape {tuple(shapes[unexpected[0]])}; "
        "this is not a PaliGemma parameter of the inferred architecture"
        + (f" ({len(unexpected) - 1} more: {unexpected[1:6]})" if len(unexpected) > 1 else ""))
  for key, want in expected.items():
    if tuple(shapes[key]) != tuple(want):
      raise CheckpointError(
          f"{path}: key '{key}' has shape {tuple(shapes[key])}, expected {tuple(want)} for the "
          "architecture inferred from the other arrays")


@dataclasses.dataclass
class Loaded:
  config: paligemma.PaliGemmaConfig
  params: dict  # nested, big_vision names, jax arrays
  source: str


def npz_config(path: str, overrides: Optional[Mapping] = None):
  """-> (`npz_index(path)`, the config inferred from its shapes and validated against them)."""
  index = npz_index(path)
  shapes = {k: m.shape for k, m in index.items()}
  config = infer_config(shapes, path, overrides)
  validate(shapes, config, path)
  return index, config


STACKED_TOWERS = layouts.STACKED_TOWERS  # `unstack` splits them into `<name>_i`


def load_npz(path: str, dtype=jnp.float32, overrides: Optional[Mapping] = None,
             place: Optional[Callable[[str, np.ndarray], jax.Array]] = None,
             unstack: bool = False, out_major: bool = False) -> Loaded:
  """Loads a big_vision PaliGemma `.npz` (float32, float16 or bfloat16; with or without `params/`).

  dtype: the parameter dtype on device (each array is cast as it is placed).
  place: optional `(key, host_array) -> jax.Array`, e.g. a sharded device_put.
  unstack, out_major: return the inference tree (`layouts.unstacked`) instead, each layer
  sliced from the memory-mapped member and placed on its own, so no stacked copy is made.
  """
  path = os.fspath(path)
  index, config = npz_config(path, overrides)
  place = place or (lambda key, a: jax.device_put(a))

  def put(key, host):  # -> {flat key: placed array}, one layer at a time when unstacking
    pieces = [(key, host)]
    tower = next((t for t in STACKED_TOWERS if key.startswith(t + "/")), None)
    if unstack and tower:
      pieces = [(f"{tower}_{i}/{name}", a) for i, (name, a) in enumerate(
          layouts.split_layers(key[len(tower) + 1:], host, out_major and tower == "llm/layers"))]
    return {k: place(k, np.ascontiguousarray(a, dtype=dtype)) for k, a in pieces}

  flat = {}
  for _, placed in read_npz(path, index, put):
    flat.update(placed)
  return Loaded(config, traverse_util.unflatten_dict(flat, sep="/"), path)


def save_npz(path: str, params, dtype: str = "float32"):
  """Writes params in big_vision's layout (`params/...`; bfloat16 as void of 2 bytes)."""
  flat = {}
  for key, value in traverse_util.flatten_dict(layouts.stacked(params), sep="/").items():
    a = np.asarray(value)
    if dtype == "bfloat16":
      a = a.astype(ml_dtypes.bfloat16).view("V2")
    else:
      a = a.astype(dtype)
    flat["params/" + key] = a
  np.savez(path, **flat)
