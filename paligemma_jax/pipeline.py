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

from paligemma_jax.sample import beam_search, decode
from paligemma_jax.ckpt import checkpoint
from paligemma_jax.data import image as image_lib
from paligemma_jax.model import layouts, paligemma
from paligemma_jax import backends, sharding
from paligemma_jax.options import as_dtype, check_decoding_options, check_integer
from paligemma_jax.data.tokenizer import Tokenizer

class NonFiniteError(ValueError):
  """The model computed NaN or infinite logits: damaged weights, or a float16 overflow."""


def check_inputs(images, prompts, answer_start=None):
  """ValueError unless images and prompts are equally long, non-empty lists (one image and
  one string per row) and answer_start is None or a string. The images themselves are
  checked by `image.as_rgb_array`."""
  for name, value in (("images", images), ("prompts", prompts)):
    listed = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if not (listed or name == "images" and isinstance(value, np.ndarray) and value.ndim == 4):
      shown = f" {value!r}" if isinstance(value, (str, bytes)) else ""
      raise ValueError(f"{name} must be a list, one per row; got {type(value).__name__}{shown}")
  if not len(images) or not len(prompts):
    raise ValueError(f"no images or no prompts ({len(images)} images, {len(prompts)} prompts): "
                     "generate needs at least one (image, prompt) pair")
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"prompt {i} must be a string, got {type(p).__name__} {p!r}")
  if answer_start is not None and not isinstance(answer_start, str):
    raise ValueError(f"answer_start must be a string or None, got {type(answer_start).__name__}")


@dataclasses.dataclass
class Generation:
  """One row's answer. With a forced `answer_start`, `text` is the model's whole answer (the
  forced start followed by what it generated, detokenized together) while `tokens` and
  `logprobs` cover the generated ids only."""
  prompt: str
  text: str
  tokens: list        # generated ids, prompt and forced answer start excluded, stopping before eos
  logprobs: list      # log p of each token under the model
  timing: dict


def _block(tree):
  return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


