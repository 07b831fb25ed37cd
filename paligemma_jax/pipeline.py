"""The Python API: load a checkpoint and a tokenizer, then answer prompts about images.

    pipe = PaliGemmaPipeline.from_files("pt_224.npz", "paligemma_tokenizer.model")
    [result] = pipe.generate([image], ["caption en"], max_decode_len=32)
    print(result.text, result.tokens, result.timing)
"""
import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from paligemma_jax import beam_search, checkpoint, decode, image as image_lib, paligemma
from paligemma_jax import sharding
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
               max_seq_len: int = 8192, load_s: float = 0.0, mesh=None):
    if tokenizer.vocab_size > config.llm.vocab_size:
      raise ValueError(
          f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
          f"embedding has only {config.llm.vocab_size} rows")
    self.config = config
    self.mesh = mesh  # jax.sharding.Mesh ('data', 'model') or None (one device)
    # The inference tree (`paligemma.unstacked`); `paligemma.stacked` gives big_vision's back.
    # One device: layer weights out-major, the layout XLA's CPU dot reads fastest at few
    # rows. A mesh keeps the stored layout, the one `sharding.RULES` and
    # `sharding.weight_stationary` describe.
    self.out_major = mesh is None
    params = paligemma.unstacked(params, out_major=self.out_major)
    self.params = params if mesh is None else sharding.shard_params(params, mesh)
    self.tokenizer = tokenizer
    self.dtype = as_dtype(dtype)
    self.cache_dtype = as_dtype(cache_dtype)
    self.prompt_bucket = prompt_bucket
    self.max_seq_len = max_seq_len
    self.load_s = load_s
    self.model = paligemma.PaliGemma(config, self.dtype, scan_layers=False,
                                     out_major=self.out_major)
    self._compiled = {}

  @classmethod
  def from_files(cls, ckpt: str, tokenizer: str, *, dtype="float32", overrides=None, **kw):
    """ckpt: a big_vision `.npz` or an Orbax checkpoint directory (see `orbax_io.load`);
    with `mesh=` each array is placed on the mesh already sharded.

    An `.npz` on one device goes straight into the inference tree, layer by layer off the
    memory map; otherwise each stacked array is split after loading (one extra array alive
    at a time)."""
    from paligemma_jax import orbax_io
    t0 = time.perf_counter()
    one_device = kw.get("mesh") is None
    require_commit_marker = kw.pop("require_commit_marker", True)
    if one_device and not orbax_io.is_orbax_path(ckpt):  # split layer by layer off the mmap
      loaded = checkpoint.load_npz(ckpt, dtype=as_dtype(dtype), overrides=overrides,
                                   unstack=True, out_major=True)
    else:
      loaded = orbax_io.load(ckpt, dtype=as_dtype(dtype), overrides=overrides, mesh=kw.get("mesh"),
                             require_commit_marker=require_commit_marker)
    return cls.from_loaded(loaded, Tokenizer(tokenizer), dtype=dtype, t0=t0, **kw)

  @classmethod
  def from_loaded(cls, loaded: checkpoint.Loaded, tokenizer: Tokenizer, *, t0=None, **kw):
    """A pipeline that takes over `loaded` (a checkpoint.Loaded): its stacked layers are split
    one array at a time and dropped from it. t0: perf_counter() when loading began."""
    params = paligemma.unstacked(loaded.params, consume=True, out_major=kw.get("mesh") is None)
    _block(params)
    load_s = 0.0 if t0 is None else time.perf_counter() - t0
    return cls(loaded.config, params, tokenizer, load_s=load_s, **kw)

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

  def check_request(self, prompt_tokens: int, max_decode_len: int):
    """Raises ValueError, before any compilation, when a request cannot fit."""
    if max_decode_len < 1:
      raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}")
    total = self.config.num_image_tokens + prompt_tokens + max_decode_len
    if self.max_seq_len and total > self.max_seq_len:
      raise ValueError(
          f"{self.config.num_image_tokens} image tokens + {prompt_tokens} prompt tokens + "
          f"max_decode_len {max_decode_len} = {total} exceeds the configured cache of "
          f"{self.max_seq_len} tokens (config max_seq_len)")

  def _functions(self, batch: int, width: int, max_decode_len: int, strategy: tuple,
                 forbidden_ids: tuple, stream=None):
    """Compiled (prefill, decode) for one shape and strategy, plus seconds spent compiling.

    strategy: ("sample", Sampler) or ("beam", beam_size).
    """
    key = (batch, width, max_decode_len, strategy, forbidden_ids, stream)
    if key in self._compiled:
      return self._compiled[key] + (0.0,)
    t0 = time.perf_counter()
    prompt_len = self.config.num_image_tokens + width
    cache_size = prompt_len + max_decode_len
    s = self.config.image_size
    prefill = decode.jit_prefill(self.model, cache_size=cache_size, cache_dtype=self.cache_dtype,
                                 mesh=self.mesh)
    rows = None if self.mesh is None else sharding.batch_sharding(batch, self.mesh)
    prefill = prefill.lower(
        self.params, jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((batch, width), bool, sharding=rows),
        jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=rows)).compile()
    logits, cache, cache_valid, last = prefill.out_info
    common = dict(prompt_len=prompt_len, max_decode_len=max_decode_len,
                  eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                  forbidden_ids=forbidden_ids or None, vocab_limit=self.tokenizer.vocab_size)
    if strategy[0] == "beam":
      dec = jax.jit(functools.partial(beam_search.beam_search, self.model, beam_size=strategy[1],
                                      **common))
      dec = dec.lower(self.params, logits, cache, cache_valid, last).compile()
    else:
      dec = decode.jit_decode(self.model, sampler=strategy[1], stream=stream, mesh=self.mesh,
                              **common)
      dec = dec.lower(self.params, logits, cache, cache_valid, last,
                      jax.random.PRNGKey(0)).compile()
    self._compiled[key] = (prefill, dec)
    return prefill, dec, time.perf_counter() - t0

  def generate(self, images: Sequence, prompts: Sequence[str], *, max_decode_len: int = 32,
               sampler="greedy", seed: int = 0, answer_start: Optional[str] = None,
               forbidden_ids: Sequence[int] = (), beam_size: int = 0, best_of_n: int = 1,
               on_token: Optional[Callable[[np.ndarray, np.ndarray], None]] = None) -> list:
    """Images (PIL or uint8 (H,W,3)) and prompts, one per row -> one Generation per row.

    sampler: "greedy", "temperature(t)", "topk(k, t)", "nucleus(p, t)" (or a Sampler).
    beam_size > 0: beam search instead of sampling. best_of_n > 1: draw n samples per row
    and keep the one with the highest log-probability up to and including eos.
    on_token(tokens (B,), done (B,)): called from the device loop as each step is sampled
    (streaming; one host round trip per token, so only when asked).
    """
    if isinstance(sampler, str):
      sampler = decode.parse_sampler(sampler)
    if beam_size < 0 or best_of_n < 1:
      raise ValueError(f"beam_size must be >= 0 and best_of_n >= 1, got {beam_size}, {best_of_n}")
    if beam_size and (best_of_n > 1 or on_token is not None):
      raise ValueError("beam search combines with neither best_of_n nor streaming")
    if len(images) != len(prompts):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    longest = max(len(self.tokenizer.prompt(p, answer_start)[0]) for p in prompts)
    self.check_request(longest, max_decode_len)
    n = best_of_n
    batch = self.make_batch([im for im in images for _ in range(n)],
                            [p for p in prompts for _ in range(n)], answer_start)
    b, width = batch["text"].shape
    strategy = ("beam", beam_size) if beam_size else ("sample", sampler)
    prefill, dec, compile_s = self._functions(
        b, width, max_decode_len, strategy, tuple(sorted(int(i) for i in forbidden_ids)),
        on_token)
    if self.mesh is not None:  # rows over 'data'; each process fills its own devices
      rows = sharding.batch_sharding(b, self.mesh)
      batch = {k: sharding.put_global(v, rows) for k, v in batch.items()}
    t0 = time.perf_counter()
    logits, cache, cache_valid, last = _block(prefill(
        self.params, batch["images"], batch["text"], batch["input_mask"], batch["mask_ar"]))
    t1 = time.perf_counter()
    if beam_size:
      state = _block(dec(self.params, logits, cache, cache_valid, last))
      tokens, logprobs, _ = beam_search.best_beam(state)
    else:
      state = _block(dec(self.params, logits, cache, cache_valid, last, jax.random.PRNGKey(seed)))
      tokens, logprobs = state.tokens, state.logprobs
    t2 = time.perf_counter()
    tokens, logprobs = sharding.to_host(tokens), sharding.to_host(logprobs)
    lengths = np.asarray(decode.answer_lengths(tokens, self.tokenizer.eos_id))
    if n > 1:  # keep, per prompt, the sample with the highest log-probability up to eos
      ends = np.minimum(lengths + 1, tokens.shape[1])
      totals = np.array([logprobs[i, :ends[i]].sum() for i in range(b)]).reshape(-1, n)
      keep = np.arange(len(prompts)) * n + totals.argmax(1)
      tokens, logprobs, lengths = tokens[keep], logprobs[keep], lengths[keep]
    timing = dict(load_s=self.load_s, compile_s=compile_s, prefill_s=t1 - t0, decode_s=t2 - t1,
                  generated_tokens=int(lengths.sum()), decode_steps=int(state.step))
    out = []
    for i, prompt in enumerate(prompts):
      ids = tokens[i, :lengths[i]].tolist()
      out.append(Generation(prompt, self.tokenizer.decode(ids), ids,
                            logprobs[i, :lengths[i]].tolist(), timing))
    return out
