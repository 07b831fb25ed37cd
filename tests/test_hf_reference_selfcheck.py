"""Self-checks of the test fixtures and of the PyTorch (HF) reference.

These prove that ``tests/hf_reference.py`` computes what big_vision computes for
the arrays of ``tests/bv_fixtures.py``: an independent float64 numpy forward of
the big_vision semantics (ViT + projector + Gemma 1/2 with the prefix-LM mask)
must match HF's logits, HF's ``generate`` must agree with ``hf_logits``, and the
mask must really be the prefix-LM one.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
import torch

from tests import bv_fixtures as F
from tests import hf_reference as R
from tests.numerics import rel_err, softmax

SPEC_NAMES = list(F.SPECS)
VIT = "img/Transformer/encoderblock/"
MHA = VIT + "MultiHeadDotProductAttention_0/"


# --------------------------------------------------------------------------
# Independent numpy (float64) forward of the big_vision model.

def es(eqn, *xs):
    return np.einsum(eqn, *xs, optimize=True)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_vit(p, spec, images):
    """ViT (flax conv patchify, pre-LN blocks, no pooling) + linear head."""
    p = {k: v.astype(np.float64) for k, v in p.items()}
    b, s, _, _ = images.shape
    ps, w = spec["patch"], spec["vit_width"]
    g = s // ps
    patches = images.astype(np.float64).reshape(b, g, ps, g, ps, 3)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, ps * ps * 3)
    x = patches @ p["img/embedding/kernel"].reshape(ps * ps * 3, w) + p["img/embedding/bias"]
    x = x + p["img/pos_embedding"][0]
    dh = w // spec["vit_heads"]
    for i in range(spec["vit_depth"]):
        y = layer_norm(x, p[VIT + "LayerNorm_0/scale"][i], p[VIT + "LayerNorm_0/bias"][i])
        q, k, v = (es("bnw,whd->bnhd", y, p[MHA + f"{n}/kernel"][i]) + p[MHA + f"{n}/bias"][i]
                   for n in ("query", "key", "value"))
        att = softmax(es("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh))
        o = es("bhqk,bkhd->bqhd", att, v)
        x = x + es("bqhd,hdw->bqw", o, p[MHA + "out/kernel"][i]) + p[MHA + "out/bias"][i]
        y = layer_norm(x, p[VIT + "LayerNorm_1/scale"][i], p[VIT + "LayerNorm_1/bias"][i])
        h = gelu_tanh(y @ p[VIT + "MlpBlock_0/Dense_0/kernel"][i] + p[VIT + "MlpBlock_0/Dense_0/bias"][i])
        x = x + h @ p[VIT + "MlpBlock_0/Dense_1/kernel"][i] + p[VIT + "MlpBlock_0/Dense_1/bias"][i]
    x = layer_norm(x, p["img/Transformer/encoder_norm/scale"], p["img/Transformer/encoder_norm/bias"])
    return x @ p["img/head/kernel"] + p["img/head/bias"]


def rms_norm(x, scale):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * (1.0 + scale)


def rope(x, positions):  # x (B, T, N, H), positions (B, T); halves-split rotation
    h = x.shape[-1]
    timescale = 10_000.0 ** (2.0 * np.arange(h // 2) / h)
    rad = (positions[..., None] / timescale)[:, :, None, :]
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return np.concatenate([x1 * np.cos(rad) - x2 * np.sin(rad), x2 * np.cos(rad) + x1 * np.sin(rad)], -1)


def np_paligemma(p, spec, images, ids, mask_ar, *, attn_softcap="spec", final_softcap="spec",
                 query_norm="spec"):
    """Full logits (B, Ni + T, V) of big_vision's PaliGemma (float64)."""
    attn_softcap = spec["attn_logits_softcap"] if attn_softcap == "spec" else attn_softcap
    final_softcap = spec["final_logits_softcap"] if final_softcap == "spec" else final_softcap
    query_norm = spec["query_pre_attn_norm"] if query_norm == "spec" else query_norm
    img = np_vit(p, spec, images)
    p = {k: v.astype(np.float64) for k, v in p.items()}
    d, n, kh = spec["llm_width"], spec["llm_heads"], spec["llm_kv_heads"]
    emb = p["llm/embedder/input_embedding"]
    x = np.concatenate([img, emb[ids] * np.sqrt(d)], axis=1)  # image tokens are NOT scaled
    b, s, _ = x.shape
    full_ar = np.concatenate([np.zeros((b, img.shape[1]), np.int64), mask_ar], axis=1)
    cum = np.cumsum(full_ar, axis=1)
    allowed = cum[:, None, :] <= cum[:, :, None]  # [b, q, k]
    positions = np.broadcast_to(np.arange(s, dtype=np.float64), (b, s))
    scale = spec["head_dim"] ** -0.5 if query_norm == "head_dim" else (d // n) ** -0.5
    lay = "llm/layers/"
    for i in range(spec["llm_depth"]):
        y = rms_norm(x, p[lay + "pre_attention_norm/scale"][i])
        if kh == n:
            q, k, v = es("btd,cndh->cbtnh", y, p[lay + "attn/qkv_einsum/w"][i])
        else:
            q = es("btd,ndh->btnh", y, p[lay + "attn/q_einsum/w"][i])
            k, v = es("btd,ckdh->cbtkh", y, p[lay + "attn/kv_einsum/w"][i])
        q = rope(q, positions) * scale
        k = rope(k, positions)
        k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)  # head j uses kv j // G
        logits = es("btnh,bsnh->bnts", q, k)
        if attn_softcap:
            logits = np.tanh(logits / attn_softcap) * attn_softcap
        logits = np.where(allowed[:, None], logits, -np.inf)
        enc = es("bnts,bsnh->btnh", softmax(logits), v)
        a = es("btnh,nhd->btd", enc, p[lay + "attn/attn_vec_einsum/w"][i])
        if spec["gemma2"]:
            a = rms_norm(a, p[lay + "post_attention_norm/scale"][i])
        x = x + a
        y = rms_norm(x, p[lay + "pre_ffw_norm/scale"][i])
        gating = p[lay + "mlp/gating_einsum"][i]
        h = (gelu_tanh(y @ gating[0]) * (y @ gating[1])) @ p[lay + "mlp/linear"][i]
        if spec["gemma2"]:
            h = rms_norm(h, p[lay + "post_ffw_norm/scale"][i])
        x = x + h
    x = rms_norm(x, p["llm/final_norm/scale"])
    logits = x @ emb.T
    if final_softcap:
        logits = np.tanh(logits / final_softcap) * final_softcap
    return logits


