"""big_vision's transfer loss (issue 17's first test): the training layout of an example, the
loss of a batch against a PyTorch computation of big_vision's loss on HF transformers' model
built from the same arrays, and one SGD step of each changing the logits alike."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from tests import bv_fixtures, hf_reference, train_fixtures
from tests.conftest import spec_config
from tests.numerics import rel_err
from paligemma_jax.data import image
from paligemma_jax.model import paligemma
from paligemma_jax.train import loss as loss_lib
from paligemma_jax.train import optim, trainer

TEXT_LEN = 16
EXAMPLES = [("caption en", "a cat"), ("ocr", "two dogs running on the beach"),
            ("detect cat", "")]


def test_training_example_layout(tokenizer):
  head = [tokenizer.bos_id] + tokenizer.encode("caption en") + tokenizer.encode("\n")
  tail = tokenizer.encode("a cat") + [tokenizer.eos_id]
  tokens, mask_ar, mask_loss, cut = tokenizer.training_example("caption en", "a cat", 20)
  n = len(head) + len(tail)
  assert not cut and tokens.shape == mask_ar.shape == mask_loss.shape == (21,)
  assert tokens.tolist() == head + tail + [tokenizer.pad_id] * (21 - n)
  assert mask_ar.tolist() == [0] * len(head) + [1] * (21 - len(head))
  assert mask_loss.tolist() == [0] * len(head) + [1] * len(tail) + [0] * (21 - n)
  # Too long: the eos stays (big_vision's plain truncation would drop it).
  tokens, _, mask_loss, cut = tokenizer.training_example("caption en", "a cat " * 20, 8)
  assert cut and tokens.shape == (9,) and tokens[-1] == tokenizer.eos_id and mask_loss[-1] == 1
  assert tokens[:len(head)].tolist() == head


def _batch(tokenizer, spec, test_image):
  rows = [tokenizer.training_example(p, s, TEXT_LEN)[:3] for p, s in EXAMPLES]
  tokens, mask_ar, mask_loss = (np.stack(r) for r in zip(*rows))
  pixels = np.stack([image.preprocess(x, spec["image_size"])
                     for x in (test_image, test_image[::-1], test_image[:, ::-1])])
  return pixels, tokens, mask_ar, mask_loss


def _torch_big_vision_loss(logits, targets, weights, ls):
  """big_vision's loss, written in torch from its definition."""
  logp = torch.log_softmax(logits, -1)
  v = logits.shape[-1]
  onehot = torch.nn.functional.one_hot(torch.as_tensor(targets, dtype=torch.long), v).float()
  labels = onehot * (1 - ls) + (1 - onehot) * ls / (v - 1)
  per_token = -(labels * logp).sum(-1) * torch.as_tensor(weights, dtype=torch.float32)
  counts = torch.as_tensor(weights, dtype=torch.float32).sum(-1).clamp(min=1)
  return (per_token.sum(-1) / counts).mean()


def _setup(name, flat_params, tokenizer, test_image):
  spec = bv_fixtures.SPECS[name]
  config = spec_config(spec)
  params = jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(
      flat_params[name], sep="/"))
  hf = hf_reference.build_hf_paligemma(flat_params[name], spec)
  return spec, paligemma.PaliGemma(config), params, hf, _batch(tokenizer, spec, test_image)


def _hf_text_logits(hf, pixels, tokens, mask_ar):
  return hf_reference.hf_forward(hf, pixels, tokens[:, :-1], mask_ar[:, :-1])[:, -TEXT_LEN:]


@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa"])
def test_loss_equals_big_vision_on_the_reference(name, ls, flat_params, tokenizer, test_image):
  """float32: ours within 1e-5 relative of the reference; the examples have different numbers
  of supervised tokens, so HF's token mean differs by far more (and must fail this test)."""
  spec, model, params, hf, (pixels, tokens, mask_ar, mask_loss) = _setup(
      name, flat_params, tokenizer, test_image)
  assert len(set(mask_loss.sum(-1).tolist())) == 3
  with torch.no_grad():
    ref = float(_torch_big_vision_loss(_hf_text_logits(hf, pixels, tokens, mask_ar),
                                       tokens[:, 1:], mask_loss[:, 1:], ls))
  ours = float(loss_lib.batch_loss(model, params, pixels, tokens, mask_ar, mask_loss,
                                   label_smoothing=ls))
  assert abs(ours - ref) < 1e-5 * abs(ref), (ours, ref)
  token_mean = float(loss_lib.batch_loss(model, params, pixels, tokens, mask_ar, mask_loss,
                                         label_smoothing=ls, norm="tokens"))
  assert abs(token_mean - ref) > 1e-3 * abs(ref), (token_mean, ref)


def test_one_sgd_step_changes_the_logits_like_the_reference(flat_params, tokenizer,
                                                             test_image):
  """One SGD step (lr 0.1) on big_vision's loss, ours through the trainer's step and the reference
  through torch autograd on HF's model: the text logits move alike, the change within 1e-3 of
  its largest magnitude and the new logits within 1e-4 relative (float32)."""
  spec, model, params, hf, (pixels, tokens, mask_ar, mask_loss) = _setup(
      "pg2_gqa", flat_params, tokenizer, test_image)
  lr = 0.1
  forward = lambda p: model.apply({"params": p}, pixels, tokens[:, :-1], mask_ar[:, :-1])[0]
  before = np.asarray(forward(params))
  # The trainer's own step: SGD, constant schedule, no clipping or decay.
  cfg = train_fixtures.config({"optimizer": "sgd", "lr": lr, "grad_clip_norm": 0.0,
                               "weight_decay": 0.0, "schedule": "constant"})
  sched = optim.schedule("constant", 1)
  tx = optim.optimizer("sgd", lr=lr, sched=sched)
  trainable = traverse_util.flatten_dict(params, sep="/")
  batch = {"images": pixels[None], "tokens": tokens[None], "mask_ar": mask_ar[None],
           "mask_loss": mask_loss[None]}
  step = trainer.make_train_step(model, tx, sched, cfg)
  trained, _, metrics = step(trainable, tx.init(trainable), {}, batch, 0,
                             jax.random.PRNGKey(0))
  after = np.asarray(forward(traverse_util.unflatten_dict(trained, sep="/")))

  hf.requires_grad_(True)
  loss = _torch_big_vision_loss(_hf_text_logits(hf, pixels, tokens, mask_ar), tokens[:, 1:],
                                mask_loss[:, 1:], 0.0)
  loss.backward()
  assert abs(float(metrics["loss"]) - float(loss)) < 1e-5 * float(loss)
  with torch.no_grad():
    ref_before = _hf_text_logits(hf, pixels, tokens, mask_ar).numpy()
    for p in hf.parameters():
      if p.grad is not None:
        p -= lr * p.grad
    ref_after = _hf_text_logits(hf, pixels, tokens, mask_ar).numpy()
  change, ref_change = after - before, ref_after - ref_before
  assert np.abs(ref_change).max() > 1e-2 * np.abs(ref_before).max(), "the step must move them"
  print(f"max |change| {np.abs(ref_change).max():.3g} of max |logit| {np.abs(ref_before).max():.3g}; "
        f"change error {rel_err(change, ref_change):.2e}, logits after {rel_err(after, ref_after):.2e}")
  assert rel_err(change, ref_change) < 1e-3, rel_err(change, ref_change)
  assert rel_err(after, ref_after) < 1e-4, rel_err(after, ref_after)
