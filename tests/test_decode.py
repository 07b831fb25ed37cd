"""The decode loop: one while_loop, the cache path equals the full forward, batch rows are
independent, samplers validate their arguments."""
import re

import jax
import numpy as np
import pytest

from paligemma_jax.sample import decode
from paligemma_jax.answers import outputs
from paligemma_jax.pipeline import PaliGemmaPipeline


@pytest.fixture
def compilations(monkeypatch):
  """A list that grows by one for every XLA compilation (jax.stages.Lowered.compile)."""
  seen = []
  real = jax.stages.Lowered.compile

  def counting(self, *args, **kwargs):
    seen.append(self)
    return real(self, *args, **kwargs)
  monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
  return seen


@pytest.fixture(scope="module")
def pipe(pg2_pipe):
  return pg2_pipe


def test_decode_is_one_while_loop(pipe, test_image):
  batch = pipe.make_batch([test_image], ["caption en"])
  b, t = batch["text"].shape
  prefill, _, _ = pipe._functions(b, t, 8, ("sample", decode.Sampler()), ())
  with pipe.backend.install():  # the pipeline's tree is read under its backend
    jaxpr = jax.make_jaxpr(lambda *a: decode.decode(
        pipe.model, *a, prompt_len=pipe.config.num_image_tokens + t, max_decode_len=8,
        sampler=decode.Sampler(), eos_id=1))(
            pipe.params, *jax.eval_shape(lambda: prefill(
                pipe.params, batch["images"], batch["text"], batch["input_mask"],
                batch["mask_ar"])),
            jax.random.PRNGKey(0))
  top_level = [e.primitive.name for e in jaxpr.eqns]
  assert top_level.count("while") == 1
  # The model runs inside the loop body, not unrolled outside it.
  assert "scan" not in top_level and "dot_general" not in top_level


def test_cached_decode_equals_full_forward(pipe, test_image):
  """Each generated token's logits equal a teacher-forced full forward of the same sequence."""
  [out] = pipe.generate([test_image], ["caption en"], max_decode_len=10)
  tokens, mask_ar = pipe.tokenizer.prompt("caption en")
  text = np.concatenate([tokens, np.array(out.tokens, np.int32)])[None]
  mask_ar = np.concatenate([mask_ar, np.ones(len(out.tokens), np.int32)])[None]
  pixels = pipe.make_batch([test_image], ["caption en"])["images"]
  logits = np.asarray(pipe.logits(pixels, text, mask_ar))
  first = len(tokens) - 1
  full = logits[0, first:first + len(out.tokens)].copy()
  full[:, pipe.tokenizer.vocab_size:] = -np.inf  # rows no tokenizer piece names are never emitted
  np.testing.assert_array_equal(full.argmax(-1), out.tokens)
  logp = jax.nn.log_softmax(full)[np.arange(len(out.tokens)), out.tokens]
  np.testing.assert_allclose(out.logprobs, logp, atol=1e-4)


def test_batch_rows_equal_single_rows(pipe, test_image):
  prompts = ["caption en", "answer en what is in the image ? how many people are there ?",
             "detect cat ; dog", "ocr"]
  lengths = [len(pipe.tokenizer.prompt(p)[0]) for p in prompts]
  assert max(lengths) - min(lengths) >= 10
  rng = np.random.default_rng(1)
  images = [test_image, test_image[::-1], test_image[:, ::-1],
            rng.integers(0, 256, (90, 120, 3)).astype(np.uint8)]
  batched = pipe.generate(images, prompts, max_decode_len=12)
  for img, prompt, row in zip(images, prompts, batched):
    [alone] = pipe.generate([img], [prompt], max_decode_len=12)
    assert row.tokens == alone.tokens, prompt
    np.testing.assert_allclose(row.logprobs, alone.logprobs, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    ("nucleus(0)", "p must be in"), ("nucleus(1.1)", "p must be in"), ("topk(0)", "k must be"),
    ("topk(2.5)", "k must be"), ("temperature(0)", "temperature must be > 0"),
    ("temperature(-1)", "temperature must be > 0"), ("beam(3)", "unknown sampler"),
    ("temperature", "takes 1..1 arguments"), ("greedy(1)", "takes 0..0"), ("nucleus(a)", "numbers"),
    # Not finite: nan ran and answered nothing, inf overflowed int() with a traceback.
    ("temperature(nan)", "t must be a finite number, got 'nan'"),
    ("temperature(inf)", "t must be a finite number"), ("topk(inf)", "k must be a finite number"),
    ("topk(5, -inf)", "t must be a finite number"), ("nucleus(nan)", "p must be a finite number"),
    ("topk(1e400)", "k must be a finite number"), ("nucleus(p=nan)", "p must be a finite"),
    # big_vision's named arguments, misused.
    ("nucleus(q=0.9)", "nucleus has no argument 'q'; its arguments: (p, t)"),
    ("topk(t=0.7)", "needs k"), ("topk(k=4, 5)", "positional argument '5' after a named one"),
    ("topk(4, k=5)", "k given twice"), ("temperature(t=0)", "temperature must be > 0"),
    ("topk(k=2.5)", "k must be an integer"), ("greedy(t=1)", "greedy has no argument 't'"),
    ("topk(1, 2, 3)", "takes 1..2 arguments, got 3")])
