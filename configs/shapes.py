"""The embedded default: a ~2.3 M parameter PaliGemma-2-like model trained from scratch on the
procedural shapes data set (captions, counting, colours, detection, segmentation).

  python -m paligemma_jax.train --config=configs/shapes.py --workdir=runs/shapes

The data (`shapes:NUM_SCENES:SEED`) is generated on first use into data_cache, with
segmentation codes from checkpoints/shapes/vae.npz (trained by
`python -m paligemma_jax.train.vqvae --out=checkpoints/shapes/vae.npz`).
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(os.path.dirname(HERE), "checkpoints", "shapes")


def get_config():
  spec = importlib.util.spec_from_file_location("transfer", os.path.join(HERE, "transfer.py"))
  transfer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(transfer)
  c = transfer.get_config()
  c.init = ""                # from scratch
  c.arch = "shapes"          # demo.shapes_config(): 112 px, 28-px patches, 4+4 layers of width 128
  c.init_posemb = "sincos2d"  # the ViT starts knowing where each patch is
  c.tokenizer = os.path.join(SHIPPED, "tokenizer.model")
  c.shapes_vae = os.path.join(SHIPPED, "vae.npz")
  c.data_cache = "~/.cache/paligemma_jax"
  c.train_data = "shapes:15000:0"  # ~73k examples: every scene asked 4-5 questions
  c.val_data = "shapes:40:1"
  c.text_len = 36
  c.batch_size = 32
  c.total_steps = 7500
  c.lr = 1e-3
  c.warmup_steps = 300
  c.weight_decay = 0.0
  c.remat_policy = "nothing_saveable"  # measured faster here than keeping activations
  c.ckpt_steps = 500
  c.eval_steps = 1500
  c.log_steps = 50
  return c