# --------------------------------------------------------------------------
# Shared inputs.

@functools.lru_cache(maxsize=None)
def params(name, seed=0):
    return F.make_params(F.SPECS[name], seed)


@functools.lru_cache(maxsize=None)
def model(name):
    return R.build_hf_paligemma(params(name), F.SPECS[name])


def images(name, batch=1, seed=0):
    s = F.SPECS[name]["image_size"]
    return np.random.default_rng(100 + seed).uniform(-1, 1, (batch, s, s, 3)).astype(np.float32)


# bos + 5 prefix tokens + separator ("\n" is 108 in the real tokenizer) + 4 suffix tokens.
IDS = np.array([[2, 700, 31, 1402, 955, 64, 108, 1200, 5, 1535, 77]])
MASK_AR = np.array([[0] * 7 + [1] * 4])


# --------------------------------------------------------------------------
# Fixtures.

def test_specs_and_params_layout():
    for name, spec in F.SPECS.items():
        assert set(spec) == set(F.SPEC_KEYS), name
        assert spec["vocab"] >= 1400 and spec["patch"] == 14
        p = F.make_params(spec, seed=0)
        assert {k: v.shape for k, v in p.items()} == F.param_shapes(spec)
        assert all(v.dtype == np.float32 for v in p.values())
        assert not any(k.startswith("params/") for k in p)
        fused = "llm/layers/attn/qkv_einsum/w" in p
        assert fused == (spec["llm_kv_heads"] == spec["llm_heads"]), name
        assert ("llm/layers/attn/q_einsum/w" in p) != fused
        assert ("llm/layers/post_ffw_norm/scale" in p) == spec["gemma2"]
        assert p["img/pos_embedding"].shape[1] == F.spec_image_tokens(spec)
        q = F.make_params(spec, seed=0)
        r = F.make_params(spec, seed=1)
        assert all(np.array_equal(p[k], q[k]) for k in p)
        assert not np.array_equal(p["llm/embedder/input_embedding"], r["llm/embedder/input_embedding"])
    assert F.spec_image_tokens(F.SPECS["pg1_448"]) == 1024
    assert F.spec_image_tokens(F.SPECS["pg1_mqa"]) == 256


