"""PaliGemma: SigLIP image tokens + Gemma with prefix-LM attention (`img/...`, `llm/...`).

The image tokens, the prefix and the separator attend to each other fully
(mask_ar = 0); the suffix is causal (mask_ar = 1).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from paligemma_jax.model import gemma as gemma_lib
from paligemma_jax.model import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
  vit: vit_lib.ViTConfig = vit_lib.ViTConfig()
  llm: gemma_lib.GemmaConfig = gemma_lib.GemmaConfig()

  @property
  def image_size(self) -> int:
    return self.vit.image_size

  @property
  def num_image_tokens(self) -> int:
    return self.vit.num_tokens


def make_attn_mask(input_mask, mask_ar):
  """Prefix-LM mask. input_mask, mask_ar: (B, T) -> bool (B, T, T) [query, key].

  Key k is visible to query q when cumsum(mask_ar)[k] <= cumsum(mask_ar)[q] and
  both are real tokens.
  """
  cumsum = jnp.cumsum(mask_ar, axis=1)
  visible = cumsum[:, None, :] <= cumsum[:, :, None]
  valid = input_mask[:, None, :] & input_mask[:, :, None]
  return visible & valid


class PaliGemma(nn.Module):
  """scan_layers: True takes big_vision's tree, False the inference tree of
  `layouts.unstacked`, in both towers.

  Training knobs, as big_vision's: llm_dropout and img_dropout (active with `train=True`,
  which needs a "dropout" rng), remat_policy for the layers of both towers.
  """
  config: PaliGemmaConfig
  dtype: jnp.dtype = jnp.float32
  scan_layers: bool = True
  llm_dropout: float = 0.0
  img_dropout: float = 0.0
  remat_policy: str = "none"

  def setup(self):
    self.img = vit_lib.ViT(self.config.vit, self.dtype, self.scan_layers, self.img_dropout,
                           self.remat_policy)
    self.llm = gemma_lib.Gemma(self.config.llm, self.dtype, self.scan_layers, self.llm_dropout,
                               self.remat_policy)

  def embed_image_and_text(self, images, text, train=False):
    """images (B,S,S,3) in [-1,1], text (B,T) -> (B, Ni+T, D). Image tokens are not scaled."""
    zimg = self.img(images, deterministic=not train).astype(self.dtype)
    return jnp.concatenate([zimg, self.llm.embed(text)], axis=1)

  def _full_masks(self, text, input_mask, mask_ar):
    b, ni = text.shape[0], self.config.num_image_tokens
    input_mask = jnp.concatenate([jnp.ones((b, ni), bool), input_mask.astype(bool)], 1)
    mask_ar = jnp.concatenate([jnp.zeros((b, ni), jnp.int32), mask_ar.astype(jnp.int32)], 1)
    return input_mask, mask_ar

  def __call__(self, images, text, mask_ar, input_mask=None, train=False):
    """Teacher-forced: images (B,S,S,3), text, mask_ar (B,T) -> (text logits (B,T,V) float32,
    intermediates): "img/zimg" (B,Ni,D) image embeddings, "llm/pre_logits" (B,Ni+T,D) final-
    normed hidden states of image and text; as big_vision's `(text_logits, out)`.
    """
    if input_mask is None:
      input_mask = jnp.ones(text.shape, bool)
    x = self.embed_image_and_text(images, text, train)
    ni = self.config.num_image_tokens
    out = {"img/zimg": x[:, :ni]}
    input_mask, mask_ar = self._full_masks(text, input_mask, mask_ar)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    hidden, _ = self.llm(x, positions, make_attn_mask(input_mask, mask_ar),
                         deterministic=not train)
    out["llm/pre_logits"] = hidden
    return self.llm.logits(hidden[:, ni:]), out

  def prefill(self, images, text, input_mask, mask_ar, cache):
    """Runs the prompt and fills `cache` from slot 0.

    images (B,S,S,3); text, input_mask, mask_ar (B,T) (right-padded rows);
    cache {"k","v"} (L,B,C,K,H) with C >= Ni+T.
    Returns (logits (B,V) at each row's last real token, cache,
    cache_valid (B,C) bool, last_position (B,) int).
    """
    x = self.embed_image_and_text(images, text)
    input_mask, mask_ar = self._full_masks(text, input_mask, mask_ar)
    positions = jnp.cumsum(input_mask, axis=1) - 1
    seq_len = input_mask.shape[1]
    last = jnp.sum(input_mask, axis=1) - 1  # index of the last real token; equals its position
    # Real tokens are contiguous from 0 (right padding), so the last one sits at `last`.
    hidden_last, cache = self.llm(x, positions, make_attn_mask(input_mask, mask_ar), cache, 0,
                                  keep=last)
    logits = self.llm.logits(hidden_last)[:, 0]
    cache_size = cache["k"].shape[2]
    cache_valid = jnp.pad(input_mask, ((0, 0), (0, cache_size - seq_len)))
    return logits, cache, cache_valid, last

  def extend(self, tokens, positions, cache, cache_valid, write_index):
    """One decode step. tokens, positions (B,); cache_valid (B,C) already marks slot write_index.

    Returns (logits (B,V), cache).
    """
    x = self.llm.embed(tokens[:, None])
    hidden, cache = self.llm(x, positions[:, None], cache_valid[:, None, :], cache, write_index)
    return self.llm.logits(hidden)[:, 0], cache


def _init(config: PaliGemmaConfig, seed: int):
  s = config.image_size
  return PaliGemma(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, s, s, 3)),
                                jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32))["params"]


def abstract_params(config: PaliGemmaConfig):
  """Shapes and dtypes of a freshly initialised parameter tree, nothing allocated."""
  return jax.eval_shape(lambda: _init(config, 0))


# Fan-in axes per parameter name (after the leading depth axis of scanned layers).
_FAN_IN = {"embedding/kernel": (0, 1, 2), "query/kernel": (1,), "key/kernel": (1,),
           "value/kernel": (1,), "out/kernel": (1, 2), "Dense_0/kernel": (1,),
           "Dense_1/kernel": (1,), "head/kernel": (0,), "input_embedding": (1,),
           "q_einsum/w": (2,), "kv_einsum/w": (3,), "qkv_einsum/w": (3,),
           "attn_vec_einsum/w": (1, 2), "gating_einsum": (2,), "linear": (1,)}


def posemb_sincos_2d(side: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """(1, side*side, width) fixed 2D sin-cos position codes (as MAE and big_vision's
  `posemb="sincos2d"`): a quarter of the width each for sin and cos of the row and the column
  at geometric frequencies. A from-scratch ViT knows where each patch is from the first step."""
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y, x = np.mgrid[0:side, 0:side]
  ay, ax = np.outer(y.ravel(), omega), np.outer(x.ravel(), omega)
  pe = np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], axis=1)
  return np.pad(pe, ((0, 0), (0, width - pe.shape[1])))[None].astype(np.float32)


def init_params(config: PaliGemmaConfig, seed: int = 0, posemb: str = "normal"):
  """Random float32 parameters in the big_vision tree, drawn with numpy (no compile).

  posemb: "normal" draws the ViT's position embedding as N(0, 0.02^2); "sincos2d" starts it
  from `posemb_sincos_2d` (it is still trained), which training from scratch needs to learn
  where things are in reasonable time.

  Weights ~ N(0, 1/fan_in) (the embedding N(0, 1/D^2)); LayerNorm scales 1, RMSNorm scales and biases 0.
  For the embedded demo and tests: random weights answer noise.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, leaf in traverse_util.flatten_dict(abstract_params(config), sep="/").items():
    shape = leaf.shape
    suffix = next((s for s in _FAN_IN if key.endswith(s)), None)
    if suffix is not None:
      fan_in = np.prod([shape[a] for a in _FAN_IN[suffix]])
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
      if suffix == "input_embedding":  # small, so the tied head does not just echo the input
        value /= np.sqrt(shape[1])
    elif key.endswith("pos_embedding"):
      value = 0.02 * rng.standard_normal(shape)
      if posemb == "sincos2d":
        value = posemb_sincos_2d(config.image_size // config.vit.patch, shape[-1])
    elif key.endswith("scale") and key.startswith("img/"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    flat[key] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat, sep="/")