def test_bad_sampler_strings(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    decode.parse_sampler(spec)


def test_sampler_strings_round_trip():
  for s in ("greedy", "temperature(0.7)", "topk(40, 0.8)", "nucleus(0.9, 1)", "nucleus(p=0.9)",
            "topk(k=40, t=0.7)", "temperature(t=0.5)", "topk(40, t=0.7)"):
    assert str(decode.parse_sampler(str(decode.parse_sampler(s)))) == str(decode.parse_sampler(s))
  assert decode.parse_sampler("topk(5)") == decode.Sampler("topk", k=5, t=1.0)
  # big_vision's keyword form means what the positional one does.
  assert decode.parse_sampler("nucleus(p=0.9)") == decode.Sampler("nucleus", p=0.9, t=1.0)
  assert decode.parse_sampler("topk(k=40, t=0.7)") == decode.Sampler("topk", k=40, t=0.7)
  assert decode.parse_sampler("topk(t=0.7, k=40)") == decode.Sampler("topk", k=40, t=0.7)
  assert decode.parse_sampler("temperature(t=0.5)") == decode.Sampler("temperature", t=0.5)
  assert decode.parse_sampler(" nucleus( 0.8 , t = 2 ) ") == decode.Sampler("nucleus", p=0.8, t=2)


def test_beam_one_equals_greedy_and_wider_beams_score_no_lower(pipe, test_image):
  prompts = ["caption en", "detect cat ; dog"]
  images = [test_image, test_image[::-1]]
  greedy = pipe.generate(images, prompts, max_decode_len=8)
  beam1 = pipe.generate(images, prompts, max_decode_len=8, beam_size=1)
  assert [g.tokens for g in greedy] == [b.tokens for b in beam1]
  for k in (2, 4):
    beams = pipe.generate(images, prompts, max_decode_len=8, beam_size=k)
    for g, bm in zip(greedy, beams):
      assert sum(bm.logprobs) >= sum(g.logprobs) - 1e-4, (k, bm.tokens, g.tokens)


def test_beam_scores_are_model_logprobs(pipe, test_image):
  [bm] = pipe.generate([test_image], ["caption en"], max_decode_len=6, beam_size=3)
  tokens, mask_ar = pipe.tokenizer.prompt("caption en")
  text = np.concatenate([tokens, np.array(bm.tokens, np.int32)])[None]
  mask_ar = np.concatenate([mask_ar, np.ones(len(bm.tokens), np.int32)])[None]
  pixels = pipe.make_batch([test_image], ["caption en"])["images"]
  logits = np.asarray(pipe.logits(pixels, text, mask_ar)).copy()
  logits[..., pipe.tokenizer.vocab_size:] = -np.inf
  first = len(tokens) - 1
  logp = jax.nn.log_softmax(logits[0, first:first + len(bm.tokens)])
  np.testing.assert_allclose(bm.logprobs, logp[np.arange(len(bm.tokens)), bm.tokens], atol=1e-4)


def test_best_of_n_keeps_the_most_likely_sample(pipe, test_image):
  n = 4
  [best] = pipe.generate([test_image], ["caption en"], max_decode_len=6,
                         sampler="temperature(1.5)", seed=3, best_of_n=n)
  draws = pipe.generate([test_image] * n, ["caption en"] * n, max_decode_len=6,
                        sampler="temperature(1.5)", seed=3)
  totals = [sum(d.logprobs) for d in draws]
  assert len(set(tuple(d.tokens) for d in draws)) > 1, "draws must differ for the test to mean something"
  assert best.tokens == draws[int(np.argmax(totals))].tokens


def test_seeded_sampling_is_reproducible(pipe, test_image):
  a = pipe.generate([test_image], ["caption en"], max_decode_len=8, sampler="nucleus(0.9, 2)", seed=5)
  b = pipe.generate([test_image], ["caption en"], max_decode_len=8, sampler="nucleus(0.9, 2)", seed=5)
  c = pipe.generate([test_image], ["caption en"], max_decode_len=8, sampler="nucleus(0.9, 2)", seed=6)
  assert a[0].tokens == b[0].tokens and a[0].tokens != c[0].tokens


def test_streaming_reports_every_token_in_order(pipe, test_image):
  seen = []
  [out] = pipe.generate([test_image], ["caption en"], max_decode_len=7,
                        on_token=lambda tokens, done: seen.append(int(np.asarray(tokens)[0])))
  [plain] = pipe.generate([test_image], ["caption en"], max_decode_len=7)
  assert out.tokens == plain.tokens
  assert seen[:len(out.tokens)] == out.tokens


def test_requests_too_long_fail_before_compiling(pipe, test_image, compilations):
  small = PaliGemmaPipeline(pipe.config, pipe.params, pipe.tokenizer, max_seq_len=300)
  with pytest.raises(ValueError, match=r"exceeds the configured cache of 300"):
    small.generate([test_image], ["caption en"], max_decode_len=64)
  with pytest.raises(ValueError, match="max_decode_len must be >= 1"):
    small.generate([test_image], ["caption en"], max_decode_len=0)
  assert not small._compiled and not compilations


def test_cache_check_counts_the_prompt_bucket(pipe, test_image, compilations):
  """The check uses the padded prompt width that is compiled, so the real cache (image +
  padded prompt + max_decode_len) never exceeds max_seq_len, exactly filling it at the edge."""
  n16, n17 = "caption en" + " a" * 11, "caption en" + " a" * 12
  assert [len(pipe.tokenizer.prompt(p)[0]) for p in ("caption en", n16, n17)] == [5, 16, 17]
  ni = pipe.config.num_image_tokens
  small = PaliGemmaPipeline(pipe.config, pipe.params, pipe.tokenizer, cache_dtype="float32",
                            max_seq_len=ni + 16 + 4)
  # 5 prompt tokens pad to 16: 4 decode slots fit, 5 do not (unpadded, 5 + 5 would have).
  with pytest.raises(ValueError, match=r"5 prompt tokens \(padded to 16, a multiple of "
                                       r"prompt_bucket 16\) \+ max_decode_len 5 = "):
    small.generate([test_image], ["caption en"], max_decode_len=5)
  with pytest.raises(ValueError, match=r"17 prompt tokens \(padded to 32"):
    small.generate([test_image], [n17], max_decode_len=1)
  assert not compilations
  small.generate([test_image], [n16], max_decode_len=4)  # 16 tokens: one bucket, at the edge
  assert compilations  # the counter sees the compilations it guards against
  [(prefill, _)] = small._compiled.values()
  assert prefill.out_info[1]["k"].shape[2] == small.max_seq_len  # (L, B, C, K, H)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="topk(1401)"), "k=1401 exceeds the 1400 token ids left to generate"),
    (dict(sampler="topk(1400)", forbidden_ids=[7]), "k=1400 exceeds the 1399 token ids"),
    (dict(beam_size=1401), "beam_size=1401 exceeds the 1400 token ids"),
    (dict(beam_size=-1), "beam_size must be >= 0"),
    (dict(best_of_n=0), "best_of_n must be >= 1, got 0"),
    (dict(beam_size=2, sampler="nucleus(0.9)"), "sampler nucleus(0.9, 1) would be ignored"),
    (dict(beam_size=2, best_of_n=3), "does not combine with best_of_n=3"),
    (dict(beam_size=2, on_token=print), "cannot stream"),
    (dict(best_of_n=4, on_token=print), "but best_of_n=4 picks the answer"),
    (dict(forbidden_ids=[-1]), "each must be a token id >= 0, got -1"),
    (dict(forbidden_ids=[3, 1536]),
     "1536 is not a token id of this model; expected 0 <= id < 1536"),
    (dict(forbidden_ids=range(1400)), "forbid every id"),
    (dict(sampler="temperature(nan)"), "must be a finite number"),
])
def test_bad_decoding_options_fail_before_compiling(pipe, test_image, compilations, kwargs,
                                                    message):
  assert pipe.config.llm.vocab_size == 1536 and pipe.tokenizer.vocab_size == 1400
  with pytest.raises(ValueError, match=re.escape(message)):
    pipe.generate([test_image], ["caption en"], max_decode_len=4, **kwargs)
  assert not compilations