@pytest.mark.parametrize("compressed", [False, True])
def test_write_npz_roundtrip(tmp_path, compressed):
    p = params("pg2_gqa")
    for dtype in ("float32", "float16", "bfloat16"):
        path = F.write_npz(tmp_path / f"ckpt_{dtype}.npz", p, dtype=dtype, compressed=compressed)
        assert path.endswith(f"ckpt_{dtype}.npz")
        with np.load(path) as z:
            assert sorted(z.files) == sorted("params/" + k for k in p)
            raw = z["params/llm/embedder/input_embedding"]
        if dtype == "bfloat16":
            assert raw.dtype.kind == "V" and raw.dtype.itemsize == 2  # as in big_vision's bf16 files
            want = p["llm/embedder/input_embedding"].astype(ml_dtypes.bfloat16)
            assert np.array_equal(raw.view(ml_dtypes.bfloat16), want)
        else:
            assert raw.dtype == np.dtype(dtype)
        back = F.read_npz(path)
        assert set(back) == set(p)
        tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
        for k in p:
            assert back[k].shape == p[k].shape
            np.testing.assert_allclose(back[k], p[k], rtol=tol, atol=tol * 1e-2)
    with open(F.write_npz(tmp_path / "noprefix.npz", p, prefix=""), "rb") as fh:
        assert fh.read(2) == b"PK"
    with np.load(tmp_path / "noprefix.npz") as z:
        assert "img/head/kernel" in z.files


# --------------------------------------------------------------------------
# Reference model.

@pytest.mark.parametrize("name", SPEC_NAMES)
def test_mapping_loads_strictly(name):
    spec = F.SPECS[name]
    m = model(name)  # build_hf_paligemma asserts strict loading itself
    sd = R.bv_to_hf_state_dict(params(name), spec)
    assert set(sd) == set(m.state_dict())
    assert m.config.text_config.vocab_size == spec["vocab"]
    assert m.config.image_token_id == spec["vocab"]
    assert m.config.text_config.num_image_tokens == F.spec_image_tokens(spec)
    assert not m.training


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_image_features_match_numpy(name):
    spec = F.SPECS[name]
    batch = 1 if spec["image_size"] > 224 else 2  # keep the numpy side fast
    x = images(name, batch=batch)
    hf = R.hf_image_features(model(name), x)
    ref = np_vit(params(name), spec, x)
    assert hf.shape == (batch, F.spec_image_tokens(spec), spec["llm_width"])
    assert rel_err(hf, ref) < 1e-5


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_logits_match_numpy(name):
    """End-to-end: mapping, positions, GQA grouping, softcaps, prefix-LM mask."""
    spec = F.SPECS[name]
    # Row 0: prefix + suffix; row 1: a general mask_ar (several cumsum groups).
    ids = np.concatenate([IDS, IDS[:, ::-1]], axis=0)
    mask_ar = np.array([[0] * 7 + [1] * 4, [0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 1]])
    if spec["image_size"] > 224:  # keep the numpy side fast
        ids, mask_ar = ids[:1], mask_ar[:1]
    x = images(name, batch=len(ids))
    hf = R.hf_logits(model(name), x, ids, mask_ar)
    ref = np_paligemma(params(name), spec, x, ids, mask_ar)
    assert hf.shape == (len(ids), F.spec_image_tokens(spec) + ids.shape[1], spec["vocab"])
    # float32 vs float64: ~1e-5 of max|logit| with these (sharp-attention) weights.
    assert rel_err(hf, ref) < 5e-5
    assert 2.0 < ref[:, -ids.shape[1]:].std() < 10.0  # well-spread logits


