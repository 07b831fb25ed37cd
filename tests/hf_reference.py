"""PyTorch reference: HF transformers' PaliGemma built from big_vision arrays.

The mapping from the big_vision layout (see ``tests/bv_fixtures.py``) to the HF
state dict is written here from the shapes and semantics of both models; it is
checked against an independent numpy forward in
``tests/test_hf_reference_selfcheck.py``.

Behaviour of the installed transformers (5.x) that this module relies on, each
verified in its source and guarded by an assertion or by the self-check test:

* Text embeddings are scaled by sqrt(D) inside the embedding module (in the
  weight dtype); image features are scattered in afterwards, unscaled.
* If ``image_token_id >= text vocab_size`` the image placeholder ids are replaced
  by 0 before the embedding lookup, so we use ``image_token_id = vocab`` and the
  HF vocab (and logits) are exactly the big_vision vocab.
* A 4D float attention mask passed as ``attention_mask`` is used as-is (mask
  creation returns early for 4D masks), so ``hf_logits`` passes the big_vision
  prefix-LM mask explicitly instead of relying on ``token_type_ids``.
* HF PaliGemma uses 1-based positions by default (it adds 1 when it builds
  position_ids itself); big_vision uses 0-based ones. ``hf_logits`` passes 0-based
  positions explicitly, and ``hf_greedy`` is a loop over ``hf_logits`` (HF's
  ``generate`` changed how it feeds PaliGemma's positions in 5.24).
* Gemma 2's sliding window is disabled by declaring every layer
  ``full_attention`` (and the window is 8192 anyway).
* PaliGemma applies Gemma 2's final-logit softcap only from transformers 5.23 on
  (5.17-5.22 leave it out; found on a GPU machine with 5.17, where the self-check
  failed by ~20% on the Gemma 2 specs): ``hf_config`` refuses them for Gemma 2.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from packaging.version import Version
from transformers import (
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)

GEMMA2_MIN_TRANSFORMERS = (5, 23)


def _check_transformers(spec: dict):
    found = Version(transformers.__version__).release[:2]  # "6.0rc1", "5.24.0.dev0" parse too
    if spec["gemma2"] and found < GEMMA2_MIN_TRANSFORMERS:
        raise RuntimeError(
            f"a Gemma 2 reference needs transformers >= "
            f"{'.'.join(map(str, GEMMA2_MIN_TRANSFORMERS))} (found {transformers.__version__}): "
            "older PaliGemma models drop Gemma 2's final-logit softcap, so the reference would "
            "be wrong. pip install -e '.[test]'")

_VIT = "img/Transformer/encoderblock/"
_MHA = _VIT + "MultiHeadDotProductAttention_0/"

# Never reached by our sequences (<= ~1300 tokens); all layers are full anyway.
_SLIDING_WINDOW = 8192


def _image_tokens(spec):
    return (spec["image_size"] // spec["patch"]) ** 2


def hf_config(spec: dict) -> PaliGemmaConfig:
    _check_transformers(spec)
    d, v = spec["llm_width"], spec["vocab"]
    vision = SiglipVisionConfig(
        hidden_size=spec["vit_width"],
        intermediate_size=spec["vit_mlp"],
        num_hidden_layers=spec["vit_depth"],
        num_attention_heads=spec["vit_heads"],
        num_channels=3,
        image_size=spec["image_size"],
        patch_size=spec["patch"],
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,
    )
    text_kw = dict(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=spec["llm_mlp"],
        num_hidden_layers=spec["llm_depth"],
        num_attention_heads=spec["llm_heads"],
        num_key_value_heads=spec["llm_kv_heads"],
        head_dim=spec["head_dim"],
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        attention_dropout=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    if spec["gemma2"]:
        if spec["query_pre_attn_norm"] == "head_dim":
            scalar = spec["head_dim"]
        elif spec["query_pre_attn_norm"] == "width_over_heads":
            scalar = d // spec["llm_heads"]
            assert scalar * spec["llm_heads"] == d
        else:
            raise ValueError(spec["query_pre_attn_norm"])
        text = Gemma2Config(
            **text_kw,
            query_pre_attn_scalar=scalar,
            attn_logit_softcapping=spec["attn_logits_softcap"],
            final_logit_softcapping=spec["final_logits_softcap"],
            sliding_window=_SLIDING_WINDOW,
            layer_types=["full_attention"] * spec["llm_depth"],
        )
    else:
        # HF's Gemma 1 has neither softcap and always scales q by head_dim^-0.5.
        assert spec["attn_logits_softcap"] is None and spec["final_logits_softcap"] is None
        assert spec["query_pre_attn_norm"] == "head_dim"
        text = GemmaConfig(**text_kw)
    cfg = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=v,  # out of vocab: HF maps it to id 0 before embedding
        vocab_size=v,
        projection_dim=d,
        hidden_size=d,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def bv_to_hf_state_dict(flat: dict[str, np.ndarray], spec: dict) -> dict[str, torch.Tensor]:
    """Maps big_vision arrays (no ``params/`` prefix) to HF PaliGemma keys."""
    f = {k: np.asarray(x, np.float32) for k, x in flat.items()}
    sd: dict[str, np.ndarray] = {}

    # ---- SigLIP vision tower.
    vt = "model.vision_tower."
    w = spec["vit_width"]
    # Conv kernel (kh, kw, in, out) -> torch (out, in, kh, kw).
    sd[vt + "embeddings.patch_embedding.weight"] = f["img/embedding/kernel"].transpose(3, 2, 0, 1)
    sd[vt + "embeddings.patch_embedding.bias"] = f["img/embedding/bias"]
    sd[vt + "embeddings.position_embedding.weight"] = f["img/pos_embedding"].reshape(-1, w)
    for i in range(spec["vit_depth"]):
        p = f"{vt}encoder.layers.{i}."
        sd[p + "layer_norm1.weight"] = f[_VIT + "LayerNorm_0/scale"][i]
        sd[p + "layer_norm1.bias"] = f[_VIT + "LayerNorm_0/bias"][i]
        sd[p + "layer_norm2.weight"] = f[_VIT + "LayerNorm_1/scale"][i]
        sd[p + "layer_norm2.bias"] = f[_VIT + "LayerNorm_1/bias"][i]
        for bv, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            # DenseGeneral kernel (W, Hv, Dh) -> Linear weight (Hv*Dh, W), head-major rows.
            sd[p + f"self_attn.{hf}.weight"] = f[_MHA + bv + "/kernel"][i].reshape(w, -1).T
            sd[p + f"self_attn.{hf}.bias"] = f[_MHA + bv + "/bias"][i].reshape(-1)
        # out kernel (Hv, Dh, W) -> Linear weight (W, Hv*Dh).
        sd[p + "self_attn.out_proj.weight"] = f[_MHA + "out/kernel"][i].reshape(-1, w).T
        sd[p + "self_attn.out_proj.bias"] = f[_MHA + "out/bias"][i]
        sd[p + "mlp.fc1.weight"] = f[_VIT + "MlpBlock_0/Dense_0/kernel"][i].T
        sd[p + "mlp.fc1.bias"] = f[_VIT + "MlpBlock_0/Dense_0/bias"][i]
        sd[p + "mlp.fc2.weight"] = f[_VIT + "MlpBlock_0/Dense_1/kernel"][i].T
        sd[p + "mlp.fc2.bias"] = f[_VIT + "MlpBlock_0/Dense_1/bias"][i]
    sd[vt + "post_layernorm.weight"] = f["img/Transformer/encoder_norm/scale"]
    sd[vt + "post_layernorm.bias"] = f["img/Transformer/encoder_norm/bias"]

    # ---- Projector.
    sd["model.multi_modal_projector.linear.weight"] = f["img/head/kernel"].T
    sd["model.multi_modal_projector.linear.bias"] = f["img/head/bias"]

    # ---- Gemma.
    lm = "model.language_model."
    d = spec["llm_width"]
    emb = f["llm/embedder/input_embedding"]
    sd[lm + "embed_tokens.weight"] = emb
    sd["lm_head.weight"] = emb  # tied

    def heads_to_linear(w_ndh):  # (N, D, H) -> (N*H, D), rows head-major
        return w_ndh.transpose(0, 2, 1).reshape(-1, d)

    for i in range(spec["llm_depth"]):
        p = f"{lm}layers.{i}."
        if "llm/layers/attn/qkv_einsum/w" in f:
            qkv = f["llm/layers/attn/qkv_einsum/w"][i]  # (3, N, D, H)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = f["llm/layers/attn/q_einsum/w"][i]  # (N, D, H)
            kv = f["llm/layers/attn/kv_einsum/w"][i]  # (2, K, D, H)
            k, v = kv[0], kv[1]
        sd[p + "self_attn.q_proj.weight"] = heads_to_linear(q)
        sd[p + "self_attn.k_proj.weight"] = heads_to_linear(k)
        sd[p + "self_attn.v_proj.weight"] = heads_to_linear(v)
        # attn_vec_einsum (N, H, D) -> o_proj weight (D, N*H).
        sd[p + "self_attn.o_proj.weight"] = f["llm/layers/attn/attn_vec_einsum/w"][i].reshape(-1, d).T
        gating = f["llm/layers/mlp/gating_einsum"][i]  # (2, D, F)
        sd[p + "mlp.gate_proj.weight"] = gating[0].T
        sd[p + "mlp.up_proj.weight"] = gating[1].T
        sd[p + "mlp.down_proj.weight"] = f["llm/layers/mlp/linear"][i].T  # (F, D) -> (D, F)
        # Both sides compute x * rsqrt(mean(x^2) + eps) * (1 + scale): copy as-is.
        sd[p + "input_layernorm.weight"] = f["llm/layers/pre_attention_norm/scale"][i]
        if spec["gemma2"]:
            sd[p + "post_attention_layernorm.weight"] = f["llm/layers/post_attention_norm/scale"][i]
            sd[p + "pre_feedforward_layernorm.weight"] = f["llm/layers/pre_ffw_norm/scale"][i]
            sd[p + "post_feedforward_layernorm.weight"] = f["llm/layers/post_ffw_norm/scale"][i]
        else:
            # Gemma 1's HF "post_attention_layernorm" is big_vision's pre_ffw_norm.
            sd[p + "post_attention_layernorm.weight"] = f["llm/layers/pre_ffw_norm/scale"][i]
    sd[lm + "norm.weight"] = f["llm/final_norm/scale"]
    return {k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in sd.items()}


def build_hf_paligemma(flat: dict[str, np.ndarray], spec: dict) -> PaliGemmaForConditionalGeneration:
    """float32, eager attention, eval mode; every parameter loaded strictly."""
    cfg = hf_config(spec)
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(cfg)
    sd = bv_to_hf_state_dict(flat, spec)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    # The output head must be the (tied) embedding.
    assert torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    model = model.float().eval()
    model.requires_grad_(False)
    assert model.config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "eager"
    return model


def _to_torch_pixels(pixel_values: np.ndarray) -> torch.Tensor:
    x = np.asarray(pixel_values, np.float32)
    assert x.ndim == 4 and x.shape[-1] == 3, x.shape
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW


def _full_ids(model, input_ids: np.ndarray) -> torch.Tensor:
    ids = np.asarray(input_ids, np.int64)
    assert ids.ndim == 2, ids.shape
    n_img = model.config.text_config.num_image_tokens
    img = np.full((ids.shape[0], n_img), model.config.image_token_id, np.int64)
    return torch.from_numpy(np.concatenate([img, ids], axis=1))


def prefix_lm_mask(mask_ar: np.ndarray, n_img: int) -> np.ndarray:
    """big_vision's mask, bool (B, S, S): key k visible to query q iff
    cumsum(mask_ar)[k] <= cumsum(mask_ar)[q], over image (mask_ar 0) + text."""
    mask_ar = np.asarray(mask_ar, np.int64)
    full = np.concatenate([np.zeros((mask_ar.shape[0], n_img), np.int64), mask_ar], axis=1)
    cum = np.cumsum(full, axis=1)
    return cum[:, None, :] <= cum[:, :, None]


def hf_forward(model, pixel_values: np.ndarray, input_ids: np.ndarray,
               mask_ar: np.ndarray) -> torch.Tensor:
    """Full-sequence logits (B, Ni + T, V) as a torch tensor (differentiable) of image + text
    under the prefix-LM mask. Positions are 0-based over image + text (big_vision)."""
    ids = _full_ids(model, input_ids)
    b, s = ids.shape
    allowed = prefix_lm_mask(mask_ar, model.config.text_config.num_image_tokens)
    assert allowed.shape == (b, s, s), (allowed.shape, ids.shape)
    dtype = model.dtype  # HF builds its own masks in the activation dtype too
    neg = torch.finfo(dtype).min
    mask4d = torch.where(torch.from_numpy(allowed)[:, None], 0.0, neg).to(dtype)
    positions = torch.arange(s, dtype=torch.long)[None].expand(b, s)
    out = model(
        input_ids=ids,
        pixel_values=_to_torch_pixels(pixel_values),
        attention_mask=mask4d,
        position_ids=positions,
        use_cache=False,
    )
    return out.logits


def hf_logits(model, pixel_values: np.ndarray, input_ids: np.ndarray, mask_ar: np.ndarray) -> np.ndarray:
    """`hf_forward` without gradients, as float32 numpy."""
    with torch.no_grad():
        return hf_forward(model, pixel_values, input_ids, mask_ar).float().numpy()


def hf_image_features(model, pixel_values: np.ndarray) -> np.ndarray:
    """Projected SigLIP features (B, Ni, D) exactly as fed to the LLM (unscaled)."""
    with torch.no_grad():
        out = model.model.get_image_features(_to_torch_pixels(pixel_values))
    return out.pooler_output.float().numpy()


def hf_greedy(model, pixel_values: np.ndarray, input_ids: np.ndarray, max_new_tokens: int,
              eos_id: int = 1, return_scores: bool = False, vocab_limit: int | None = None):
    """Greedy decoding for one example, written here over full HF forward calls.

    HF's ``generate`` is not used: how it builds PaliGemma's positions changed between
    transformers 5.23 and 5.24 (1-based positions fed by the generation loop, then none), so
    each step is one ``hf_logits`` call over image + prompt + the tokens so far, with explicit
    0-based positions and big_vision's mask: prompt (``input_ids`` (1, T)) bidirectional,
    generated tokens causal. No KV cache, so nothing depends on HF's cache API either.

    Returns the new tokens up to (excluding) ``eos_id`` as a 1D int array; with
    ``return_scores=True`` also the (n_steps, V) float32 raw logits of every step that was
    generated (including the step that produced eos, if any). ``vocab_limit``: ids >= it are
    never emitted (the scores stay raw), for decoders restricted to a smaller tokenizer.
    """
    prompt = np.asarray(input_ids, np.int64)
    assert prompt.ndim == 2 and prompt.shape[0] == 1, "hf_greedy handles batch 1"
    tokens, scores = [], []
    for _ in range(max_new_tokens):
        seq = np.concatenate([prompt, np.asarray(tokens, np.int64)[None]], axis=1)
        mask_ar = np.concatenate([np.zeros_like(prompt), np.ones((1, len(tokens)), np.int64)], 1)
        logits = hf_logits(model, pixel_values, seq, mask_ar)[0, -1]
        scores.append(logits)
        allowed = logits if vocab_limit is None else logits[:int(vocab_limit)]
        token = int(allowed.argmax())
        if token == eos_id:
            break
        tokens.append(token)
    tokens = np.asarray(tokens, np.int64)
    return (tokens, np.stack(scores)) if return_scores else tokens


__all__ = [
    "build_hf_paligemma", "bv_to_hf_state_dict", "hf_config", "hf_forward", "hf_greedy",
    "hf_image_features", "hf_logits", "prefix_lm_mask",
]
TRANSFORMERS_VERSION = transformers.__version__
