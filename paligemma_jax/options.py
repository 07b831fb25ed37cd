"""Checks of settings that need no model: the command line's and the API's (one place).

`pipeline.PaliGemmaPipeline.check_decoding` adds the checks against a loaded model.
"""
import numbers

import jax.numpy as jnp

from paligemma_jax.sample import decode

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name, field: str = "dtype"):
  """'float32' | 'bfloat16' | 'float16' (or a dtype) -> dtype; field names the setting in errors."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise ValueError(f"unknown {field} {name!r}; choose one of {', '.join(DTYPES)}")
  return DTYPES[name]


def check_integer(value, name: str, minimum: int, hint: str = "") -> int:
  """value as an int; ValueError unless it is an integer (not a bool) >= minimum."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")
  return int(value)


def check_decoding_options(sampler="greedy", *, beam_size: int = 0, best_of_n: int = 1,
                           stream: bool = False, forbidden_ids=()):
  """The checks of a decoding request that need no model -> (Sampler, sorted forbidden ids).

  Raises ValueError for combinations that would be ignored or give a misleading answer.
  """
  if isinstance(sampler, str):
    sampler = decode.parse_sampler(sampler)
  elif not isinstance(sampler, decode.Sampler):
    raise ValueError(f"sampler must be a string such as 'greedy' or 'nucleus(0.9)', or a "
                     f"decode.Sampler; got {sampler!r}")
  beam_size = check_integer(beam_size, "beam_size", 0, " (0: sample, N: N beams)")
  best_of_n = check_integer(best_of_n, "best_of_n", 1)
  if beam_size and best_of_n > 1:
    raise ValueError(f"beam search (beam_size={beam_size}) does not combine with best_of_n="
                     f"{best_of_n}: beams are already ranked by log-probability; drop one of them")
  if beam_size and stream:
    raise ValueError(f"beam search (beam_size={beam_size}) cannot stream: the best beam is "
                     "known only at the end")
  if beam_size and sampler.kind != "greedy":
    raise ValueError(f"beam search (beam_size={beam_size}) keeps the most likely beams and "
                     f"draws no samples: sampler {sampler} would be ignored; drop one of them")
  if stream and best_of_n > 1:
    # The stream would show one draw while the answer is the most likely of n, picked at the end.
    raise ValueError(f"streaming shows one sample as it is drawn, but best_of_n={best_of_n} "
                     "picks the answer among the samples only at the end; drop one of them")
  for i in forbidden_ids:
    if not isinstance(i, numbers.Integral) or isinstance(i, bool) or i < 0:
      raise ValueError(f"forbidden_ids: each must be a token id >= 0, got {i!r}")
  return sampler, tuple(sorted({int(i) for i in forbidden_ids}))