class PaliGemmaPipeline:
  """A loaded model plus its compiled prefill/decode functions (cached per shape)."""

  def __init__(self, config: paligemma.PaliGemmaConfig, params, tokenizer: Tokenizer, *,
               dtype="float32", cache_dtype="bfloat16", prompt_bucket: int = 16,
               max_seq_len: int = 8192, load_s: float = 0.0, mesh=None, backend=None,
               consume: bool = False):
    """params: big_vision's tree, or the inference tree of `backend`'s layout already.
    backend: a `backends.select` result (default: selected here from `mesh`).
    consume: the caller holds no other reference to params' arrays, so each stacked array is
    dropped as soon as it is split (one extra array alive at a time)."""
    if tokenizer.vocab_size > config.llm.vocab_size:
      raise ValueError(
          f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
          f"embedding has only {config.llm.vocab_size} rows")
    self.config = config
    self.mesh = mesh  # jax.sharding.Mesh ('data', 'model') or None (one device)
    if prompt_bucket < 1:
      raise ValueError(f"prompt_bucket must be >= 1, got {prompt_bucket}")
    self.dtype = as_dtype(dtype)
    # The speed path and the weight layout it reads, chosen once from where the parameters
    # live; the inference tree has its layers split (`layouts.unstacked`), and
    # `layouts.stacked` gives big_vision's back.
    self.backend = backend or backends.select(mesh, bfloat16=any(
        x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params)))
    params = layouts.unstacked(params, consume=consume, out_major=self.backend.out_major)
    self.params = _block(params if mesh is None else sharding.shard_params(params, mesh))
    self.tokenizer = tokenizer
    self.cache_dtype = as_dtype(cache_dtype, "cache_dtype")
    self.prompt_bucket = prompt_bucket
    self.max_seq_len = max_seq_len
    self.load_s = load_s
    self.model = paligemma.PaliGemma(config, self.dtype, scan_layers=False)
    self._compiled = {}

  @classmethod
  def from_files(cls, ckpt: str, tokenizer: str, *, dtype="float32", overrides=None, **kw):
    """ckpt: a big_vision `.npz`, an Orbax checkpoint directory (see `orbax_io.load`) or a
    transformers PaliGemma directory (`hf_checkpoint.load_hf`; tokenizer=None takes its
    `tokenizer.model`); with `mesh=` each array is placed on the mesh already sharded.

    An `.npz` on one device goes straight into the inference tree, layer by layer off the
    memory map; otherwise each stacked array is split after loading (one extra array alive
    at a time)."""
    from paligemma_jax.ckpt import hf_checkpoint, orbax_io
    t0 = time.perf_counter()
    one_device = kw.get("mesh") is None
    require_commit_marker = kw.pop("require_commit_marker", True)
    tokenizer = tokenizer or hf_checkpoint.tokenizer_file(ckpt)  # an HF directory's own
    backend = kw.pop("backend", None) or backends.select(
        kw.get("mesh"), bfloat16=as_dtype(dtype) == jnp.bfloat16)
    if one_device and hf_checkpoint.is_hf_dir(ckpt):  # mapped and split layer by layer as read
      loaded = hf_checkpoint.load_hf(ckpt, dtype=as_dtype(dtype), overrides=overrides,
                                     unstack=True, out_major=backend.out_major)
    elif one_device and not orbax_io.is_orbax_path(ckpt):  # split layer by layer off the mmap
      loaded = checkpoint.load_npz(ckpt, dtype=as_dtype(dtype), overrides=overrides,
                                   unstack=True, out_major=backend.out_major)
    else:
      loaded = orbax_io.load(ckpt, dtype=as_dtype(dtype), overrides=overrides, mesh=kw.get("mesh"),
                             require_commit_marker=require_commit_marker)
    return cls.from_loaded(loaded, Tokenizer(tokenizer), dtype=dtype, t0=t0, backend=backend,
                           **kw)

  @classmethod
  def from_loaded(cls, loaded: checkpoint.Loaded, tokenizer: Tokenizer, *, t0=None, **kw):
    """A pipeline that takes over `loaded` (a checkpoint.Loaded): its stacked layers are split
    one array at a time and dropped from it. t0: perf_counter() when loading began."""
    pipe = cls(loaded.config, loaded.params, tokenizer, consume=True, **kw)
    pipe.load_s = 0.0 if t0 is None else time.perf_counter() - t0
    return pipe

  # -------------------------------------------------------------------------

  def make_batch(self, images: Sequence, prompts: Sequence[str], answer_start=None):
    """-> dict of host arrays: images (B,S,S,3), text/input_mask/mask_ar (B,T_bucket)."""
    check_inputs(images, prompts, answer_start)
    return self._batch(self._pixels(images),
                       [self.tokenizer.prompt(p, answer_start) for p in prompts])

  def _pixels(self, images) -> list:
    return [image_lib.preprocess(im, self.config.image_size) for im in images]

  def _batch(self, pixels: list, rows: list) -> dict:
    """Preprocessed images and tokenized prompts ((tokens, mask_ar), `tokenizer.prompt`), one
    of each per row -> `make_batch`'s arrays."""
    width = self.padded_length(max(len(t) for t, _ in rows))
    text = np.full((len(rows), width), self.tokenizer.pad_id, np.int32)
    input_mask = np.zeros((len(rows), width), bool)
    mask_ar = np.ones((len(rows), width), np.int32)  # padding counts as suffix, as big_vision
    for i, (t, m) in enumerate(rows):
      text[i, :len(t)], input_mask[i, :len(t)], mask_ar[i, :len(t)] = t, True, m
    return dict(images=np.stack(pixels), text=text, input_mask=input_mask, mask_ar=mask_ar)

  def logits(self, pixels, text, mask_ar, input_mask=None):
    """Teacher-forced float32 text logits (B, T, V) of the loaded model: pixels (B, S, S, 3)
    as `make_batch` gives them, text and mask_ar (B, T) (see `tokenizer.prompt`)."""
    with self.backend.install():
      return self.model.apply({"params": self.params}, pixels, text, mask_ar, input_mask)[0]

  def padded_length(self, prompt_tokens: int) -> int:
    """The prompt width the compiled functions use: a multiple of prompt_bucket."""
    return -(-prompt_tokens // self.prompt_bucket) * self.prompt_bucket

  def check_request(self, prompt_tokens: int, max_decode_len: int):
    """Raises ValueError, before any compilation, when a request cannot fit.

    The cache holds the image tokens, the longest prompt padded to its bucket (the width
    that is compiled) and max_decode_len slots.
    """
    check_integer(max_decode_len, "max_decode_len", 1)
    padded = self.padded_length(prompt_tokens)
    total = self.config.num_image_tokens + padded + max_decode_len
    if self.max_seq_len and total > self.max_seq_len:
      raise ValueError(
          f"{self.config.num_image_tokens} image tokens + {prompt_tokens} prompt tokens "
          f"(padded to {padded}, a multiple of prompt_bucket {self.prompt_bucket}) + "
          f"max_decode_len {max_decode_len} = {total} exceeds the configured cache of "
          f"{self.max_seq_len} tokens (config max_seq_len)")

  def check_decoding(self, sampler="greedy", *, beam_size: int = 0, best_of_n: int = 1,
                     stream: bool = False, forbidden_ids=()):
    """`check_decoding_options` plus the checks against this model's vocabulary, all before
    any compilation -> (Sampler, sorted forbidden ids). Raises ValueError."""
    sampler, forbidden = check_decoding_options(sampler, beam_size=beam_size,
                                                best_of_n=best_of_n, stream=stream,
                                                forbidden_ids=forbidden_ids)
    vocab = self.config.llm.vocab_size
    if forbidden and forbidden[-1] >= vocab:
      raise ValueError(f"forbidden_ids: {forbidden[-1]} is not a token id of this model; "
                       f"expected 0 <= id < {vocab} (its vocabulary size)")
    # Ids the tokenizer has no piece for are never generated (decode's vocab_limit).
    pieces = self.tokenizer.vocab_size
    n_forbidden = sum(i < pieces for i in forbidden)
    allowed = pieces - n_forbidden
    where = (f"the {allowed} token ids left to generate ({pieces} tokenizer pieces, "
             f"{n_forbidden} forbidden)")
    if allowed < 1:
      raise ValueError(f"forbidden_ids forbid every id: no token is left to generate "
                       f"({pieces} tokenizer pieces, {n_forbidden} forbidden)")
    if sampler.kind == "topk" and sampler.k > allowed:
      raise ValueError(f"sampler {sampler}: k={sampler.k} exceeds {where}")
    if beam_size > allowed:
      raise ValueError(f"beam_size={beam_size} exceeds {where}")
    return sampler, forbidden

  def _check_finite(self, logprobs, ends, prompts, n):
    """NonFiniteError if a generated token's log-probability (up to `ends`, eos included) is
    NaN or inf: NaN or inf logits, which answer garbage (an empty string) rather than fail."""
    bad = ~np.isfinite(logprobs) & (np.arange(logprobs.shape[1]) < ends[:, None])
    if bad.any():
      row, step = np.argwhere(bad)[0]
      overflow = (" or the activations overflowed float16 (try dtype='bfloat16')"
                  if self.dtype == jnp.float16 else "")
      raise NonFiniteError(
          f"the model's logits are not finite: the log-probability of generated token {step} "
          f"for row {row // n} (prompt {prompts[row // n]!r}) is {logprobs[row, step]}; the "
          f"weights are likely damaged (NaN or inf in the checkpoint){overflow}")

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
    with self.backend.install():  # the model is traced while lowering
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
    """Images and prompts, one per row -> one Generation per row.

    images: paths, PIL images, uint8 (H, W, 3) arrays or float arrays in [0, 1] (see
    `image.as_rgb_array`: each gives the pixels `image.load_image` gives from a file).

    sampler: "greedy", "temperature(t)", "topk(k, t)", "nucleus(p, t)" (or a Sampler); the
    arguments may be named as big_vision names them: "nucleus(p=0.9, t=0.7)".
    answer_start: forced start of every answer; each Generation's text begins with it,
    its tokens and logprobs are the generated ones after it.
    forbidden_ids: token ids never generated (each 0 <= id < the model's vocabulary).
    beam_size > 0: beam search instead of sampling (greedy sampler only). best_of_n > 1:
    draw n samples per row and keep the one with the highest log-probability up to and
    including eos (not with streaming).
    on_token(tokens (B,), done (B,)): called from the device loop as each step is sampled
    (streaming; one host round trip per token, so only when asked).
    Bad options and requests that do not fit raise ValueError before anything compiles.
    """
    check_inputs(images, prompts, answer_start)
    sampler, forbidden = self.check_decoding(
        sampler, beam_size=beam_size, best_of_n=best_of_n, stream=on_token is not None,
        forbidden_ids=forbidden_ids)
    rng = decode.seed_key(seed)
    rows = [self.tokenizer.prompt(p, answer_start) for p in prompts]  # once per request
    self.check_request(max(len(t) for t, _ in rows), max_decode_len)
    n = best_of_n
    pixels = self._pixels(images)
    batch = self._batch([x for x in pixels for _ in range(n)], [r for r in rows for _ in range(n)])
    b, width = batch["text"].shape
    strategy = ("beam", beam_size) if beam_size else ("sample", sampler)
    prefill, dec, compile_s = self._functions(b, width, max_decode_len, strategy, forbidden,
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
      state = _block(dec(self.params, logits, cache, cache_valid, last, rng))
      tokens, logprobs = state.tokens, state.logprobs
    t2 = time.perf_counter()
    tokens, logprobs = sharding.to_host(tokens), sharding.to_host(logprobs)
    lengths = np.asarray(decode.answer_lengths(tokens, self.tokenizer.eos_id))
    ends = np.minimum(lengths + 1, tokens.shape[1])
    self._check_finite(logprobs, ends, prompts, n)
    if n > 1:  # keep, per prompt, the sample with the highest log-probability up to eos
      totals = np.array([logprobs[i, :ends[i]].sum() for i in range(b)]).reshape(-1, n)
      keep = np.arange(len(prompts)) * n + totals.argmax(1)
      tokens, logprobs, lengths = tokens[keep], logprobs[keep], lengths[keep]
    timing = dict(load_s=self.load_s, compile_s=compile_s, prefill_s=t1 - t0, decode_s=t2 - t1,
                  generated_tokens=int(lengths.sum()), decode_steps=int(state.step))
    start = self.tokenizer.encode(answer_start) if answer_start else []
    out = []
    for i, prompt in enumerate(prompts):
      ids = tokens[i, :lengths[i]].tolist()
      out.append(Generation(prompt, self.tokenizer.decode(start + ids), ids,
                            logprobs[i, :lengths[i]].tolist(), timing))
    return out