def test_parameters_exercise_softcaps_and_query_scaling():
    """The fixtures are strong enough that dropping a softcap or using the wrong
    query scaling changes logits far beyond a float32 port's error."""
    ids, mask_ar = IDS, MASK_AR
    name = "pg2_gqa"
    spec = F.SPECS[name]
    x = images(name)
    ref = np_paligemma(params(name), spec, x, ids, mask_ar)
    for kw in (dict(attn_softcap=None), dict(final_softcap=None)):
        assert rel_err(np_paligemma(params(name), spec, x, ids, mask_ar, **kw), ref) > 1e-3, kw
    spec = F.SPECS["pg2_wh"]
    x = images("pg2_wh")
    ref = np_paligemma(params("pg2_wh"), spec, x, ids, mask_ar)
    wrong = np_paligemma(params("pg2_wh"), spec, x, ids, mask_ar, query_norm="head_dim")
    assert rel_err(wrong, ref) > 1e-2


@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa", "mha"])
def test_greedy_agrees_with_logits(name):
    m = model(name)
    x = images(name)
    prompt = IDS[:, :7]
    toks, scores = R.hf_greedy(m, x, prompt, max_new_tokens=8, eos_id=1, return_scores=True)
    assert toks.ndim == 1 and len(toks) == len(scores) == 8  # eos (1) is not produced here
    # First step == last position of the fully bidirectional prompt.
    full = R.hf_logits(m, x, prompt, np.zeros_like(prompt))
    np.testing.assert_allclose(scores[0], full[0, -1], rtol=0, atol=1e-4)
    assert scores[0].argmax() == full[0, -1].argmax() == toks[0]
    # All steps == teacher-forced prefix-LM logits with the generated tokens causal.
    seq = np.concatenate([prompt, toks[None, :-1]], axis=1)
    mask_ar = np.concatenate([np.zeros_like(prompt), np.ones((1, len(toks) - 1), np.int64)], axis=1)
    tf = R.hf_logits(m, x, seq, mask_ar)[0, -len(toks):]
    np.testing.assert_allclose(scores, tf, rtol=0, atol=1e-4)
    assert np.array_equal(tf.argmax(-1), toks)
    assert len(set(toks.tolist())) > 1, "degenerate fixture: greedy repeats one token"
    # eos handling: stop at (and drop) eos.
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])
    short = R.hf_greedy(m, x, prompt, max_new_tokens=8, eos_id=int(toks[k]))
    assert np.array_equal(short, toks[:k])


def test_greedy_vocab_limit():
    m, x, prompt = model("pg2_gqa"), images("pg2_gqa"), IDS[:, :7]
    full = R.hf_greedy(m, x, prompt, max_new_tokens=8)
    limit = int(full.max())  # forbid at least one token greedy would emit
    toks, scores = R.hf_greedy(m, x, prompt, max_new_tokens=8, return_scores=True, vocab_limit=limit)
    assert len(toks) == 8 and toks.max() < limit
    assert np.array_equal(toks, scores[:, :limit].argmax(-1))  # scores stay the raw logits
    assert scores.shape[1] == F.SPECS["pg2_gqa"]["vocab"]


