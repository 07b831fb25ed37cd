"""Prefill + one `jax.lax.while_loop` decode over a preallocated KV cache.

Rows of a batch are right-padded prompts. The prefill writes image + prompt
into cache slots [0, P); generated token i of every row goes to slot P + i, so
the rows share one write index while each row keeps its own positions and a
validity mask over slots: padding is never attended. No host sync per token.
"""
import contextlib
import dataclasses
import functools
import math
import numbers
import re
from typing import Callable, Optional

import flax
import jax
import jax.numpy as jnp

from paligemma_jax import sharding
from paligemma_jax.model import gemma
from paligemma_jax.model.paligemma import PaliGemma


# ---------------------------------------------------------------------------
# Samplers, named as big_vision names them.

@dataclasses.dataclass(frozen=True)
class Sampler:
  kind: str = "greedy"  # greedy | temperature | topk | nucleus
  t: float = 1.0
  k: int = 0
  p: float = 1.0

  def __str__(self):
    if self.kind == "greedy":
      return "greedy"
    if self.kind == "temperature":
      return f"temperature({self.t:g})"
    if self.kind == "topk":
      return f"topk({self.k}, {self.t:g})"
    return f"nucleus({self.p:g}, {self.t:g})"


# Parameter names in call order, as big_vision's sampler strings name them.
SAMPLER_PARAMS = {"greedy": (), "temperature": ("t",), "topk": ("k", "t"), "nucleus": ("p", "t")}


def _sampler_args(spec: str, name: str, args: list) -> dict:
  """['0.9', 't=2'] -> {'p': 0.9, 't': 2.0} for `name`: positional then keyword, finite."""
  params = SAMPLER_PARAMS[name]
  arity = f"{min(len(params), 1)}..{len(params)}"
  values, named = {}, False
  for i, arg in enumerate(args):
    if "=" in arg:
      key, _, text = (s.strip() for s in arg.partition("="))
      named = True
      if key not in params:
        raise ValueError(f"sampler {spec!r}: {name} has no argument {key!r}; its arguments: "
                         f"({', '.join(params)})")
    elif named:
      raise ValueError(f"sampler {spec!r}: positional argument {arg!r} after a named one")
    elif i >= len(params):
      raise ValueError(f"sampler {spec!r}: {name} takes {arity} arguments, got {len(args)}")
    else:
      key, text = params[i], arg
    if key in values:
      raise ValueError(f"sampler {spec!r}: {key} given twice")
    try:
      values[key] = float(text)
    except ValueError:
      raise ValueError(f"sampler {spec!r}: arguments must be numbers, got {text!r}") from None
    if not math.isfinite(values[key]):
      raise ValueError(f"sampler {spec!r}: {key} must be a finite number, got {text!r}")
  if params and params[0] not in values:
    raise ValueError(f"sampler {spec!r}: {name} takes {arity} arguments and needs "
                     f"{params[0]}, got {len(args)}")
  return values


def parse_sampler(spec: str) -> Sampler:
  """'greedy' | 'temperature(t)' | 'topk(k[, t])' | 'nucleus(p[, t])' -> Sampler (validated).

  Arguments may also be named, as big_vision writes them: 'nucleus(p=0.9)', 'topk(k=40, t=0.7)'.
  """
  m = re.fullmatch(r"\s*(\w+)\s*(?:\(([^)]*)\))?\s*", spec or "")
  if not m:
    raise ValueError(f"cannot parse sampler {spec!r}; use greedy, temperature(t), topk(k, t) "
                     "or nucleus(p, t)")
  name, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
  if name not in SAMPLER_PARAMS:
    raise ValueError(f"unknown sampler {name!r} in {spec!r}; known: {', '.join(SAMPLER_PARAMS)}")
  values = _sampler_args(spec, name, args)
  t = values.get("t", 1.0)
  if name == "greedy":
    return Sampler()
  if name == "temperature":
    s = Sampler("temperature", t=t)
  elif name == "topk":
    k = values["k"]
    if k < 1 or k != int(k):
      raise ValueError(f"sampler {spec!r}: k must be an integer >= 1, got {k:g}")
    s = Sampler("topk", k=int(k), t=t)
  else:
    if not 0 < values["p"] <= 1:
      raise ValueError(f"sampler {spec!r}: p must be in (0, 1], got {values['p']:g}")
    s = Sampler("nucleus", p=values["p"], t=t)
  if s.t <= 0:
    raise ValueError(f"sampler {spec!r}: temperature must be > 0, got {s.t:g}")
  return s


