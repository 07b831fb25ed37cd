"""Hugging Face (transformers) PaliGemma directories in and out, in big_vision's tree.

A transformers PaliGemma directory holds `config.json`, the weights as safetensors (one
`model.safetensors`, or shards `model-0000X-of-0000N.safetensors` listed by
`model.safetensors.index.json`) and usually the tokenizer (`tokenizer.model`, sentencepiece;
`tokenizer.json`, the fast tokenizer).

* `load_hf(dir)`: `config.json` gives the architecture (heads, Gemma 1 or 2, softcaps,
  `query_pre_attn_scalar`, image size and patch); every tensor's shape is checked against it
  before anything is read. The shards are memory-mapped and each tensor is mapped into
  big_vision's layout as it is read (transposes of `Linear` weights, head splits, q/k/v into
  `q_einsum`/`kv_einsum` or `qkv_einsum`, gate/up into `gating_einsum`, the patch convolution,
  the tied embedding without HF's rows from `image_token_index` on): one tensor in flight.
  The result is a `checkpoint.Loaded`, as `checkpoint.load_npz` gives.
* `save_hf(dir, params, config)`: any loaded model (either tree) as such a directory, written
  tensor by tensor, that `PaliGemmaForConditionalGeneration.from_pretrained` and
  `PaliGemmaProcessor.from_pretrained` load.

What is not taken from HF: positions stay big_vision's 0-based ones (HF's PaliGemma adds 1;
the weights were trained 0-based), and there is no sliding window (HF's Gemma 2 declares 4096
on every other layer; big_vision has none and trained PaliGemma 2 without one). At 224 and 448
px a sequence (256 or 1024 image tokens + prompt + answer) stays far below 4096, where the
two agree; at 896 px the 4096 image tokens alone fill it, and there HF's windowed layers hide
the first image rows from the text while big_vision (and this code) do not.
"""
import json
import math
import os
import shutil
import struct
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from paligemma_jax.ckpt import checkpoint
from paligemma_jax.model import gemma, layouts, paligemma, vit
from paligemma_jax.ckpt.checkpoint import CheckpointError, Loaded

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_MODEL = "tokenizer.model"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
ROPE_THETA = 10000.0  # gemma.ROPE_BASE
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
              "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# transformers' class defaults for the fields read here, used where config.json leaves one
# out (save_pretrained writes only what differs from them).
_TEXT_DEFAULTS = {
    "gemma": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, vocab_size=256000,
                  rms_norm_eps=1e-6),
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                   rms_norm_eps=1e-6, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}
# PaliGemmaConfig's text model when config.json has no text_config at all.
_PALIGEMMA_TEXT = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                       intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                       vocab_size=257152)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=16,
                        layer_norm_eps=1e-6, vision_use_head=True)
_PALIGEMMA_VISION = dict(intermediate_size=4096, hidden_size=1152, patch_size=14, image_size=224,
                         num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")

# Stored name prefixes (the Hub's repositories, transformers 4.x and 5.x) -> the names of
# transformers 5's modules, used here throughout.
_ALIASES = (("model.vision_tower.vision_model.", "model.vision_tower."),
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.vision_model.", "model.vision_tower."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."))
# What save_hf writes: the prefixes of Google's Hub repositories, which transformers 4.x and
# 5.x and vLLM all read.
_EXPORT = (("model.language_model.", "language_model.model."),
           ("model.vision_tower.", "vision_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector."))
_VT, _LM, _PROJ = "model.vision_tower.", "model.language_model.", "model.multi_modal_projector."


def _canonical(name: str) -> str:
  for old, new in _ALIASES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def _exported(name: str) -> str:
  for new, old in _EXPORT:
    if name.startswith(new):
      return old + name[len(new):]
  return name


def is_hf_dir(path) -> bool:
  """A directory with a `config.json` (a transformers model; Orbax directories have none)."""
  path = os.fspath(path)
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def tokenizer_file(path) -> str:
  """The sentencepiece `tokenizer.model` of an HF directory (what `--tokenizer` defaults to).

  A directory with only `tokenizer.json` (transformers' fast tokenizer) is refused: this
  project tokenizes with sentencepiece, and `tokenizer.json` cannot be turned back into a
  `.model`; the PaliGemma repositories on the Hub ship both.
  """
  path = os.fspath(path)
  model = os.path.join(path, TOKENIZER_MODEL)
  if os.path.isfile(model):
    return model
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    raise CheckpointError(
        f"{path}: has tokenizer.json (transformers' fast tokenizer) but no {TOKENIZER_MODEL}; "
        "this project needs the sentencepiece model: pass --tokenizer=PATH (e.g. "
        f"paligemma_tokenizer.model from gs://big_vision, or {TOKENIZER_MODEL} from the same "
        "Hub repository)")
  raise CheckpointError(f"{path}: no {TOKENIZER_MODEL}; pass --tokenizer=PATH "
                        "(paligemma_tokenizer.model)")