def test_forbidden_ids_are_never_emitted(pipe, test_image):
  [free] = pipe.generate([test_image], ["caption en"], max_decode_len=6)
  banned = sorted(set(free.tokens))
  assert banned, "the free answer must have tokens for the test to mean something"
  for kw in (dict(), dict(sampler="temperature(3)"), dict(beam_size=3)):
    [out] = pipe.generate([test_image], ["caption en"], max_decode_len=6, forbidden_ids=banned,
                          **kw)
    assert out.tokens and not set(banned) & set(out.tokens), kw


def test_answer_start_is_part_of_the_answer(pipe, test_image):
  """The forced start is in text (so a detect answer parses whole), not in tokens."""
  start = "<loc0100><loc0200><loc0600><loc0900> cat ;"
  for kw in (dict(), dict(beam_size=2)):
    [out] = pipe.generate([test_image], ["detect cat"], max_decode_len=5, answer_start=start, **kw)
    assert out.text.startswith(start), out.text
    assert out.text == pipe.tokenizer.decode(pipe.tokenizer.encode(start) + out.tokens)
    assert len(out.tokens) == len(out.logprobs) <= 5
    objects, _ = outputs.parse_answer(out.text, (200, 300))
    assert objects[0].label == "cat"
    np.testing.assert_allclose(objects[0].box_normalized, np.array([100, 200, 600, 900]) / 1023)


def test_prompt_lengths_share_a_bucket(pipe, test_image):
  pipe._compiled.clear()
  for prompt in ("ocr", "caption en", "answer en what is it ?"):
    pipe.generate([test_image], [prompt], max_decode_len=4)
  assert len(pipe._compiled) == 1  # all pad to the same 16-token bucket: one compilation
