"""Tiny random PaliGemma checkpoints in the exact big_vision layout.

Written independently of the model code in ``paligemma_jax`` so that tests can
compare that code against a reference (``tests/hf_reference.py``) built from the
same arrays.  Everything here is plain numpy.

Layout (flat keys, ``/``-joined, WITHOUT the ``params/`` prefix; every per-layer
array is scanned, i.e. carries the depth as its leading axis):

Vision tower (big_vision ``models/vit.py`` with ``scan=True``, ``pool_type='none'``,
``num_classes=D``), W = vit width, L = vit depth, Hv = vit heads, M = vit mlp,
N = number of patches:

    img/embedding/kernel                                         (14, 14, 3, W)
    img/embedding/bias                                           (W,)
    img/pos_embedding                                            (1, N, W)
    img/Transformer/encoderblock/LayerNorm_0/{scale,bias}        (L, W)
    img/Transformer/encoderblock/LayerNorm_1/{scale,bias}        (L, W)
    img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{query,key,value}/kernel  (L, W, Hv, W/Hv)
    img/Transformer/encoderblock/MultiHeadDotProductAttention_0/{query,key,value}/bias    (L, Hv, W/Hv)
    img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel                (L, Hv, W/Hv, W)
    img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/bias                  (L, W)
    img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel       (L, W, M)
    img/Transformer/encoderblock/MlpBlock_0/Dense_0/bias         (L, M)
    img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel       (L, M, W)
    img/Transformer/encoderblock/MlpBlock_0/Dense_1/bias         (L, W)
    img/Transformer/encoder_norm/{scale,bias}                    (W,)
    img/head/kernel                                              (W, D)
    img/head/bias                                                (D,)

Language model (big_vision ``models/ppp/gemma.py``, scanned), D = width,
Ll = depth, N = heads, K = kv heads, H = head dim, F = mlp, V = vocab:

    llm/embedder/input_embedding                   (V, D)   (tied output head)
    llm/layers/pre_attention_norm/scale            (Ll, D)
    llm/layers/pre_ffw_norm/scale                  (Ll, D)
    llm/layers/post_attention_norm/scale           (Ll, D)  Gemma 2 only
    llm/layers/post_ffw_norm/scale                 (Ll, D)  Gemma 2 only
    llm/layers/attn/q_einsum/w                     (Ll, N, D, H)     if K != N
    llm/layers/attn/kv_einsum/w                    (Ll, 2, K, D, H)  if K != N
    llm/layers/attn/qkv_einsum/w                   (Ll, 3, N, D, H)  if K == N
    llm/layers/attn/attn_vec_einsum/w              (Ll, N, H, D)
    llm/layers/mlp/gating_einsum                   (Ll, 2, D, F)     [0]=gate, [1]=up
    llm/layers/mlp/linear                          (Ll, F, D)
    llm/final_norm/scale                           (D,)
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

_VIT = "img/Transformer/encoderblock/"
_MHA = _VIT + "MultiHeadDotProductAttention_0/"

_COMMON = dict(
    patch=14,
    vit_width=32,
    vit_depth=2,
    vit_heads=2,
    vit_mlp=64,
    llm_width=64,
    llm_depth=2,
    llm_heads=4,
    head_dim=16,
    llm_mlp=128,
    vocab=1536,
    gemma2=False,
    attn_logits_softcap=None,
    final_logits_softcap=None,
    query_pre_attn_norm="head_dim",
)

SPEC_KEYS = (
    "image_size", "patch", "vit_width", "vit_depth", "vit_heads", "vit_mlp",
    "llm_width", "llm_depth", "llm_heads", "llm_kv_heads", "head_dim",
    "llm_mlp", "vocab", "gemma2", "attn_logits_softcap",
    "final_logits_softcap", "query_pre_attn_norm",
)

SPECS: dict[str, dict] = {
    # PaliGemma 1 (Gemma 1 2B style): multi-query attention.
    "pg1_mqa": dict(_COMMON, image_size=224, llm_kv_heads=1),
    # PaliGemma 2 (Gemma 2): post-norms, GQA, both softcaps.
    "pg2_gqa": dict(
        _COMMON, image_size=224, llm_kv_heads=2, gemma2=True,
        attn_logits_softcap=50.0, final_logits_softcap=30.0,
    ),
    # Gemma 1 with as many kv heads as heads: stored as a fused qkv_einsum.
    "mha": dict(_COMMON, image_size=224, llm_kv_heads=4),
    # 448 px: 32x32 = 1024 image tokens.
    "pg1_448": dict(_COMMON, image_size=448, llm_kv_heads=1),
    # Gemma 2 27B style query scaling: (D/N)^-0.5 with D/N (16) != head_dim (32).
    "pg2_wh": dict(
        _COMMON, image_size=224, llm_kv_heads=2, head_dim=32, gemma2=True,
        attn_logits_softcap=50.0, final_logits_softcap=30.0,
        query_pre_attn_norm="width_over_heads",
    ),
}

for _name, _spec in SPECS.items():
    assert set(_spec) == set(SPEC_KEYS), (_name, set(_spec) ^ set(SPEC_KEYS))
    assert _spec["vit_width"] % _spec["vit_heads"] == 0, _name
    assert _spec["llm_heads"] % _spec["llm_kv_heads"] == 0, _name
    assert _spec["image_size"] % _spec["patch"] == 0, _name
    assert _spec["query_pre_attn_norm"] in ("head_dim", "width_over_heads"), _name
    if not _spec["gemma2"]:
        # Gemma 1 has neither softcaps nor the 27B query scaling.
        assert _spec["attn_logits_softcap"] is None, _name
        assert _spec["final_logits_softcap"] is None, _name
        assert _spec["query_pre_attn_norm"] == "head_dim", _name


def spec_image_tokens(spec: dict) -> int:
    """Number of image tokens (patches) the vision tower produces."""
    return (spec["image_size"] // spec["patch"]) ** 2


def param_shapes(spec: dict) -> dict[str, tuple[int, ...]]:
    """Expected flat key -> shape for a spec (keys without ``params/``)."""
    p, w, lv = spec["patch"], spec["vit_width"], spec["vit_depth"]
    hv, m = spec["vit_heads"], spec["vit_mlp"]
    d, ll, n = spec["llm_width"], spec["llm_depth"], spec["llm_heads"]
    k, h, f, v = spec["llm_kv_heads"], spec["head_dim"], spec["llm_mlp"], spec["vocab"]
    dh = w // hv
    shapes = {
        "img/embedding/kernel": (p, p, 3, w),
        "img/embedding/bias": (w,),
        "img/pos_embedding": (1, spec_image_tokens(spec), w),
        _VIT + "LayerNorm_0/scale": (lv, w),
        _VIT + "LayerNorm_0/bias": (lv, w),
        _MHA + "query/kernel": (lv, w, hv, dh),
        _MHA + "query/bias": (lv, hv, dh),
        _MHA + "key/kernel": (lv, w, hv, dh),
        _MHA + "key/bias": (lv, hv, dh),
        _MHA + "value/kernel": (lv, w, hv, dh),
        _MHA + "value/bias": (lv, hv, dh),
        _MHA + "out/kernel": (lv, hv, dh, w),
        _MHA + "out/bias": (lv, w),
        _VIT + "LayerNorm_1/scale": (lv, w),
        _VIT + "LayerNorm_1/bias": (lv, w),
        _VIT + "MlpBlock_0/Dense_0/kernel": (lv, w, m),
        _VIT + "MlpBlock_0/Dense_0/bias": (lv, m),
        _VIT + "MlpBlock_0/Dense_1/kernel": (lv, m, w),
        _VIT + "MlpBlock_0/Dense_1/bias": (lv, w),
        "img/Transformer/encoder_norm/scale": (w,),
        "img/Transformer/encoder_norm/bias": (w,),
        "img/head/kernel": (w, d),
        "img/head/bias": (d,),
        "llm/embedder/input_embedding": (v, d),
        "llm/layers/pre_attention_norm/scale": (ll, d),
    }
    if k == n:
        shapes["llm/layers/attn/qkv_einsum/w"] = (ll, 3, n, d, h)
    else:
        shapes["llm/layers/attn/q_einsum/w"] = (ll, n, d, h)
        shapes["llm/layers/attn/kv_einsum/w"] = (ll, 2, k, d, h)
    shapes["llm/layers/attn/attn_vec_einsum/w"] = (ll, n, h, d)
    if spec["gemma2"]:
        shapes["llm/layers/post_attention_norm/scale"] = (ll, d)
    shapes["llm/layers/pre_ffw_norm/scale"] = (ll, d)
    shapes["llm/layers/mlp/gating_einsum"] = (ll, 2, d, f)
    shapes["llm/layers/mlp/linear"] = (ll, f, d)
    if spec["gemma2"]:
        shapes["llm/layers/post_ffw_norm/scale"] = (ll, d)
    shapes["llm/final_norm/scale"] = (d,)
    return shapes


# (mean, std) of every array, chosen so that (i) attention is far from uniform
# (attention logits of std ~3-4, so mask/position bugs show), (ii) Gemma 2's
# attention softcap at 50 is exercised, (iii) final logits have std ~5 so that
# greedy argmax is rarely near-tied, and (iv) the residual stream is dominated by
# the blocks rather than by the token's own (tied) embedding, so the model does
# not just echo its input token.  Arrays depend only on (spec, seed, key order).
# Gemma: small tied embedding (text embeddings ~0.1*sqrt(D) per element) but a
# large final-norm gain (1 + 5), so logits ~ 6 * sqrt(D) * 0.1 ~ 4.8 std; block
# outputs of several units per element; Gemma 2 post-norm gains ~3.
_EMB_STD, _POST_MEAN, _FINAL_MEAN, _OUT_STD, _LIN_STD = 0.1, 2.0, 5.0, 3.0, 3.0
_VIT_QK, _LLM_QK = 1.5, 2.0


def _init(key: str, spec: dict) -> tuple[float, float]:
    w, d, m, f = spec["vit_width"], spec["llm_width"], spec["vit_mlp"], spec["llm_mlp"]
    p = spec["patch"]
    nh = spec["llm_heads"] * spec["head_dim"]
    # Same attention-logit spread whatever the query scaling: std(q.k * scale) is
    # ~ std_q * std_k * D * sqrt(H) * scale, with scale = H^-0.5 or (D/N)^-0.5.
    q_scale = spec["head_dim"] ** -0.5 if spec["query_pre_attn_norm"] == "head_dim" \
        else (d // spec["llm_heads"]) ** -0.5
    qk_std = _LLM_QK / np.sqrt(d) / np.sqrt(np.sqrt(spec["head_dim"]) * q_scale)
    table = {
        # ViT. flax LayerNorm multiplies by `scale` directly: centre it on 1.
        _VIT + "LayerNorm_0/scale": (1.0, 0.1),
        _VIT + "LayerNorm_1/scale": (1.0, 0.1),
        "img/Transformer/encoder_norm/scale": (1.0, 0.1),
        "img/embedding/kernel": (0.0, 1.0 / np.sqrt(p * p * 3)),
        "img/pos_embedding": (0.0, 0.5),
        _MHA + "query/kernel": (0.0, _VIT_QK / np.sqrt(w)),
        _MHA + "key/kernel": (0.0, _VIT_QK / np.sqrt(w)),
        _MHA + "value/kernel": (0.0, 1.0 / np.sqrt(w)),
        _MHA + "out/kernel": (0.0, 1.0 / np.sqrt(w)),
        _VIT + "MlpBlock_0/Dense_0/kernel": (0.0, 1.0 / np.sqrt(w)),
        _VIT + "MlpBlock_0/Dense_1/kernel": (0.0, 1.0 / np.sqrt(m)),
        "img/head/kernel": (0.0, 1.0 / np.sqrt(w)),
        # Gemma. RMSNorm multiplies by (1 + scale).
        "llm/embedder/input_embedding": (0.0, _EMB_STD),
        "llm/layers/pre_attention_norm/scale": (0.0, 0.1),
        "llm/layers/pre_ffw_norm/scale": (0.0, 0.1),
        "llm/layers/post_attention_norm/scale": (_POST_MEAN, 0.1),
        "llm/layers/post_ffw_norm/scale": (_POST_MEAN, 0.1),
        "llm/final_norm/scale": (_FINAL_MEAN, 0.1),
        "llm/layers/attn/q_einsum/w": (0.0, qk_std),
        "llm/layers/attn/kv_einsum/w": (0.0, qk_std),
        "llm/layers/attn/qkv_einsum/w": (0.0, qk_std),
        "llm/layers/attn/attn_vec_einsum/w": (0.0, _OUT_STD / np.sqrt(nh)),
        "llm/layers/mlp/gating_einsum": (0.0, 1.0 / np.sqrt(d)),
        "llm/layers/mlp/linear": (0.0, _LIN_STD / np.sqrt(f)),
    }
    if key in table:
        return table[key]
    if key.endswith("/bias"):
        return (0.0, 0.05)
    raise KeyError(key)


def make_params(spec: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 parameters for ``spec`` in big_vision's flat layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in param_shapes(spec).items():  # fixed insertion order
        mean, std = _init(key, spec)
        out[key] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    return out


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x)
    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        # numpy cannot name bfloat16: big_vision's bf16 files hold void of itemsize 2.
        return x.astype(ml_dtypes.bfloat16).view("V2")
    raise ValueError(f"unknown dtype {dtype!r}")


def write_npz(path: str | os.PathLike, flat: dict[str, np.ndarray], dtype: str = "float32",
              prefix: str = "params/", compressed: bool = False) -> str:
    """Writes ``flat`` like a big_vision checkpoint: keys ``prefix + key``.

    ``dtype``: 'float32', 'float16' or 'bfloat16' (stored as void 'V2').
    Uses ``np.savez`` (uncompressed) unless ``compressed=True``.
    Returns the path as a string.
    """
    arrays = {prefix + k: _encode(v, dtype) for k, v in flat.items()}
    path = os.fspath(path)
    with open(path, "wb") as fh:  # a file object stops numpy from appending '.npz'
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
    return path


def read_npz(path: str | os.PathLike, prefix: str = "params/") -> dict[str, np.ndarray]:
    """Reads a big_vision-style npz back to float32, stripping ``prefix``.

    void itemsize-2 arrays are decoded as bfloat16 (the big_vision convention).
    """
    out = {}
    with np.load(os.fspath(path), allow_pickle=False) as z:
        for name in z.files:
            x = z[name]
            if x.dtype.kind == "V" and x.dtype.itemsize == 2:
                x = x.view(ml_dtypes.bfloat16)
            key = name[len(prefix):] if prefix and name.startswith(prefix) else name
            out[key] = x.astype(np.float32)
    return out
