"""Numeric helpers the tests share."""
import numpy as np


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the relative error our parity tolerances are stated in."""
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)
