"""Model and runtime settings for main.py. Override any field: --config.dtype=bfloat16."""
import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.dtype = "float32"          # compute and parameter dtype: float32 | bfloat16 | float16
  c.cache_dtype = "bfloat16"   # KV cache dtype (big_vision's default); float32 for exact parity
  c.prompt_bucket = 16         # prompts are padded to a multiple of this: fewer recompilations
  # image + prompt (padded to prompt_bucket) + max_decode_len must fit; checked before compiling
  c.max_seq_len = 8192
  # float32 matmuls at full precision: GPUs otherwise run them in TF32 (about 1e-3 relative),
  # which breaks float32 parity. "" keeps JAX's default.
  c.matmul_precision = "highest"
  c.compilation_cache_dir = "~/.cache/paligemma_jax/xla"  # "" disables the persistent cache

  # Settings no array shape tells. Unset: taken from the known variant table
  # (Gemma 2: softcaps 50 / 30; Gemma 2 27B: query scale width/heads).
  c.model = ml_collections.ConfigDict()
  c.model.attn_logits_softcap = config_dict.placeholder(float)   # 0 = off
  c.model.final_logits_softcap = config_dict.placeholder(float)  # 0 = off
  c.model.query_scale = config_dict.placeholder(str)             # head_dim | width_over_heads
  return c
