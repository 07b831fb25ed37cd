"""Beam search in one `jax.lax.while_loop`, over the same prefill and one-token extend.

Each prompt row grows into `beam_size` rows of the cache (row b * K + k). A beam that
has emitted eos is finished: it may only continue with pad at log-probability 0, so it
keeps its score and competes with the open beams, whose scores only fall. Scores are
raw sums of token log-probabilities (no length penalty).
"""
from typing import Optional

import flax
import jax
import jax.numpy as jnp

from paligemma_jax.model.paligemma import PaliGemma


@flax.struct.dataclass
class BeamState:
  """B prompt rows, K beams, M = max_decode_len, C cache slots."""
  step: jax.Array          # () tokens emitted so far
  tokens: jax.Array        # (B, K, M) int32
  logprobs: jax.Array      # (B, K, M) float32, per-token log p
  scores: jax.Array        # (B, K) float32, sum of logprobs
  done: jax.Array          # (B, K) bool
  positions: jax.Array     # (B*K,) int32, position of the last token
  cache: dict              # {"k","v"}: (L, B*K, C, Kv, H)
  cache_valid: jax.Array   # (B*K, C) bool


def _masked_logprobs(logits, vocab_limit, forbidden_ids):
  if forbidden_ids:
    logits = logits.at[:, jnp.asarray(forbidden_ids)].set(-jnp.inf)
  if vocab_limit is not None and vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1)


def beam_search(model: PaliGemma, params, logits, cache, cache_valid, last_positions, *,
                prompt_len: int, max_decode_len: int, beam_size: int, eos_id: int, pad_id: int = 0,
                forbidden_ids: Optional[tuple] = None, vocab_limit: Optional[int] = None):
  """From prefill outputs (batch B) -> BeamState; the best beam of row b is argmax scores[b]."""
  b, k, m = logits.shape[0], beam_size, max_decode_len
  logp = _masked_logprobs(logits, vocab_limit, forbidden_ids)
  first_logp, first_tokens = jax.lax.top_k(logp, k)  # (B, K)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  state = BeamState(
      step=jnp.array(1, jnp.int32),
      tokens=jnp.full((b, k, m), pad_id, jnp.int32).at[:, :, 0].set(first_tokens),
      logprobs=jnp.zeros((b, k, m), jnp.float32).at[:, :, 0].set(first_logp),
      scores=first_logp, done=first_tokens == eos_id,
      positions=rep(last_positions),
      cache=jax.tree_util.tree_map(lambda c: jnp.repeat(c, k, axis=1), cache),
      cache_valid=rep(cache_valid))

  def cond(s: BeamState):
    return (s.step < m) & ~jnp.all(s.done)

  def body(s: BeamState):
    write_index = prompt_len + s.step - 1
    cache_valid = jax.lax.dynamic_update_slice(s.cache_valid, jnp.ones((b * k, 1), bool),
                                               (0, write_index))
    positions = s.positions + 1
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=2).reshape(b * k)
    logits, cache = model.apply({"params": params}, last, positions, s.cache, cache_valid,
                                write_index, method=PaliGemma.extend)
    logp = _masked_logprobs(logits, vocab_limit, forbidden_ids).reshape(b, k, -1)
    finished = jnp.full_like(logp, -jnp.inf).at[:, :, pad_id].set(0.0)
    logp = jnp.where(s.done[:, :, None], finished, logp)
    vocab = logp.shape[-1]
    candidates = (s.scores[:, :, None] + logp).reshape(b, k * vocab)
    scores, flat = jax.lax.top_k(candidates, k)  # (B, K)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp.reshape(b, k * vocab), flat, axis=1)
    pick = lambda x: jnp.take_along_axis(x, parent.reshape(b, k, *([1] * (x.ndim - 2))), axis=1)
    tokens = jax.lax.dynamic_update_slice(pick(s.tokens), token[:, :, None], (0, 0, s.step))
    logprobs = jax.lax.dynamic_update_slice(pick(s.logprobs), token_logp[:, :, None], (0, 0, s.step))
    rows = (jnp.arange(b)[:, None] * k + parent).reshape(b * k)
    return BeamState(
        step=s.step + 1, tokens=tokens, logprobs=logprobs, scores=scores,
        done=pick(s.done) | (token == eos_id), positions=positions[rows],
        cache=jax.tree_util.tree_map(lambda c: jnp.take(c, rows, axis=1), cache),
        cache_valid=cache_valid[rows])

  return jax.lax.while_loop(cond, body, state)


def best_beam(state: BeamState):
  """-> tokens (B, M), logprobs (B, M), score (B,) of each row's best beam."""
  best = jnp.argmax(state.scores, axis=1)
  take = lambda x: jnp.take_along_axis(x, best[:, None, None], axis=1)[:, 0]
  return take(state.tokens), take(state.logprobs), jnp.max(state.scores, axis=1)
