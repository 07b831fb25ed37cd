"""The embedded default: a tiny random PaliGemma, a tiny tokenizer, an image in the repo.

It exercises the whole path (preprocess, prefill, while_loop decode, detokenize)
on a machine with no downloaded weights. Its weights are random, so its answers are noise.
"""
import os

from paligemma_jax.model import gemma, paligemma, vit
from paligemma_jax.data.tokenizer import train_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGE = os.path.join(REPO, "assets", "demo.png")


def demo_config(image_size: int = 224) -> paligemma.PaliGemmaConfig:
  """PaliGemma-2-like tiny architecture: GQA, post-norms, softcaps."""
  return paligemma.PaliGemmaConfig(
      vit=vit.ViTConfig(image_size=image_size, patch=14, width=64, depth=2, mlp_dim=128,
                        num_heads=4, out_dim=128),
      llm=gemma.GemmaConfig(width=128, depth=2, mlp_dim=256, num_heads=4, num_kv_heads=2,
                            head_dim=32, vocab_size=1536, post_norms=True,
                            attn_logits_softcap=50.0, final_logits_softcap=30.0))


def demo_tokenizer(cache_dir: str) -> str:
  path = os.path.join(cache_dir, "tiny_tokenizer.model")
  if os.path.exists(path):
    return path
  return train_tiny_tokenizer(cache_dir)
