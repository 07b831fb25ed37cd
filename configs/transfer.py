"""Fine-tuning a PaliGemma (big_vision's transfer recipe, `configs/proj/paligemma/transfers/`).

  python -m paligemma_jax.train --config=configs/transfer.py --workdir=runs/mine \
      --config.init=pt_224.npz --config.tokenizer=paligemma_tokenizer.model \
      --config.train_data=train.jsonl --config.val_data=val.jsonl

Any field can be overridden with --config.FIELD=VALUE (nested: --config.lora.rank=8).
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.init = ""             # .npz, Orbax or transformers directory; "" = random (needs `arch`)
  c.arch = "demo"         # architecture of a random init: a name in paligemma_jax.train.ARCHS
  c.tokenizer = ""        # sentencepiece model
  c.train_data = ""       # JSONL: {"image": path relative to the file, "prefix", "suffix"}
  c.val_data = ""         # same format; "" = no validation
  c.text_len = 64         # tokens of prefix + separator + suffix + eos (big_vision: 32..256)
  c.text_len_buckets = ""  # e.g. "16,24": each batch holds examples of one length, cut to it
  c.image_cache_gb = 0.0  # keep this much of the decoded, resized pictures in memory

  c.batch_size = 8        # examples per optimizer step (all devices, all micro-batches)
  c.grad_accum_steps = 1  # micro-batches per step: batch_size / grad_accum_steps at once
  c.total_steps = 100

  c.optimizer = "adam"    # adam (big_vision's chain) | sgd | adafactor
  c.lr = 1e-5
  c.schedule = "cosine"   # cosine | constant | linear, after warmup
  c.warmup_steps = 5      # big_vision: 5% of the steps
  c.grad_clip_norm = 1.0  # 0 = no clipping
  c.weight_decay = 3e-7   # decoupled, times the schedule (not the lr); big_vision's `wd`
  c.wd_mask = ".*/kernel"  # parameters that decay (big_vision's wd_mults default)
  c.label_smoothing = 0.0
  c.loss_norm = "examples"  # big_vision: mean over examples of their token means; "tokens": HF's
  c.dropout = 0.0         # language model dropout (big_vision's model.llm.dropout)
  c.freeze = ""           # regex over parameter paths, e.g. "img/.*": no update, no opt state

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0         # 0 = full fine-tuning (minus `freeze`)
  c.lora.alpha = 16.0
  c.lora.targets = r"llm/layers/(attn/(q|kv|qkv|attn_vec)_einsum/w|mlp/(gating_einsum|linear))"
  c.export_lora = ""      # also write the adapters (npz) here at the end

  c.dtype = "float32"     # compute dtype; bfloat16 keeps float32 master weights and opt state
  c.remat_policy = "nothing_saveable"  # jax.checkpoint_policies name, or "none"
  c.seed = 0
  c.ckpt_steps = 50       # Orbax checkpoint every this many steps (and at the end)
  c.keep_ckpts = 2
  c.log_steps = 1
  c.eval_steps = 50       # validation loss every this many steps (and at the end)
  c.eval_decode = True    # also answer val_data greedily and score it with eval/'s evaluators
  c.vae = ""              # VQ-VAE (vae-oid.npz) for the segment evaluator
  c.mesh = ""             # DATAxMODEL, e.g. 4x2; "" = one device
  c.matmul_precision = "highest"

  c.model = ml_collections.ConfigDict()  # as main.py: settings no array shape tells
  c.model.attn_logits_softcap = config_dict.placeholder(float)
  c.model.final_logits_softcap = config_dict.placeholder(float)  # PaliGemma 2 transfers: 0
  c.model.query_scale = config_dict.placeholder(str)
  return c
