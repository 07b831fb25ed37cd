"""Decode-loop semantics: rows stop at their own eos and pad after it, the loop exits once every
row has finished, forbidden ids are never emitted, a forced answer start is continued, a
bfloat16 KV cache is really bfloat16, and only streaming puts host callbacks in the loop.

Most tests call `decode.decode` directly (not the pipeline) so they can choose the eos id and
read the loop's final state (`step`, per-row `done`, padded `tokens`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import spec_pipeline
from paligemma_jax.sample import beam_search, decode

M = 12  # max_decode_len
PROMPTS = ("caption en", "answer en what is in the image ? how many people are there ?")
NEVER = -1  # an eos id no token equals: every row runs all M steps
ARGMAX_RTOL = 1e-4  # float32: a token is "the argmax" if within 1e-4 * max|logit| of the max


@pytest.fixture(scope="module")
def pipe(pg2_pipe):
  return pg2_pipe


@pytest.fixture(scope="module")
def pipe_bf16_cache(tokenizer):
  return spec_pipeline("pg2_gqa", tokenizer, seed=3, cache_dtype="bfloat16")


@pytest.fixture(scope="module")
def images(test_image):
  return [test_image, test_image[::-1]]


_JITTED = {}


def _jitted(pipe, batch, width, **kw):
  """(prefill, decode), each jitted once per pipeline, shape and settings (no donation, so a
  prefill's outputs may be decoded twice)."""
  prompt_len = pipe.config.num_image_tokens + width
  cache_size = prompt_len + kw["max_decode_len"]
  pkey = ("prefill", id(pipe), cache_size)
  if pkey not in _JITTED:
    _JITTED[pkey] = pipe.backend.around(decode.jit_prefill(pipe.model, cache_size=cache_size,
                                                           cache_dtype=pipe.cache_dtype))
  dkey = ("decode", id(pipe), prompt_len, tuple(sorted(kw.items())))
  if dkey not in _JITTED:
    kw = dict(dict(sampler=decode.Sampler(), pad_id=pipe.tokenizer.pad_id,
                   vocab_limit=pipe.tokenizer.vocab_size), **kw)
    _JITTED[dkey] = pipe.backend.around(jax.jit(functools.partial(
        decode.decode, pipe.model, prompt_len=prompt_len, **kw)))
  return _JITTED[pkey], _JITTED[dkey]


def _decode(pipe, images, prompts, *, eos_id, max_decode_len=M, forbidden_ids=None,
            stream=None):
  """Greedy prefill + decode.decode -> the loop's final DecodeState, on the host."""
  b = pipe.make_batch(images, prompts)
  prefill, dec = _jitted(pipe, len(prompts), b["text"].shape[1], eos_id=eos_id,
                         max_decode_len=max_decode_len, forbidden_ids=forbidden_ids,
                         stream=stream)
  out = prefill(pipe.params, b["images"], b["text"], b["input_mask"], b["mask_ar"])
  return jax.device_get(dec(pipe.params, *out, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def free(pipe, images):
  """Both rows decoded with no eos: the greedy tokens of M steps."""
  return _decode(pipe, images, PROMPTS, eos_id=NEVER)


def _first(row, token):
  return int(np.nonzero(np.asarray(row) == token)[0][0])


def _teacher_forced(pipe, image, prompt_tokens, prompt_mask_ar, answer):
  """Full-forward float32 logits (len(answer), vocab_size) predicting each `answer` token
  after image + prompt + the answer tokens before it (answer tokens causal, mask_ar 1)."""
  text = np.concatenate([prompt_tokens, np.asarray(answer, np.int32)])[None]
  mask_ar = np.concatenate([prompt_mask_ar, np.ones(len(answer), np.int32)])[None]
  pixels = pipe.make_batch([image], ["x"])["images"]
  logits = np.asarray(pipe.logits(pixels, text, mask_ar))
  first = len(prompt_tokens) - 1
  return logits[0, first:first + len(answer), :pipe.tokenizer.vocab_size]


def test_a_finished_row_pads_while_the_other_keeps_decoding(pipe, images, free):
  """eos = a token row 0 emits at step j >= 1 and row 1 never does: row 0 stops there and is
  pad (id pad_id, logprob 0) afterwards, row 1 is unchanged for all M steps, and each row
  equals the same row decoded alone."""
  pad = pipe.tokenizer.pad_id
  picks = [(j, int(t)) for j, t in enumerate(free.tokens[0][:M - 2])
           if j >= 1 and t not in free.tokens[0][:j] and t not in free.tokens[1]]
  assert picks, f"fixture: no token only row 0 emits: {free.tokens.tolist()}"
  j, eos = picks[0]
  s = _decode(pipe, images, PROMPTS, eos_id=eos)
  np.testing.assert_array_equal(s.tokens[0, :j + 1], free.tokens[0, :j + 1])
  np.testing.assert_array_equal(s.tokens[0, j + 1:], np.full(M - j - 1, pad))
  np.testing.assert_array_equal(s.logprobs[0, j + 1:], np.zeros(M - j - 1))
  np.testing.assert_array_equal(s.tokens[1], free.tokens[1])
  np.testing.assert_allclose(s.logprobs[1], free.logprobs[1], atol=1e-4)
  assert s.done.tolist() == [True, False] and int(s.step) == M
  for r, steps in ((0, j + 1), (1, M)):
    alone = _decode(pipe, [images[r]], [PROMPTS[r]], eos_id=eos)
    np.testing.assert_array_equal(alone.tokens[0], s.tokens[r])
    np.testing.assert_allclose(alone.logprobs[0], s.logprobs[r], atol=1e-4)
    assert int(alone.step) == steps


def test_loop_exits_once_every_row_has_finished(pipe, images, free):
  """eos = a token both rows emit, at different steps e0 != e1: the loop runs exactly
  max(e0, e1) + 1 < M steps, each row keeps its tokens up to its own eos and is pad after."""
  pad = pipe.tokenizer.pad_id
  common = set(free.tokens[0].tolist()) & set(free.tokens[1].tolist())
  assert common, f"fixture: the rows share no token: {free.tokens.tolist()}"
  eos = min(common, key=lambda t: (max(_first(r, t) for r in free.tokens), t))
  ends = [_first(r, eos) for r in free.tokens]
  assert max(ends) + 1 < M and ends[0] != ends[1], (eos, ends)
  s = _decode(pipe, images, PROMPTS, eos_id=eos)
  assert int(s.step) == max(ends) + 1
  assert s.done.all()
  for r, e in enumerate(ends):
    np.testing.assert_array_equal(s.tokens[r, :e + 1], free.tokens[r, :e + 1])
    np.testing.assert_array_equal(s.tokens[r, e + 1:], np.full(M - e - 1, pad))
    np.testing.assert_array_equal(s.logprobs[r, e + 1:], np.zeros(M - e - 1))
    alone = _decode(pipe, [images[r]], [PROMPTS[r]], eos_id=eos)
    assert int(alone.step) == e + 1
    np.testing.assert_array_equal(alone.tokens[0], s.tokens[r])


def test_forbidden_greedy_choice_is_never_emitted(pipe, images, free, tokenizer):
  """Banning row 0's greedy token x at step k >= 1 (checked to be the full-forward argmax
  there): x appears nowhere in the batch, steps before k are unchanged and step k takes the
  runner-up of the same logits."""
  k = 1
  x = int(free.tokens[0, k])
  assert x not in free.tokens[0, :k]
  prompt, mask = tokenizer.prompt(PROMPTS[0])
  logits = _teacher_forced(pipe, images[0], prompt, mask, free.tokens[0, :k + 1])[k]
  order = np.argsort(-logits)
  assert order[0] == x and logits[order[0]] - logits[order[1]] > ARGMAX_RTOL * np.abs(logits).max()
  s = _decode(pipe, images, PROMPTS, eos_id=NEVER, forbidden_ids=(x,))
  assert x not in s.tokens, s.tokens.tolist()
  np.testing.assert_array_equal(s.tokens[0, :k], free.tokens[0, :k])
  assert s.tokens[0, k] == order[1]
  # Row 1 never chose x: the ban leaves it alone.
  assert x not in free.tokens[1]
  np.testing.assert_array_equal(s.tokens[1], free.tokens[1])


def test_logprobs_are_the_models_before_forbidden_ids_are_removed(pipe, images, free, tokenizer):
  """As big_vision: banning a likely token that greedy never emits (the most likely after row
  0's first choice that appears nowhere in the batch) leaves every token and its
  log-probability (the model's, over the whole vocabulary) unchanged; renormalised over the
  allowed ids they would rise by -log(1 - p(banned)) at that step."""
  prompt, mask = tokenizer.prompt(PROMPTS[0])
  logits = _teacher_forced(pipe, images[0], prompt, mask, free.tokens[0, :1])[0]
  banned = next(int(i) for i in np.argsort(-logits)[1:] if i not in free.tokens)
  p_banned = float(jax.nn.softmax(logits)[banned])
  assert p_banned > 1e-3, p_banned
  s = _decode(pipe, images, PROMPTS, eos_id=NEVER, forbidden_ids=(banned,))
  np.testing.assert_array_equal(s.tokens, free.tokens)
  # Renormalised, row 0's first score would move by -log(1 - p) > 1e-3, far above 1e-6.
  np.testing.assert_allclose(s.logprobs, free.logprobs, rtol=0, atol=1e-6)


def test_forced_answer_start_is_continued(pipe, images, tokenizer):
  """With answer_start X the prompt is prompt + X, X causal (mask_ar 1, like the answer), and
  every generated token is the argmax of a teacher-forced full forward over
  prompt + X + the tokens before it (within 1e-4 * max|logit|); log-probabilities match it."""
  x, n = "a cat", 10
  prompt, prompt_mask = tokenizer.prompt("caption en")
  start = np.asarray(tokenizer.encode(x), np.int32)
  with_start, mask_with_start = tokenizer.prompt("caption en", x)
  np.testing.assert_array_equal(with_start, np.concatenate([prompt, start]))
  np.testing.assert_array_equal(mask_with_start,
                                np.r_[np.zeros(len(prompt)), np.ones(len(start))])
  [out] = pipe.generate([images[0]], ["caption en"], max_decode_len=n, answer_start=x)
  [plain] = pipe.generate([images[0]], ["caption en"], max_decode_len=n)
  assert out.tokens != plain.tokens, "the forced start must change the answer to mean anything"
  emitted = out.tokens + ([tokenizer.eos_id] if len(out.tokens) < n else [])
  answer = np.concatenate([start, emitted]).astype(np.int32)
  logits = _teacher_forced(pipe, images[0], prompt, prompt_mask, answer)[len(start):]
  rows = np.arange(len(emitted))
  gap = logits.max(-1) - logits[rows, emitted]
  assert np.all(gap <= ARGMAX_RTOL * np.abs(logits).max(-1)), gap
  logp = jax.nn.log_softmax(logits)[rows[:len(out.tokens)], out.tokens]
  np.testing.assert_allclose(out.logprobs, logp, atol=1e-4)
  # The check tells the masks apart: with X bidirectional (part of the prefix) the
  # teacher-forced argmax differs somewhere.
  wrong = _teacher_forced(pipe, images[0], with_start, np.zeros(len(with_start), np.int32),
                          np.asarray(emitted, np.int32))
  assert np.any(wrong.argmax(-1) != np.asarray(emitted))


# bfloat16 KV cache. Keys and values are rounded to bfloat16 (8 significant bits: relative
# error <= 2^-9 per element) when written; queries, softmax and the rest stay float32. On these
# deliberately high-gain fixtures (attention logits of std 3-4, final-norm gain 6) that rounding
# moves a step's log-probabilities by up to ~0.1 nat (measured here: 0.034 and 0.082 on the two
# rows, the second after a near-tie flipped a token at a top-2 gap of 0.026); a wrong position,
# mask or cache slot moves them by nats. So every bfloat16-cache token must be within
# BF16_CACHE_NATS of the float32 full forward's maximum logit at its step, its log-probability
# within BF16_CACHE_NATS of the float32 one, and its tokens equal to the float32-cache run's up
# to the first step whose float32 top-2 logits are closer than 2 * BF16_CACHE_NATS (where
# rounding may legitimately flip the choice). And they must differ from float32 at all.
BF16_CACHE_NATS = 0.15


def test_bfloat16_cache_is_bfloat16_and_close_to_float32(pipe, pipe_bf16_cache, images,
                                                         tokenizer):
  n = 10
  outs = pipe_bf16_cache.generate(images, PROMPTS, max_decode_len=n)
  refs = pipe.generate(images, PROMPTS, max_decode_len=n)
  # What the pipeline compiled: the prefill returns, and the decode loop carries, a bf16 cache.
  [(prefill, dec)] = [v[:2] for v in pipe_bf16_cache._compiled.values()]
  cache_info = prefill.out_info[1]
  assert {c.dtype for c in jax.tree_util.tree_leaves(cache_info)} == {jnp.dtype(jnp.bfloat16)}
  shape = ",".join(map(str, cache_info["k"].shape))
  loops = [l.split(" while(")[0] for l in dec.as_text().splitlines() if " while(" in l]
  carried = [l for l in loops if f"[{shape}]" in l]  # the decode loop (not the rng's loops)
  assert len(carried) == 1, loops
  assert carried[0].count(f"bf16[{shape}]") == 2 and f"f32[{shape}]" not in carried[0]
  biggest = 0.0
  for img, prompt, out, ref in zip(images, PROMPTS, outs, refs):
    toks, mask = tokenizer.prompt(prompt)
    logits = _teacher_forced(pipe, img, toks, mask, out.tokens)
    rows = np.arange(len(out.tokens))
    assert np.all(logits.max(-1) - logits[rows, out.tokens] < BF16_CACHE_NATS)
    diff = np.abs(np.asarray(out.logprobs) - np.asarray(jax.nn.log_softmax(logits))[rows, out.tokens])
    assert diff.max() < BF16_CACHE_NATS, diff
    biggest = max(biggest, diff.max())
    ref_logits = _teacher_forced(pipe, img, toks, mask, ref.tokens)
    top2 = -np.sort(-ref_logits, -1)[:, :2]
    near_tie = np.nonzero(top2[:, 0] - top2[:, 1] < 2 * BF16_CACHE_NATS)[0]
    same_until = near_tie[0] + 1 if len(near_tie) else len(ref.tokens)
    assert out.tokens[:same_until] == ref.tokens[:same_until], (prompt, same_until)
  assert biggest > 1e-6, "log-probabilities identical to float32: is the cache really bfloat16?"


# ---------------------------------------------------------------------------
# Host round trips.

HOST_PRIMITIVES = ("callback", "outfeed", "infeed")


def _primitives(jaxpr):
  """Every primitive name in a (closed) jaxpr and, recursively, its sub-jaxprs (while
  cond/body, cond branches, pjit, custom_jvp/vjp, ...)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names += _primitives(sub)
  return names


def _decode_jaxpr(pipe, images, stream):
  b = pipe.make_batch(images, PROMPTS)
  prefill, _ = _jitted(pipe, len(images), b["text"].shape[1], eos_id=1, max_decode_len=M,
                       forbidden_ids=None, stream=None)
  out = jax.eval_shape(prefill, pipe.params, b["images"], b["text"], b["input_mask"],
                       b["mask_ar"])
  fn = functools.partial(
      decode.decode, pipe.model, prompt_len=pipe.config.num_image_tokens + b["text"].shape[1],
      max_decode_len=M, sampler=decode.Sampler(), eos_id=1, stream=stream)
  with pipe.backend.install():
    return jax.make_jaxpr(fn)(pipe.params, *out, jax.random.PRNGKey(0)), out


def test_only_streaming_decode_has_host_callbacks(pipe, images):
  """Without `stream` no primitive anywhere in the decode (loop body included) talks to the
  host; with it the loop body holds the callback (so the walk does find them)."""
  plain, _ = _decode_jaxpr(pipe, images, None)
  names = _primitives(plain)
  assert "while" in names and "dot_general" in names  # the walk reaches into the loop body
  assert not [n for n in names if any(h in n for h in HOST_PRIMITIVES)]
  streamed, _ = _decode_jaxpr(pipe, images, lambda tokens, done: None)
  [loop] = [e for e in streamed.jaxpr.eqns if e.primitive.name == "while"]
  assert "debug_callback" in _primitives(loop.params["body_jaxpr"])


def test_beam_search_is_one_while_loop_without_host_calls(pipe, images):
  """Beam search: one top-level while_loop, the model only inside it, no host callback."""
  _, (logits, cache, cache_valid, last) = _decode_jaxpr(pipe, images, None)
  width = pipe.make_batch(images, PROMPTS)["text"].shape[1]
  fn = functools.partial(
      beam_search.beam_search, pipe.model, prompt_len=pipe.config.num_image_tokens + width,
      max_decode_len=M, beam_size=3, eos_id=1, vocab_limit=pipe.tokenizer.vocab_size)
  with pipe.backend.install():
    jaxpr = jax.make_jaxpr(fn)(pipe.params, logits, cache, cache_valid, last)
  top_level = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert top_level.count("while") == 1, top_level
  assert "dot_general" not in top_level and "scan" not in top_level
  [loop] = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
  assert "dot_general" in _primitives(loop.params["body_jaxpr"])
  names = _primitives(jaxpr)
  assert not [n for n in names if any(h in n for h in HOST_PRIMITIVES)]
