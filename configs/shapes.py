"""The embedded default: a ~2.3 M parameter PaliGemma-2-like model trained from scratch on the
procedural shapes data set (captions, counting, colours, detection, segmentation).

  python -m paligemma_jax.train --config=configs/shapes.py --workdir=runs/shapes  # 44 min, 2 cores

The data (`shapes:NUM_SCENES:SEED[:MAX_OBJECTS:TASK[@RATE],...]`) is generated on first use
into data_cache, with segmentation codes from checkpoints/shapes/vae.npz (trained by
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
  # Every scene is captioned, counted and detected; 30% are asked a colour and 35% a
  # segmentation (tasks learned early; fewer of them measured better): ~140k examples.
  c.train_data = "shapes:40000:0:3:caption,count,color@0.3,detect,segment@0.35"
  c.val_data = "shapes:40:1"
  c.text_len = 33            # the longest answer (three boxes) fills 34 positions
  # Batches of one length: questions, 1-2 object captions and 1 box | 3-object captions |
  # 2 boxes and masks | 3 boxes (1.7x the examples a second of padding all to 33).
  c.text_len_buckets = "11,15,27"
  c.image_cache_gb = 6.5     # the 40000 pictures decoded once (6 GB), not once per question
  c.batch_size = 16          # as many examples per second as 32, twice the updates
  c.total_steps = 24000
  c.lr = 1e-3
  c.warmup_steps = 900
  c.loss_norm = "tokens"     # detection and segmentation answers weigh by their length
  c.weight_decay = 2.5e-4    # decoupled, per step (AdamW's 0.25 at this lr), on all matrices
  c.wd_mask = ".*(kernel|/w|gating_einsum|linear)"
  c.remat_policy = "nothing_saveable"  # measured faster here than keeping activations
  c.ckpt_steps = 1000
  c.eval_steps = 4000
  c.log_steps = 50
  return c
