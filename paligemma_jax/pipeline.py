"""The Python API: load a checkpoint and a tokenizer, then answer prompts about images.

    pipe = PaliGemmaPipeline.from_files("pt_224.npz", "paligemma_tokenizer.model")
    [result] = pipe.generate([image], ["caption en"], max_decode_len=32)
    print(result.text, result.tokens, result.timing)
"""
import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_jax import checkpoint, decode, image as image_lib, paligemma
from paligemma_jax.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name):
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
  return DTYPES[name]


@dataclasses.dataclass
class Generation:
  prompt: str
  text: str
  tokens: list        # generated ids, prompt excluded, stopping before eos
  logprobs: list      # log p of each token under the model
  timing: dict


def _block(tree):
  return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


class PaliGemmaPipeline:
  """A loaded model plus its compiled prefill/decode functions (cached per shape)."""

  def __init__(self, config: paligemma.PaliGemmaConfig, params, tokenizer: Tokenizer, *,
               dtype="float32", cache_dtype="bfloat16", prompt_bucket: int = 16,
               load_s: float = 0.0):
    if tokenizer.vocab_size > config.llm.vocab_size:
      raise ValueError(
          f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
          f"embedding has only {config.llm.vocab_size} rows")
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.dtype = as_dtype(dtype)
    self.cache_dtype = as_dtype(cache_dtype)
    self.prompt_bucket = prompt_bucket
    self.load_s = load_s
    self.model = paligemma.PaliGemma(config, self.dtype)
    self._compiled = {}

  @classmethod
  def from_files(cls, ckpt: str, tokenizer: str, *, dtype="float32", overrides=None, **kw):
    t0 = time.perf_counter()
    loaded = checkpoint.load_npz(ckpt, dtype=as_dtype(dtype), overrides=overrides)
    _block(loaded.params)
    load_s = time.perf_counter() - t0
    return cls(loaded.config, loaded.params, Tokenizer(tokenizer), dtype=dtype, load_s=load_s, **kw)

  # -------------------------------------------------------------------------

  def make_batch(self, images: Sequence, prompts: Sequence[str], answer_start=None):
    """-> dict of host arrays: images (B,S,S,3), text/input_mask/mask_ar (B,T_bucket)."""
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    size = self.config.image_size
    pixels = np.stack([image_lib.preprocess(im, size) for im in images])
    rows = [self.tokenizer.prompt(p, answer_start) for p in prompts]
    longest = max(len(t) for t, _ in rows)
    width = -(-longest // self.prompt_bucket) * self.prompt_bucket
    text = np.full((len(rows), width), self.tokenizer.pad_id, np.int32)
    input_mask = np.zeros((len(rows), width), bool)
    mask_ar = np.ones((len(rows), width), np.int32)  # padding counts as suffix, as big_vision
    for i, (t, m) in enumerate(rows):
      text[i, :len(t)], input_mask[i, :len(t)], mask_ar[i, :len(t)] = t, True, m
    return dict(images=pixels, text=text, input_mask=input_mask, mask_ar=mask_ar)

  def _functions(self, batch: int, width: int, max_decode_len: int, sampler: decode.Sampler,
                 forbidden_ids: tuple):
    key = (batch, width, max_decode_len, sampler, forbidden_ids)
    if key in self._compiled:
      return self._compiled[key] + (0.0,)
    t0 = time.perf_counter()
    prompt_len = self.config.num_image_tokens + width
    cache_size = prompt_len + max_decode_len
    s = self.config.image_size
    prefill = decode.jit_prefill(self.model, cache_size=cache_size, cache_dtype=self.cache_dtype)
    prefill = prefill.lower(
        self.params, jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch, width), jnp.int32),
        jax.ShapeDtypeStruct((batch, width), bool),
        jax.ShapeDtypeStruct((batch, width), jnp.int32)).compile()
    logits, cache, cache_valid, last = prefill.out_info
    dec = decode.jit_decode(self.model, prompt_len=prompt_len, max_decode_len=max_decode_len,
                            sampler=sampler, eos_id=self.tokenizer.eos_id,
                            pad_id=self.tokenizer.pad_id, forbidden_ids=forbidden_ids or None,
                            vocab_limit=self.tokenizer.vocab_size)
    dec = dec.lower(self.params, logits, cache, cache_valid, last, jax.random.PRNGKey(0)).compile()
    self._compiled[key] = (prefill, dec)
    return prefill, dec, time.perf_counter() - t0

  def generate(self, images: Sequence, prompts: Sequence[str], *, max_decode_len: int = 32,
               sampler="greedy", seed: int = 0, answer_start: Optional[str] = None,
               forbidden_ids: Sequence[int] = ()) -> list:
    """Images (PIL or uint8 (H,W,3)) and prompts, one per row -> one Generation per row."""
    if max_decode_len < 1:
      raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}")
    if isinstance(sampler, str):
      sampler = decode.parse_sampler(sampler)
    batch = self.make_batch(images, prompts, answer_start)
    b, width = batch["text"].shape
    prefill, dec, compile_s = self._functions(b, width, max_decode_len, sampler,
                                              tuple(sorted(int(i) for i in forbidden_ids)))
    t0 = time.perf_counter()
    logits, cache, cache_valid, last = _block(prefill(
        self.params, batch["images"], batch["text"], batch["input_mask"], batch["mask_ar"]))
    t1 = time.perf_counter()
    state = _block(dec(self.params, logits, cache, cache_valid, last, jax.random.PRNGKey(seed)))
    t2 = time.perf_counter()
    tokens, logprobs = np.asarray(state.tokens), np.asarray(state.logprobs)
    lengths = np.asarray(decode.answer_lengths(tokens, self.tokenizer.eos_id))
    generated = int(lengths.sum())
    timing = dict(load_s=self.load_s, compile_s=compile_s, prefill_s=t1 - t0, decode_s=t2 - t1,
                  generated_tokens=generated, decode_steps=int(state.step))
    out = []
    for i, prompt in enumerate(prompts):
      ids = tokens[i, :lengths[i]].tolist()
      out.append(Generation(prompt, self.tokenizer.decode(ids), ids,
                            logprobs[i, :lengths[i]].tolist(), timing))
    return out