ARGMAX_BLOCK = 1024


def argmax(logits):
  """(B, V) -> (B,) int32, the first index of the maximum, as jnp.argmax.

  In two stages (the first maximum of each block of the vocabulary, then the first block
  whose maximum is largest): on XLA's CPU backend a flat argmax over a 257k vocabulary takes
  ~1.1 ms, this ~0.6 ms. Both stages are argmaxes, so ties and NaN resolve as jnp.argmax's.
  """
  b, v = logits.shape
  padded = jnp.pad(logits, ((0, 0), (0, -v % ARGMAX_BLOCK)), constant_values=-jnp.inf)
  blocks = padded.reshape(b, -1, ARGMAX_BLOCK)
  inside = jnp.argmax(blocks, -1)  # (B, V / block)
  block = jnp.argmax(jnp.take_along_axis(blocks, inside[..., None], -1)[..., 0], -1)
  return (block * ARGMAX_BLOCK + jnp.take_along_axis(inside, block[:, None], 1)[:, 0]
          ).astype(jnp.int32)


def sample(sampler: Sampler, logits, rng):
  """logits (B, V) float32 -> token ids (B,)."""
  if sampler.kind == "greedy":
    return argmax(logits)
  logits = logits / sampler.t
  if sampler.kind == "topk":
    values, indices = jax.lax.top_k(logits, sampler.k)
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  if sampler.kind == "nucleus":
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The smallest top set whose mass reaches p: keep while the mass before it is < p.
    keep = mass_before < sampler.p
    threshold = jnp.min(jnp.where(keep, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(probs >= threshold, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# State and loop.

@flax.struct.dataclass
class DecodeState:
  """Carried through the while_loop. B rows, M = max_decode_len, C cache slots."""
  step: jax.Array          # () tokens emitted so far
  tokens: jax.Array        # (B, M) int32, pad after eos
  logprobs: jax.Array      # (B, M) float32, log p(token) under the model (temperature 1)
  done: jax.Array          # (B,) bool, eos emitted
  last_token: jax.Array    # (B,) int32
  positions: jax.Array     # (B,) int32, position of last_token
  cache: dict              # {"k","v"}: (L, B, C, K, H)
  cache_valid: jax.Array   # (B, C) bool
  rng: jax.Array


def prefill(model: PaliGemma, params, images, text, input_mask, mask_ar, *, cache_size: int,
            cache_dtype=jnp.bfloat16, mesh=None):
  """-> (last logits (B, V), cache, cache_valid (B, C), last positions (B,)).

  mesh: optional jax.sharding.Mesh; the cache is then created and returned in
  `sharding.cache_sharding`'s layout, the one the decode loop keeps.
  """
  cache = gemma.init_cache(model.config.llm, text.shape[0], cache_size, cache_dtype)
  cache = sharding.constrain_cache(cache, mesh)
  logits, cache, cache_valid, last = model.apply(
      {"params": params}, images, text, input_mask.astype(bool), mask_ar, cache,
      method=PaliGemma.prefill)
  return logits, sharding.constrain_cache(cache, mesh), cache_valid, last


def decode(model: PaliGemma, params, logits, cache, cache_valid, last_positions, rng, *,
           prompt_len: int, max_decode_len: int, sampler: Sampler, eos_id: int, pad_id: int = 0,
           forbidden_ids: Optional[tuple] = None, vocab_limit: Optional[int] = None,
           stream: Optional[Callable] = None, mesh=None) -> DecodeState:
  """Samples up to `max_decode_len` tokens per row in one while_loop.

  prompt_len: cache slots the prefill filled (Ni + T); token i is written at prompt_len + i.
  forbidden_ids: ids never emitted. vocab_limit: ids >= it are never emitted (embedding rows
  the tokenizer has no piece for). stream: host function (tokens (B,), done (B,)) called
  in order as each step is sampled; None keeps the loop free of host round trips.
  mesh: optional jax.sharding.Mesh; the cache keeps `sharding.cache_sharding`'s layout
  through the loop and each step runs weight-stationary (`sharding.weight_stationary`).
  """
  batch = logits.shape[0]
  cache = sharding.constrain_cache(cache, mesh)
  step_context = (lambda: sharding.weight_stationary(mesh)) if mesh is not None \
      else contextlib.nullcontext

  def pick(logits, rng, done):
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:  # rows that are no token
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    # The score is the model's log-probability, before the forbidden ids are removed (as
    # big_vision's): banning a token does not make the others more likely to best_of_n.
    logp_all = jax.nn.log_softmax(logits, -1)
    if forbidden_ids:
      logits = logits.at[:, jnp.asarray(forbidden_ids)].set(-jnp.inf)
    token = sample(sampler, logits, rng)
    logp = jnp.take_along_axis(logp_all, token[:, None], -1)[:, 0]
    return jnp.where(done, pad_id, token), jnp.where(done, 0.0, logp)

  rng, first_rng = jax.random.split(rng)
  no_row_done = jnp.zeros((batch,), bool)
  token, logp = pick(logits, first_rng, no_row_done)
  if stream is not None:
    jax.debug.callback(stream, token, no_row_done, ordered=True)
  state = DecodeState(
      step=jnp.array(1, jnp.int32),
      tokens=jnp.full((batch, max_decode_len), pad_id, jnp.int32).at[:, 0].set(token),
      logprobs=jnp.zeros((batch, max_decode_len), jnp.float32).at[:, 0].set(logp),
      done=token == eos_id, last_token=token, positions=last_positions,
      cache=cache, cache_valid=cache_valid, rng=rng)

  def cond(s: DecodeState):
    return (s.step < max_decode_len) & ~jnp.all(s.done)

  def body(s: DecodeState):
    write_index = prompt_len + s.step - 1
    cache_valid = jax.lax.dynamic_update_slice(s.cache_valid, jnp.ones((batch, 1), bool),
                                               (0, write_index))
    positions = s.positions + 1
    with step_context():
      logits, cache = model.apply({"params": params}, s.last_token, positions, s.cache,
                                  cache_valid, write_index, method=PaliGemma.extend)
    cache = sharding.constrain_cache(cache, mesh)
    rng, step_rng = jax.random.split(s.rng)
    token, logp = pick(logits, step_rng, s.done)
    if stream is not None:
      jax.debug.callback(stream, token, s.done, ordered=True)
    return s.replace(
        step=s.step + 1,
        tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
        logprobs=jax.lax.dynamic_update_slice(s.logprobs, logp[:, None], (0, s.step)),
        done=s.done | (token == eos_id), last_token=token, positions=positions,
        cache=cache, cache_valid=cache_valid, rng=rng)

  return jax.lax.while_loop(cond, body, state)


def seed_key(seed) -> jax.Array:
  """A PRNG key from all 64 bits of an integer seed (negative: two's complement), as
  jax.random.PRNGKey gives with jax_enable_x64; without it PRNGKey keeps the low 32 bits only,
  so 2**32 would draw as 0. Equal to PRNGKey(seed) for 0 <= seed < 2**32."""
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) \
      or not -2 ** 63 <= seed < 2 ** 64:
    raise ValueError(f"seed must be an integer that fits in 64 bits (-2**63 <= seed < 2**64), "
                     f"got {seed!r}")
  seed = int(seed) % 2 ** 64
  return jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32)


def answer_lengths(tokens, eos_id):
  """(B, M) -> (B,) number of tokens before the first eos (M when none)."""
  is_eos = tokens == eos_id
  return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1), tokens.shape[1])


def jit_prefill(model, *, cache_size, cache_dtype, mesh=None):
  return jax.jit(functools.partial(prefill, model, cache_size=cache_size, cache_dtype=cache_dtype,
                                   mesh=mesh))


def jit_decode(model, **kwargs):
  """kwargs: prompt_len, max_decode_len, sampler, eos_id, ... (static)."""
  return jax.jit(functools.partial(decode, model, **kwargs), donate_argnums=(2,))