def test_greedy_positions_are_zero_based():
    """hf_greedy must feed 0-based positions (HF's default for PaliGemma is 1-based)."""
    m = model("pg1_mqa")
    seen = []
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    try:
        R.hf_greedy(m, images("pg1_mqa"), IDS[:, :7], max_new_tokens=3, eos_id=1)
    finally:
        hook.remove()
    n = F.spec_image_tokens(F.SPECS["pg1_mqa"]) + 7
    assert [s.tolist() for s in seen] == [[list(range(n + i))] for i in range(3)]
    print(f"hf_greedy ran on transformers {R.TRANSFORMERS_VERSION}, torch {torch.__version__}")


def test_prefix_lm_mask_is_applied():
    name = "pg1_mqa"
    m, x = model(name), images(name)
    n_img = F.spec_image_tokens(F.SPECS[name])
    base = R.hf_logits(m, x, IDS, MASK_AR)[0]
    # Changing a suffix token (text index 8) changes logits only at and after it.
    ids = IDS.copy()
    ids[0, 8] = 17
    alt = R.hf_logits(m, x, ids, MASK_AR)[0]
    same = np.abs(alt - base).max(-1) < 1e-6
    assert same[: n_img + 8].all() and not same[n_img + 8:].any()
    # Changing a prefix token (text index 4) changes logits at EARLIER positions
    # too (image tokens and bos): the prefix is bidirectional.
    ids = IDS.copy()
    ids[0, 4] = 17
    alt = R.hf_logits(m, x, ids, MASK_AR)[0]
    diff = np.abs(alt - base).max(-1)
    assert (diff[: n_img + 4] > 1e-4).all() and (diff[n_img + 4:] > 1e-4).all()
    # ... which a causal mask would not do.
    causal = np.ones_like(MASK_AR)
    a = R.hf_logits(m, x, IDS, causal)[0]
    b = R.hf_logits(m, x, ids, causal)[0]
    assert np.abs(a - b).max(-1)[n_img: n_img + 4].max() < 1e-6
    # And the mask matters vs. fully bidirectional.
    assert np.abs(R.hf_logits(m, x, IDS, np.zeros_like(MASK_AR))[0] - base)[n_img:].max() > 1e-2


@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa"])
def test_only_text_embeddings_are_scaled(name):
    spec = F.SPECS[name]
    m, x = model(name), images(name)
    captured = {}

    def grab(mod, args, kw):
        captured["emb"] = kw["inputs_embeds"].detach().numpy().copy()

    hook = m.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        R.hf_logits(m, x, IDS, MASK_AR)
    finally:
        hook.remove()
    emb = captured["emb"][0]
    n_img = F.spec_image_tokens(spec)
    table = params(name)["llm/embedder/input_embedding"]
    want_text = table[IDS[0]] * np.float32(np.sqrt(spec["llm_width"]))
    np.testing.assert_allclose(emb[n_img:], want_text, rtol=1e-6, atol=1e-6)
    want_img = np_vit(params(name), spec, x)[0]
    assert rel_err(emb[:n_img], want_img) < 1e-5  # unscaled image features


def test_gemma2_reference_refuses_transformers_without_the_final_softcap(monkeypatch):
    """transformers 5.17-5.22 build a PaliGemma that skips Gemma 2's final-logit softcap (this
    self-check then fails by ~20%); such a version is refused for Gemma 2 specs only."""
    monkeypatch.setattr(R.transformers, "__version__", "5.22.0")
    R.hf_config(F.SPECS["pg1_mqa"])
    with pytest.raises(RuntimeError, match=r"transformers >= 5\.23 \(found 5\.22\.0\)"):
        R.hf_config(F.SPECS["pg2_gqa"])
    monkeypatch.setattr(R.transformers, "__version__", "5.23.0")
    assert R.hf_config(F.SPECS["pg2_gqa"]).text_config.final_logit_softcapping == 30.0
