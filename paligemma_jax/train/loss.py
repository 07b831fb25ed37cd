"""big_vision's PaliGemma transfer loss (`trainers/proj/paligemma/train.py`).

Axis letters: B batch, T text positions the model sees (text_len), V vocabulary.
"""
import jax
import jax.numpy as jnp


def token_losses(logits, targets, label_smoothing: float = 0.0):
  """logits (B, T, V) float, targets (B, T) int -> (B, T) cross-entropy per token against
  labels with `1 - ls` on the target and `ls / (V - 1)` on every other id."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if not label_smoothing:
    return -target_logp
  v = logits.shape[-1]
  others = jnp.sum(logp, axis=-1) - target_logp
  return -((1.0 - label_smoothing) * target_logp + label_smoothing / (v - 1) * others)


def loss(logits, targets, weights, label_smoothing: float = 0.0, norm: str = "examples"):
  """The batch loss: weights (B, T) mark the supervised tokens (mask_loss[:, 1:]).

  norm "examples" (big_vision): each example's loss is the sum over its supervised tokens
  divided by their count (at least 1), and the batch loss their mean. "tokens" (HF's): the
  sum over the batch's supervised tokens divided by their count.
  """
  per_token = token_losses(logits, targets, label_smoothing) * weights
  if norm == "examples":
    return jnp.mean(per_token.sum(-1) / jnp.maximum(weights.sum(-1), 1))
  if norm == "tokens":
    return per_token.sum() / jnp.maximum(weights.sum(), 1)
  raise ValueError(f"loss norm must be 'examples' or 'tokens', got {norm!r}")


def batch_loss(model, params, images, tokens, mask_ar, mask_loss, *, label_smoothing=0.0,
               norm="examples", train=False, rngs=None):
  """The model on images (B, S, S, 3) and tokens[:, :-1] (B, T+1 -> T) under mask_ar[:, :-1],
  against targets tokens[:, 1:] weighted by mask_loss[:, 1:], as big_vision trains."""
  logits, _ = model.apply({"params": params}, images, tokens[:, :-1], mask_ar[:, :-1],
                          train=train, rngs=rngs)
  return loss(logits, tokens[:, 1:], mask_loss[:, 1:].astype(jnp.float32), label_smoothing,
              norm)