# ---------------------------------------------------------------------------
# safetensors files, memory-mapped.

def _read_header(path: str) -> dict:
  """name -> (dtype, shape, absolute byte offset) of every tensor in one safetensors file."""
  from safetensors import SafetensorError, safe_open
  try:  # the library's own checks of the header (offsets contiguous, in bounds)
    with safe_open(path, framework="numpy") as f:
      names = set(f.keys())
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  if set(header) != names:
    raise CheckpointError(f"{path}: the safetensors header does not parse consistently")
  out = {}
  for name, info in header.items():
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor '{name}' has dtype {info['dtype']}; expected "
                            "F32, F16 or BF16")
    shape = tuple(info["shape"])
    start, end = info["data_offsets"]
    if end - start != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise CheckpointError(f"{path}: tensor '{name}' of shape {shape} does not fit its "
                            "data (truncated file?)")
    out[name] = (dtype, shape, 8 + n + start)
  return out


class _Tensors:
  """The tensors of an HF directory by canonical name, read as memory maps on demand."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX)
    single = os.path.join(path, SINGLE)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
      where = index
    elif os.path.isfile(single):
      weight_map, where = None, single
    else:
      bins = [f for f in os.listdir(path) if f.endswith(".bin")]
      raise CheckpointError(
          f"{path}: neither {INDEX} nor {SINGLE}" + (
              f"; found {bins[0]}: PyTorch pickles are not read (they can run code). Re-save "
              "it with save_pretrained(..., safe_serialization=True)" if bins else ""))
    headers = {}
    if weight_map is None:
      headers[SINGLE] = _read_header(single)
      weight_map = {name: SINGLE for name in headers[SINGLE]}
    for name, shard in sorted(weight_map.items()):
      if shard not in headers:
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
          raise CheckpointError(f"{where}: tensor '{name}' is in shard '{shard}', which is "
                                f"missing from {path}")
        headers[shard] = _read_header(file)
      if name not in headers[shard]:
        raise CheckpointError(f"{where}: lists tensor '{name}' in shard '{shard}', but "
                              f"{os.path.join(path, shard)} has no such tensor")
    self.entries = {}  # canonical name -> (stored name, file, dtype, shape, offset)
    for name, shard in weight_map.items():
      dtype, shape, offset = headers[shard][name]
      canonical = _canonical(name)
      if canonical in self.entries:
        raise CheckpointError(f"{os.path.join(path, shard)}: tensor '{name}' duplicates "
                              f"'{self.entries[canonical][0]}'")
      self.entries[canonical] = (name, os.path.join(path, shard), dtype, shape, offset)

  def where(self, name: str) -> str:
    stored, file = self.entries[name][:2]
    return f"{file}: tensor '{stored}'"

  def shape(self, name: str) -> tuple:
    return self.entries[name][3]

  def get(self, name: str) -> np.ndarray:
    _, file, dtype, shape, offset = self.entries[name]
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


# ---------------------------------------------------------------------------
# The mapping, one entry per big_vision array. Each part is (HF name, index into big_vision's
# per-layer array, kind); HF names hold `{i}` for the layer. Axis letters: D LLM width,
# N heads, K kv heads, H head dim, F mlp, W ViT width, M ViT mlp, P patch.

def _hf_shape(kind: str, bv: tuple) -> tuple:
  """The HF shape of a big_vision (per-layer, indexed) shape under `kind`."""
  if kind == "same":
    return bv
  if kind == "T":           # Linear (out, in) <-> (in, out)
    return bv[::-1]
  if kind == "heads_in":    # q/k/v (N*H, D) <-> (N, D, H); ViT (Hv*Dh, W) <-> (W, Hv, Dh)
    return (bv[0] * bv[2], bv[1])
  if kind == "vit_in":
    return (bv[1] * bv[2], bv[0])
  if kind == "heads_out":   # o_proj (D, N*H) <-> (N, H, D)
    return (bv[2], bv[0] * bv[1])
  if kind == "flat":        # ViT q/k/v bias (Hv*Dh,) <-> (Hv, Dh); pos (Np, W) <-> (1, Np, W)
    return (math.prod(bv),) if len(bv) == 2 else bv[1:]
  if kind == "conv":        # (W, 3, P, P) <-> (P, P, 3, W)
    return (bv[3], bv[2], bv[0], bv[1])
  raise ValueError(kind)


def _to_bv(kind: str, a, bv: tuple):
  """HF array -> big_vision layout (a view where numpy allows)."""
  if kind == "same":
    return a
  if kind == "T":
    return a.T
  if kind == "heads_in":
    return a.reshape(bv[0], bv[2], bv[1]).transpose(0, 2, 1)
  if kind == "vit_in":
    return a.reshape(bv[1], bv[2], bv[0]).transpose(2, 0, 1)
  if kind == "heads_out":
    return a.reshape(bv[2], bv[0], bv[1]).transpose(1, 2, 0)
  if kind == "flat":
    return a.reshape(bv)
  if kind == "conv":
    return a.transpose(2, 3, 1, 0)
  raise ValueError(kind)


def _to_hf(kind: str, b):
  """big_vision array (per layer, indexed) -> HF layout."""
  if kind == "same":
    return b
  if kind == "T":
    return b.T
  if kind == "heads_in":
    return b.transpose(0, 2, 1).reshape(-1, b.shape[1])
  if kind == "vit_in":
    return b.transpose(1, 2, 0).reshape(-1, b.shape[0])
  if kind == "heads_out":
    return b.transpose(2, 0, 1).reshape(b.shape[2], -1)
  if kind == "flat":
    return b.reshape(-1) if b.ndim == 2 else b.reshape(b.shape[1:])
  if kind == "conv":
    return b.transpose(3, 2, 0, 1)
  raise ValueError(kind)


_VIT_BLOCK = "img/Transformer/encoderblock/"


def _mapping(config: paligemma.PaliGemmaConfig) -> list:
  """[(big_vision key, stacked tower or None, [(HF name, index, kind)])], embedding excluded."""
  enc, mha = _VT + "encoder.layers.{i}.", _VIT_BLOCK + "MultiHeadDotProductAttention_0/"
  out = [("img/embedding/kernel", None, [(_VT + "embeddings.patch_embedding.weight", (), "conv")]),
         ("img/embedding/bias", None, [(_VT + "embeddings.patch_embedding.bias", (), "same")]),
         ("img/pos_embedding", None, [(_VT + "embeddings.position_embedding.weight", (), "flat")])]
  for n, hf in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    for p, q in (("scale", "weight"), ("bias", "bias")):
      out.append((_VIT_BLOCK + f"{n}/{p}", "vit", [(enc + f"{hf}.{q}", (), "same")]))
  for bv, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out.append((mha + f"{bv}/kernel", "vit", [(enc + f"self_attn.{hf}.weight", (), "vit_in")]))
    out.append((mha + f"{bv}/bias", "vit", [(enc + f"self_attn.{hf}.bias", (), "flat")]))
  out.append((mha + "out/kernel", "vit", [(enc + "self_attn.out_proj.weight", (), "heads_out")]))
  out.append((mha + "out/bias", "vit", [(enc + "self_attn.out_proj.bias", (), "same")]))
  for n, hf in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    mlp = _VIT_BLOCK + f"MlpBlock_0/{n}/"
    out.append((mlp + "kernel", "vit", [(enc + f"mlp.{hf}.weight", (), "T")]))
    out.append((mlp + "bias", "vit", [(enc + f"mlp.{hf}.bias", (), "same")]))
  for p, q in (("scale", "weight"), ("bias", "bias")):
    out.append((f"img/Transformer/encoder_norm/{p}", None,
                [(_VT + f"post_layernorm.{q}", (), "same")]))
  out.append(("img/head/kernel", None, [(_PROJ + "linear.weight", (), "T")]))
  out.append(("img/head/bias", None, [(_PROJ + "linear.bias", (), "same")]))

  c = config.llm
  lay, attn = _LM + "layers.{i}.", _LM + "layers.{i}.self_attn."
  norms = [("pre_attention_norm", "input_layernorm")]
  if c.post_norms:  # Gemma 2
    norms += [("post_attention_norm", "post_attention_layernorm"),
              ("pre_ffw_norm", "pre_feedforward_layernorm"),
              ("post_ffw_norm", "post_feedforward_layernorm")]
  else:  # Gemma 1's "post_attention_layernorm" is the norm before the MLP
    norms += [("pre_ffw_norm", "post_attention_layernorm")]
  for bv, hf in norms:
    out.append((f"llm/layers/{bv}/scale", "llm", [(lay + f"{hf}.weight", (), "same")]))
  if c.num_kv_heads == c.num_heads:
    out.append(("llm/layers/attn/qkv_einsum/w", "llm",
                [(attn + f"{p}_proj.weight", (j,), "heads_in") for j, p in enumerate("qkv")]))
  else:
    out.append(("llm/layers/attn/q_einsum/w", "llm", [(attn + "q_proj.weight", (), "heads_in")]))
    out.append(("llm/layers/attn/kv_einsum/w", "llm",
                [(attn + f"{p}_proj.weight", (j,), "heads_in") for j, p in enumerate("kv")]))
  out.append(("llm/layers/attn/attn_vec_einsum/w", "llm",
              [(attn + "o_proj.weight", (), "heads_out")]))
  out.append(("llm/layers/mlp/gating_einsum", "llm",
              [(lay + "mlp.gate_proj.weight", (0,), "T"), (lay + "mlp.up_proj.weight", (1,), "T")]))
  out.append(("llm/layers/mlp/linear", "llm", [(lay + "mlp.down_proj.weight", (), "T")]))
  out.append(("llm/final_norm/scale", None, [(_LM + "norm.weight", (), "same")]))
  return out


_EMBED, _LM_HEAD = _LM + "embed_tokens.weight", "lm_head.weight"
_TOWERS = {"vit": ("img/Transformer/encoderblock", "img/Transformer/encoderblock/"),
           "llm": ("llm/layers", "llm/layers/")}


# ---------------------------------------------------------------------------
# config.json -> our settings.

def _get(cfg: Mapping, key: str, defaults: Mapping):
  value = cfg.get(key)
  return defaults.get(key) if value is None else value


def _read_config(path: str) -> dict:
  file = os.path.join(path, CONFIG)
  try:
    with open(file) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable ({e})") from e
  if not isinstance(cfg, dict) or cfg.get("model_type") != "paligemma":
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    raise CheckpointError(f"{file}: model_type is {kind!r}, not 'paligemma': not a transformers "
                          "PaliGemma directory")
  text = cfg.get("text_config")
  text = dict(_PALIGEMMA_TEXT) if text is None else text
  ttype = text.get("model_type", "gemma")
  if ttype not in _TEXT_DEFAULTS:
    raise CheckpointError(f"{file}: text_config.model_type is {ttype!r}; PaliGemma's language "
                          "model is 'gemma' (PaliGemma 1) or 'gemma2' (PaliGemma 2)")
  tdef = _TEXT_DEFAULTS[ttype]
  vision = cfg.get("vision_config")
  vdef = _PALIGEMMA_VISION if vision is None else _VISION_DEFAULTS
  vision = vision or {}
  if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
    raise CheckpointError(f"{file}: vision_config.model_type is {vision.get('model_type')!r}, "
                          "expected 'siglip_vision_model'")
  if _get(vision, "vision_use_head", vdef):
    raise CheckpointError(f"{file}: vision_config.vision_use_head is true; PaliGemma's SigLIP "
                          "has no pooling head")

  def size(key):
    value = _get(vision, key, vdef)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise CheckpointError(f"{file}: vision_config.{key} {value} is not square")
      value = value[0]
    return int(value)

  s = dict(
      file=file, gemma2=ttype == "gemma2",
      width=int(_get(text, "hidden_size", tdef)), depth=int(_get(text, "num_hidden_layers", tdef)),
      mlp_dim=int(_get(text, "intermediate_size", tdef)),
      num_heads=int(_get(text, "num_attention_heads", tdef)),
      num_kv_heads=int(_get(text, "num_key_value_heads", tdef)),
      head_dim=int(_get(text, "head_dim", tdef)), vocab=int(_get(text, "vocab_size", tdef)),
      image_token_index=int(cfg.get("image_token_index", 256000)),
      vit_width=int(_get(vision, "hidden_size", vdef)),
      vit_mlp=int(_get(vision, "intermediate_size", vdef)),
      vit_depth=int(_get(vision, "num_hidden_layers", vdef)),
      vit_heads=int(_get(vision, "num_attention_heads", vdef)),
      image_size=size("image_size"), patch=size("patch_size"))
  # What our model has fixed; a checkpoint that needs something else is refused, not run wrong.
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  theta = rope.get("rope_theta", text.get("rope_theta", ROPE_THETA))
  if float(theta) != ROPE_THETA or rope.get("rope_type", "default") != "default":
    raise CheckpointError(f"{file}: text_config RoPE {rope or theta} is not the default rotary "
                          f"embedding with base {ROPE_THETA:g} that PaliGemma uses")
  act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
  vact = vision.get("hidden_act") or "gelu_pytorch_tanh"
  for where, value in (("text_config", act), ("vision_config", vact)):
    if value not in _TANH_GELU:
      raise CheckpointError(f"{file}: {where} activation {value!r}; PaliGemma uses the tanh "
                            "approximation of gelu (gelu_pytorch_tanh)")
  for where, value in (("text_config.rms_norm_eps", _get(text, "rms_norm_eps", tdef)),
                       ("vision_config.layer_norm_eps", vision.get("layer_norm_eps", 1e-6))):
    if not math.isclose(float(value), 1e-6):
      raise CheckpointError(f"{file}: {where} is {value}; PaliGemma's is 1e-6")
  if s["gemma2"]:
    scalar = float(_get(text, "query_pre_attn_scalar", tdef))
    if scalar == s["head_dim"]:
      query_scale = "head_dim"
    elif scalar * s["num_heads"] == s["width"]:
      query_scale = "width_over_heads"
    else:
      raise CheckpointError(
          f"{file}: text_config.query_pre_attn_scalar {scalar:g} is neither head_dim "
          f"({s['head_dim']}) nor hidden_size / num_attention_heads; not supported")
    caps = (text.get("attn_logit_softcapping", tdef["attn_logit_softcapping"]),
            text.get("final_logit_softcapping", tdef["final_logit_softcapping"]))
  else:  # transformers' Gemma has neither softcap and scales q by head_dim^-0.5
    query_scale, caps = "head_dim", (None, None)
  # 0 turns a softcap off in checkpoint.infer_config's overrides (None would mean "the table's").
  s["settings"] = dict(attn_logits_softcap=float(caps[0] or 0.0),
                       final_logits_softcap=float(caps[1] or 0.0), query_scale=query_scale)
  return s


# ---------------------------------------------------------------------------
# Loading.

def load_hf(path, dtype=jnp.float32, overrides: Optional[Mapping] = None, *,
            place: Optional[Callable[[str, np.ndarray], jax.Array]] = None, mesh=None,
            unstack: bool = False, out_major: bool = False) -> Loaded:
  """A transformers PaliGemma directory -> `checkpoint.Loaded` (big_vision's tree).

  dtype: the parameter dtype (each tensor is cast as it is copied into place).
  overrides: as `checkpoint.infer_config`'s, over the settings config.json gives.
  place: `(key, host array) -> jax.Array` (default `jax.device_put`); mesh: place each array
  straight into its `sharding.param_spec` sharding instead.
  unstack, out_major: return the inference tree (as `checkpoint.load_npz`), each layer
  mapped and placed on its own; otherwise each stacked (L, ...) array is allocated once and
  filled layer by layer.
  """
  path = os.fspath(path).rstrip("/") or "/"
  hf = _read_config(path)
  tensors = _Tensors(path)
  cfg_file = hf["file"]

  # Our config from config.json, with the embedding's rows from the file.
  if _EMBED not in tensors.entries:
    raise CheckpointError(f"{path}: missing tensor 'language_model.model.embed_tokens.weight' "
                          "(the token embedding)")
  rows, width = tensors.shape(_EMBED)
  if rows != hf["vocab"] or width != hf["width"]:
    raise CheckpointError(
        f"{tensors.where(_EMBED)} has shape {(rows, width)}, but {cfg_file} says "
        f"text_config.vocab_size {hf['vocab']} and hidden_size {hf['width']}")
  # HF appends `<image>` (image_token_index) and padding rows to big_vision's vocabulary.
  vocab = min(rows, hf["image_token_index"])
  settings = dict(hf["settings"])
  for name, value in (overrides or {}).items():
    if name not in checkpoint.OVERRIDABLE:
      raise ValueError(f"unknown model override '{name}'; known: {checkpoint.OVERRIDABLE}")
    if value is not None:
      settings[name] = value
  if hf["image_size"] % hf["patch"]:
    raise CheckpointError(f"{cfg_file}: image_size {hf['image_size']} is not a multiple of "
                          f"patch_size {hf['patch']}")
  if hf["vit_width"] % hf["vit_heads"]:
    raise CheckpointError(f"{cfg_file}: vision_config.hidden_size {hf['vit_width']} is not a "
                          f"multiple of num_attention_heads {hf['vit_heads']}")
  stated = paligemma.PaliGemmaConfig(
      vit=vit.ViTConfig(
          image_size=hf["image_size"], patch=hf["patch"], width=hf["vit_width"],
          depth=hf["vit_depth"], mlp_dim=hf["vit_mlp"], num_heads=hf["vit_heads"],
          out_dim=hf["width"]),
      llm=gemma.GemmaConfig(
          width=hf["width"], depth=hf["depth"], mlp_dim=hf["mlp_dim"], num_heads=hf["num_heads"],
          num_kv_heads=hf["num_kv_heads"], head_dim=hf["head_dim"], vocab_size=vocab,
          post_norms=hf["gemma2"]))
  bv_shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      paligemma.abstract_params(stated), sep="/").items()}
  mapping = _mapping(stated)

  # Every tensor's shape against config.json before anything is read.
  expected = {_EMBED: (rows, width)}
  for key, tower, parts in mapping:
    full = bv_shapes[key]
    depth = full[0] if tower else None
    per = full[1:] if tower else full
    for name, index, kind in parts:
      shape = _hf_shape(kind, per[len(index):])
      for i in range(depth) if tower else [None]:
        expected[name.format(i=i)] = shape
  for name, shape in expected.items():
    if name not in tensors.entries:
      raise CheckpointError(
          f"{path}: missing tensor '{_exported(name)}' (expected shape {shape} from {cfg_file})")
    if tensors.shape(name) != shape:
      raise CheckpointError(
          f"{tensors.where(name)} has shape {tensors.shape(name)}, but {cfg_file} implies "
          f"{shape}: config.json and the tensors disagree")
  for name in sorted(set(tensors.entries) - set(expected)):
    if name == _LM_HEAD and tensors.shape(name) == (rows, width):
      _check_tied(tensors)
      continue
    raise CheckpointError(f"{tensors.where(name)} (shape {tensors.shape(name)}) is not a "
                          f"parameter of the PaliGemma that {cfg_file} describes")

  shapes = dict(bv_shapes)
  config = checkpoint.infer_config(shapes, path, settings)
  checkpoint.validate(shapes, config, path)

  dtype = np.dtype(dtype)
  if place is None and mesh is not None:
    from jax.sharding import NamedSharding
    from paligemma_jax import sharding
    place = lambda key, a: sharding.place_host_array(
        a, NamedSharding(mesh, sharding.param_spec(key, a.shape, mesh)), dtype)
  place = place or (lambda key, a: jax.device_put(a))

  def layer(parts, per, i, out=None):
    """One layer's big_vision array (into `out` when given), each HF tensor copied into it
    (and cast) as it is read."""
    out = _empty(per, dtype) if out is None else out
    for name, index, kind in parts:
      out[index] = _to_bv(kind, tensors.get(name.format(i=i)), per[len(index):])
    return out

  flat = {}
  # Always copied off the map: a jax array must not alias a file someone may rewrite.
  emb = _copy(tensors.get(_EMBED)[:vocab], dtype)
  flat["llm/embedder/input_embedding"] = place("llm/embedder/input_embedding", emb)
  del emb
  for key, tower, parts in mapping:
    full = bv_shapes[key]
    if tower is None:
      flat[key] = place(key, layer(parts, full, None))
    elif unstack:
      stem, prefix = _TOWERS[tower]
      for i in range(full[0]):
        piece = layer(parts, full[1:], i)
        for leaf, a in layouts.split_layers(key[len(prefix):], piece[None],
                                          out_major and tower == "llm"):
          k = f"{stem}_{i}/{leaf}"
          flat[k] = place(k, a if a.flags.c_contiguous else _copy(a, dtype))
        del piece, a
    else:
      stacked = _empty(full, dtype)
      for i in range(full[0]):
        layer(parts, full[1:], i, out=stacked[i])
      flat[key] = place(key, stacked)
      del stacked
  return Loaded(config, traverse_util.unflatten_dict(flat, sep="/"), path)


def _empty(shape, dtype) -> np.ndarray:
  """np.empty, 64-byte aligned. jax's CPU client adopts such a buffer instead of copying it
  (PJRT's zero-copy for aligned host memory), so placing what is built here costs no second
  copy; the buffer is never written again once placed."""
  dtype = np.dtype(dtype)
  n = math.prod(shape) * dtype.itemsize
  raw = np.empty(n + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + n].view(dtype).reshape(shape)


def _copy(a, dtype) -> np.ndarray:
  out = _empty(a.shape, dtype)
  out[...] = a
  return out


def _check_tied(tensors: _Tensors, rows_at_once: int = 4096):
  """An `lm_head.weight` stored next to the embedding must equal it (PaliGemma ties them)."""
  emb, head = tensors.get(_EMBED), tensors.get(_LM_HEAD)
  for start in range(0, emb.shape[0], rows_at_once):
    if not np.array_equal(emb[start:start + rows_at_once], head[start:start + rows_at_once]):
      raise CheckpointError(f"{tensors.where(_LM_HEAD)} differs from the token embedding; "
                            "PaliGemma ties its output head to the embedding")


# ---------------------------------------------------------------------------
# Saving.

def _host_layers(params) -> Callable:
  """get(key, i) -> host numpy array of big_vision's `key` (layer i of a stacked tower), from
  either tree: big_vision's (stacked) or the inference tree (`<tower>_i`, maybe out-major)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  from paligemma_jax import sharding

  def get(key, i=None):
    if i is None or key in flat:
      a = flat[key] if i is None else flat[key][i]
      return sharding.to_host(a)
    stem, prefix = next((s, p) for s, p in _TOWERS.values() if key.startswith(p))
    name = key[len(prefix):]
    k = f"{stem}_{i}/{name}"
    if k in flat:
      return sharding.to_host(flat[k])
    return layouts.stored_layer(name, sharding.to_host(flat[k + layouts.OUT_MAJOR_SUFFIX]))
  return get


def _int_if_whole(x: float):
  return int(x) if float(x).is_integer() else x  # transformers' Gemma2Config wants an int


def hf_config_dict(config: paligemma.PaliGemmaConfig, rows: int, dtype: str,
                   special_ids=(2, 1, 0)) -> dict:
  """config.json for `config` (rows: the exported embedding's, `<image>` and padding included)."""
  c, v = config.llm, config.vit
  bos, eos, pad = special_ids
  text = dict(model_type="gemma2" if c.post_norms else "gemma", hidden_size=c.width,
              intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
              num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
              head_dim=c.head_dim, vocab_size=rows, rms_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
              rope_theta=ROPE_THETA,
              rope_parameters=dict(rope_type="default", rope_theta=ROPE_THETA),
              attention_bias=False, num_image_tokens=config.num_image_tokens,
              bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True,
              dtype=dtype)
  if c.post_norms:
    # No sliding window, as big_vision: every layer full, and a window no sequence can reach.
    text.update(hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar),
                attn_logit_softcapping=c.attn_logits_softcap,
                final_logit_softcapping=c.final_logits_softcap,
                sliding_window=8192, layer_types=["full_attention"] * c.depth)
  elif c.attn_logits_softcap or c.final_logits_softcap or c.query_scale != "head_dim":
    raise CheckpointError(
        "transformers' Gemma (PaliGemma 1) has no softcaps and scales queries by head_dim: "
        f"this model (softcaps {c.attn_logits_softcap}, {c.final_logits_softcap}, query scale "
        f"{c.query_scale}) cannot be written as one")
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads, num_channels=3,
                image_size=v.image_size, patch_size=v.patch, layer_norm_eps=1e-6,
                hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=c.width,
                num_image_tokens=config.num_image_tokens, dtype=dtype)
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              hidden_size=c.width, projection_dim=c.width, image_token_index=c.vocab_size,
              vocab_size=rows, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
              tie_word_embeddings=True, dtype=dtype, torch_dtype=dtype, text_config=text,
              vision_config=vision)


