"""Learning-rate schedules, optimizer chains and freezing, as big_vision's `optax.py` and
`utils.create_learning_rate_schedule`.

The adam chain is big_vision's: clip_by_global_norm -> scale_by_adam(b2=0.999) -> scale(lr)
-> add_decayed_weights(wd, on `wd_mults` matches) -> scale_by_schedule(schedule) -> scale(-1).
So the decay is decoupled and not multiplied by the base lr, only by the schedule
(wd 1e-6 at lr 1e-5 is AdamW's 0.1).

Frozen parameters are not part of the optimized tree at all: no gradient, no optimizer state,
and their arrays are never rewritten (bitwise unchanged).
"""
import re
from typing import Mapping

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant", "linear")
OPTIMIZERS = ("adam", "sgd", "adafactor")


def schedule(name: str, total_steps: int, warmup_steps: int = 0):
  """-> step (0-based count of updates) -> multiplier of the base lr: warmup `step/warmup`
  from 0, then cosine or linear decay to 0 over the remaining steps, or constant."""
  if name not in SCHEDULES:
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
  if total_steps > 1 and warmup_steps >= total_steps:
    raise ValueError(f"warmup_steps={warmup_steps} must be below total_steps={total_steps}")

  def fn(step):
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    mult = {"cosine": lambda: 0.5 * (1.0 + jnp.cos(jnp.pi * progress)),
            "linear": lambda: 1.0 - progress,
            "constant": lambda: jnp.ones_like(progress)}[name]()
    if warmup_steps:
      mult = mult * jnp.minimum(1.0, step / warmup_steps)
    return jnp.asarray(mult, jnp.float32)
  return fn


def optimizer(name: str, *, lr: float, sched, grad_clip_norm: float = 0.0,
              weight_decay: float = 0.0, wd_mask=None) -> optax.GradientTransformation:
  """The update chain for the trainable tree. wd_mask: tree of bools (or a function of the
  tree) saying which weights decay; None = all."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
  chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm else []
  if name == "adam":
    chain.append(optax.scale_by_adam(b1=0.9, b2=0.999))
  elif name == "adafactor":
    chain.append(optax.scale_by_factored_rms(decay_rate=0.8))
  chain.append(optax.scale(lr))
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, wd_mask))
  chain += [optax.scale_by_schedule(sched), optax.scale(-1.0)]
  return optax.chain(*chain)


def matching(keys, pattern: str, what: str) -> set:
  """The keys (flat parameter paths without `params/`) that `pattern` matches whole
  (re.fullmatch); a pattern that matches nothing is an error naming a few keys."""
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what}={pattern!r} is not a regular expression ({e})") from None
  found = {k for k in keys if regex.fullmatch(k)}
  if not found:
    some = ", ".join(sorted(keys)[:4])
    raise ValueError(f"{what}={pattern!r} matches no parameter (paths look like {some}, ...)")
  return found


def split(flat: Mapping, trainable_keys: set) -> tuple:
  """{key: array} -> (trainable, frozen) dicts."""
  return ({k: v for k, v in flat.items() if k in trainable_keys},
          {k: v for k, v in flat.items() if k not in trainable_keys})
