"""Samplers against their intended distributions (chi-square goodness of fit).

Each test draws N seeded samples from fixed logits and compares counts with the intended
probabilities. The critical value is the chi-square quantile at 1 - 1e-6, so a correct
sampler fails a given run with probability 1e-6 (the seeds are fixed, so runs repeat).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from paligemma_jax.sample import decode
from tests.numerics import softmax

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
N = 40_000
FALSE_ALARM = 1e-6


def draws(sampler, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), N)
  logits = jnp.broadcast_to(LOGITS, (1, len(LOGITS)))
  fn = jax.jit(jax.vmap(lambda k: decode.sample(sampler, logits, k)[0]))
  return np.bincount(np.asarray(fn(keys)), minlength=len(LOGITS))


def chi_square_ok(counts, probs):
  support = probs > 0
  assert counts[~support].sum() == 0, f"drew tokens outside the allowed set: {counts}"
  if support.sum() == 1:
    return True, counts  # one allowed token: the check above is the whole test
  expected = probs[support] * counts.sum()
  stat = ((counts[support] - expected) ** 2 / expected).sum()
  dof = support.sum() - 1
  return stat < stats.chi2.ppf(1 - FALSE_ALARM, dof), (stat, counts, expected)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature(t):
  ok, info = chi_square_ok(draws(decode.Sampler("temperature", t=t)), softmax(LOGITS / t))
  assert ok, info


@pytest.mark.parametrize("k,t", [(1, 1.0), (3, 1.0), (5, 0.7)])
def test_topk(k, t):
  probs = softmax(LOGITS / t)
  probs[k:] = 0  # LOGITS are sorted, so the top k are the first k
  ok, info = chi_square_ok(draws(decode.Sampler("topk", k=k, t=t)), probs / probs.sum())
  assert ok, info


@pytest.mark.parametrize("p,t", [(0.5, 1.0), (0.9, 1.0), (0.75, 2.0), (1.0, 1.0)])
def test_nucleus(p, t):
  probs = softmax(LOGITS / t)
  mass_before = np.cumsum(probs) - probs
  keep = mass_before < p  # the smallest top set whose mass reaches p
  probs = np.where(keep, probs, 0)
  ok, info = chi_square_ok(draws(decode.Sampler("nucleus", p=p, t=t)), probs / probs.sum())
  assert ok, info


def test_wrong_distribution_is_detected():
  """The test has power: temperature 1 samples do not pass as temperature 1.2."""
  ok, _ = chi_square_ok(draws(decode.Sampler("temperature", t=1.0)), softmax(LOGITS / 1.2))
  assert not ok


def test_greedy_is_the_limit_of_low_temperature():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(16, 50)).astype(np.float32))
  greedy = decode.sample(decode.Sampler(), logits, None)
  cold = decode.sample(decode.Sampler("temperature", t=1e-4), logits, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(greedy, cold)
  assert (np.asarray(greedy) == np.asarray(logits).argmax(-1)).all()


@pytest.mark.parametrize("vocab", [1, 1000, 1024, 3000, 257152])
def test_two_stage_argmax_is_the_first_maximum(vocab):
  rng = np.random.default_rng(vocab)
  logits = rng.standard_normal((6, vocab)).astype(np.float32)
  top = logits.max() + 1
  # Ties inside one block, across blocks, in the last (padded) block; all -inf; a NaN.
  for row, cols in enumerate([[vocab - 1], [0, vocab - 1], [vocab // 2, vocab // 3],
                              [min(5, vocab - 1), min(7, vocab - 1)]]):
    logits[row, cols] = top
  logits[4] = -np.inf
  logits[5, vocab // 2] = np.nan
  got = np.asarray(jax.jit(decode.argmax)(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), -1)))
  assert got[1] == 0 and got[2] == min(vocab // 2, vocab // 3)
