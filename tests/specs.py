"""A fixture spec (`bv_fixtures.SPECS` layout, also the benchmark presets) -> our config.

Written from the spec, not inferred from arrays, so tests can check `checkpoint.infer_config`
against it; the benchmarks build their models from the same function.
"""
from paligemma_jax.model import gemma, paligemma, vit


def spec_config(spec: dict) -> paligemma.PaliGemmaConfig:
  return paligemma.PaliGemmaConfig(
      vit=vit.ViTConfig(image_size=spec["image_size"], patch=spec["patch"],
                        width=spec["vit_width"], depth=spec["vit_depth"],
                        mlp_dim=spec["vit_mlp"], num_heads=spec["vit_heads"],
                        out_dim=spec["llm_width"]),
      llm=gemma.GemmaConfig(width=spec["llm_width"], depth=spec["llm_depth"],
                            mlp_dim=spec["llm_mlp"], num_heads=spec["llm_heads"],
                            num_kv_heads=spec["llm_kv_heads"], head_dim=spec["head_dim"],
                            vocab_size=spec["vocab"], post_norms=spec["gemma2"],
                            attn_logits_softcap=spec["attn_logits_softcap"],
                            final_logits_softcap=spec["final_logits_softcap"],
                            query_scale=spec["query_pre_attn_norm"]))