def _write_shard(file: str, entries: list):
  """entries: [(name, shape, dtype, produce() -> array)], written one tensor at a time."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, shape, dtype, _ in entries:
    n = math.prod(shape) * dtype.itemsize
    header[name] = dict(dtype=_ST_NAMES[dtype], shape=list(shape),
                        data_offsets=[offset, offset + n])
    offset += n
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, produce in entries:
      a = np.ascontiguousarray(produce(), dtype=dtype)
      assert a.shape == tuple(shape), (name, a.shape, shape)
      f.write(memoryview(a.reshape(-1).view(np.uint8)))
      del a


def save_hf(path, params, config: paligemma.PaliGemmaConfig, tokenizer_path: Optional[str] = None,
            *, dtype=None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
            overwrite: bool = False) -> str:
  """Writes `params` (big_vision's tree or the inference tree, on any devices) as a
  transformers PaliGemma directory; returns its absolute path.

  config.json (Gemma 1 or 2, softcaps, query scale, image size from `config`), the weights as
  safetensors shards of at most `max_shard_size` bytes (one `model.safetensors` when they
  fit) with `model.safetensors.index.json`, `preprocessor_config.json`, and the tokenizer
  (`tokenizer_path`, a sentencepiece model) as `tokenizer.model` with its
  `tokenizer_config.json`. The embedding gets HF's `<image>` row (`image_token_index` =
  the vocabulary size) and zero rows up to a multiple of 64, as Google's repositories have
  (257152 -> 257216). dtype: of the tensors ('float32', 'bfloat16', 'float16'); default the
  parameters'. The directory is written beside `path` and renamed into place when complete.
  """
  path = os.path.abspath(os.fspath(path)).rstrip("/")
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path}: already exists; choose a new directory (or overwrite=True)")
  get = _host_layers(params)
  if dtype is None:
    dtype = np.dtype(jax.tree_util.tree_leaves(params)[0].dtype)
  dtype = np.dtype(jnp.dtype(dtype))
  if dtype not in _ST_NAMES:
    raise ValueError(f"save_hf: dtype {dtype} is not float32, bfloat16 or float16")
  name_of = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
             np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float64): "float64"}[dtype]
  vocab, width = config.llm.vocab_size, config.llm.width
  rows = -(-(vocab + 1) // 64) * 64
  special = (2, 1, 0)
  tok = None
  if tokenizer_path:
    from paligemma_jax.data.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path)
    special = (tok.bos_id, tok.eos_id, tok.pad_id)
    if tok.vocab_size > vocab:
      raise ValueError(f"{tokenizer_path}: {tok.vocab_size} pieces but the model has {vocab} rows")
  config_json = hf_config_dict(config, rows, name_of, special)  # refuses what HF cannot express

  def embedding():
    out = np.zeros((rows, width), dtype)
    out[:vocab] = get("llm/embedder/input_embedding")
    return out

  bv = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(
      paligemma.abstract_params(config), sep="/").items()}
  entries = [(_exported(_EMBED), (rows, width), dtype, embedding)]
  for key, tower, parts in _mapping(config):
    full = bv[key]
    per = full[1:] if tower else full
    for name, index, kind in parts:
      shape = _hf_shape(kind, per[len(index):])
      for i in range(full[0]) if tower else [None]:
        produce = (lambda key=key, i=i, index=index, kind=kind: _to_hf(kind, get(key, i)[index]))
        entries.append((_exported(name.format(i=i)), shape, dtype, produce))

  if jax.process_index() != 0:  # multi-host: take part in every gather, let process 0 write
    for e in entries:
      e[3]()
    return path
  shards, size = [[]], 0
  for e in entries:
    n = math.prod(e[1]) * dtype.itemsize
    if shards[-1] and size + n > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += n
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    files = [SINGLE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
      _write_shard(os.path.join(tmp, file), shard)
      weight_map.update({e[0]: file for e in shard})
    if len(shards) > 1:
      total = sum(math.prod(e[1]) * dtype.itemsize for e in entries)
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2,
                  sort_keys=True)
    with open(os.path.join(tmp, CONFIG), "w") as f:
      json.dump(config_json, f, indent=2)
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump(dict(bos_token_id=special[0], eos_token_id=special[1], pad_token_id=special[2]),
                f, indent=2)
    _write_processor_files(tmp, config, tok)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(path):  # overwrite=True
    shutil.rmtree(path)
  os.rename(tmp, path)
  return path


def _write_processor_files(out: str, config: paligemma.PaliGemmaConfig, tok):
  """preprocessor_config.json (SigLIP: bicubic resize, x/127.5 - 1) and, with a tokenizer,
  tokenizer.model plus the tokenizer_config.json that names its special pieces."""
  s = config.image_size
  pre = dict(image_processor_type="SiglipImageProcessor", processor_class="PaliGemmaProcessor",
             do_resize=True, size=dict(height=s, width=s), resample=3, do_rescale=True,
             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
             do_convert_rgb=True, image_seq_length=config.num_image_tokens)
  with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
    json.dump(pre, f, indent=2)
  if tok is None:
    return
  shutil.copyfile(tok.path, os.path.join(out, TOKENIZER_MODEL))
  piece = tok.sp.IdToPiece
  special = dict(bos_token=piece(tok.bos_id), eos_token=piece(tok.eos_id),
                 pad_token=piece(tok.pad_id), unk_token=piece(tok.sp.unk_id()))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(dict(tokenizer_class="GemmaTokenizer", processor_class="PaliGemmaProcessor",
                   add_bos_token=True, add_eos_token=False, model_max_length=1_000_000,
                   **special), f, indent=2)
  with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
