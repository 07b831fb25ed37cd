"""transformers PaliGemma directories in and out (paligemma_jax/ckpt/hf_checkpoint.py).

The directories here are written by the real client: tiny random
`PaliGemmaForConditionalGeneration` models (tests/hf_reference.py, from the fixture specs)
saved with `save_pretrained` in several safetensors shards, float32 and bfloat16. Logits are
compared as tests/test_parity.py does: max |ours - HF| / max |HF| over image + text, HF run
with big_vision's 0-based positions and prefix-LM mask.
"""
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import traverse_util
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor

from tests import bv_fixtures, hf_reference, memprobe
from tests.numerics import rel_err
from tests.conftest import spec_config, spec_overrides
from paligemma_jax.ckpt import checkpoint, hf_checkpoint
from paligemma_jax.data import image
from paligemma_jax.model import layouts, paligemma
from paligemma_jax.ckpt.checkpoint import CheckpointError
from paligemma_jax.pipeline import PaliGemmaPipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("pg1_mqa", "pg2_gqa", "mha")  # Gemma 1 MQA, Gemma 2 GQA + softcaps, MHA (qkv_einsum)
F32_TOLERANCE = 1e-4
SHARD = "100KB"  # the fixtures are ~0.9 MB in float32: 9+ shards


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, flat_params):
  """hf_dirs(name, dtype) -> a directory written by transformers' save_pretrained."""
  root, made, models = tmp_path_factory.mktemp("hf"), {}, {}

  def get(name, dtype="float32"):
    if (name, dtype) not in made:
      if name not in models:
        models[name] = hf_reference.build_hf_paligemma(flat_params[name], bv_fixtures.SPECS[name])
      model = models[name]
      if dtype == "bfloat16":
        model = PaliGemmaForConditionalGeneration(model.config).to(torch.bfloat16)
        model.load_state_dict(models[name].state_dict())
      out = root / f"{name}_{dtype}"
      model.save_pretrained(out, max_shard_size=SHARD)
      made[(name, dtype)] = str(out)
    return made[(name, dtype)]
  return get


def _hf_model(path):
  model = PaliGemmaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
  return model.float().eval()


def _inputs(tokenizer, test_image, spec, suffix_len=6):
  tokens, mask_ar = tokenizer.prompt("caption en")
  suffix = np.random.default_rng(0).integers(4, tokenizer.vocab_size, suffix_len).astype(np.int32)
  text = np.concatenate([tokens, suffix])[None]
  mask_ar = np.concatenate([mask_ar, np.ones(suffix_len, np.int32)])[None]
  return image.preprocess(test_image, spec["image_size"])[None], text, mask_ar


def _our_logits(loaded, pixels, text, mask_ar):
  """Teacher-forced text logits (B, T, V)."""
  model = paligemma.PaliGemma(loaded.config, jnp.float32)
  return np.asarray(model.apply({"params": loaded.params}, pixels, text, mask_ar)[0])


def _hf_text_logits(model, pixels, text, mask_ar):
  return hf_reference.hf_logits(model, pixels, text, mask_ar)[:, -text.shape[1]:]


def _flat(loaded):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(loaded.params, sep="/").items()}


# ---------------------------------------------------------------------------
# In: directories written by transformers.

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_load_gives_big_vision_arrays(name, dtype, hf_dirs, flat_params):
  path = hf_dirs(name, dtype)
  with open(os.path.join(path, hf_checkpoint.INDEX)) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 3, "several shards expected"
  spec = bv_fixtures.SPECS[name]
  assert hf_checkpoint.is_hf_dir(path)
  loaded = hf_checkpoint.load_hf(path)
  assert loaded.config == spec_config(spec)
  got = _flat(loaded)
  assert set(got) == set(flat_params[name])
  cast = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  for key, want in flat_params[name].items():
    np.testing.assert_array_equal(got[key], want.astype(cast).astype(np.float32), err_msg=key)
  # The inference tree, as PaliGemmaPipeline.from_files loads it: the same arrays, per layer.
  split = hf_checkpoint.load_hf(path, dtype=jnp.bfloat16, unstack=True, out_major=True)
  again = traverse_util.flatten_dict(layouts.stacked(split.params), sep="/")
  for key, want in flat_params[name].items():
    np.testing.assert_array_equal(np.asarray(again[key]).astype(np.float32),
                                  want.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)


@pytest.mark.parametrize("name", NAMES + ("pg2_wh",))  # pg2_wh: the 28B's query scaling
def test_logits_match_transformers_on_its_own_files(name, hf_dirs, tokenizer, test_image):
  spec = bv_fixtures.SPECS[name]
  path = hf_dirs(name)
  pixels, text, mask_ar = _inputs(tokenizer, test_image, spec)
  loaded = hf_checkpoint.load_hf(path)
  assert loaded.config == spec_config(spec)  # query_pre_attn_scalar and softcaps included
  ours = _our_logits(loaded, pixels, text, mask_ar)
  ref = _hf_text_logits(_hf_model(path), pixels, text, mask_ar)
  assert ours.shape == ref.shape
  err = rel_err(ours, ref)
  print(f"{name}: max relative logit error {err:.2e}")
  assert err < F32_TOLERANCE, f"{name}: relative error {err:.2e}"
  np.testing.assert_array_equal(ours[0, -7:].argmax(-1), ref[0, -7:].argmax(-1))


def test_pipeline_greedy_tokens_match_transformers(hf_dirs, tokenizer, test_image):
  """PaliGemmaPipeline.from_files on the directory (the per-layer, out-major load)."""
  name = "pg2_gqa"
  spec = bv_fixtures.SPECS[name]
  path = hf_dirs(name)
  pipe = PaliGemmaPipeline.from_files(path, tokenizer.path, cache_dtype="float32")
  [ours] = pipe.generate([test_image], ["caption en"], max_decode_len=12)
  pixels = image.preprocess(test_image, spec["image_size"])[None]
  tokens, _ = tokenizer.prompt("caption en")
  ref = hf_reference.hf_greedy(_hf_model(path), pixels, tokens[None], 12,
                               vocab_limit=tokenizer.vocab_size)
  assert len(ref) == 12
  assert ours.tokens == ref.tolist()


def test_load_onto_a_mesh(hf_dirs, flat_params):
  """orbax_io.load (what a --mesh run calls) dispatches a directory to load_hf."""
  from paligemma_jax.ckpt import orbax_io
  from paligemma_jax import sharding
  loaded = orbax_io.load(hf_dirs("pg2_gqa"), mesh=sharding.make_mesh(1, 1))
  key = "llm/layers/attn/kv_einsum/w"
  assert loaded.params["llm"]["layers"]["attn"]["kv_einsum"]["w"].sharding.mesh.shape == {
      "data": 1, "model": 1}
  np.testing.assert_array_equal(_flat(loaded)[key], flat_params["pg2_gqa"][key])


def test_real_vocabulary_sizes(tmp_path):
  """Google's repositories: 257152 big_vision rows + `<image>` at 257152, padded to 257216."""
  spec = dict(bv_fixtures.SPECS["pg1_mqa"], vocab=257152, llm_width=16)
  flat = bv_fixtures.make_params(spec)
  out = hf_checkpoint.save_hf(tmp_path / "real", traverse_util.unflatten_dict(flat, sep="/"),
                              spec_config(spec), dtype="bfloat16")
  cfg = json.loads(open(os.path.join(out, "config.json")).read())
  assert (cfg["image_token_index"], cfg["vocab_size"], cfg["text_config"]["vocab_size"]) == (
      257152, 257216, 257216)
  back = hf_checkpoint.load_hf(out)
  assert back.config.llm.vocab_size == 257152
  emb = np.asarray(back.params["llm"]["embedder"]["input_embedding"])
  np.testing.assert_array_equal(emb, flat["llm/embedder/input_embedding"].astype(
      ml_dtypes.bfloat16).astype(np.float32))


def test_tokenizer_from_the_directory(hf_dirs, tokenizer, tmp_path):
  path = tmp_path / "d"
  shutil.copytree(hf_dirs("pg1_mqa"), path)
  (path / "tokenizer.json").write_text("{}")
  with pytest.raises(CheckpointError, match="tokenizer.json .*no tokenizer.model.*--tokenizer"):
    hf_checkpoint.tokenizer_file(path)
  with pytest.raises(CheckpointError, match="tokenizer.json"):
    PaliGemmaPipeline.from_files(str(path), None)
  shutil.copyfile(tokenizer.path, path / "tokenizer.model")
  assert hf_checkpoint.tokenizer_file(path) == str(path / "tokenizer.model")
  pipe = PaliGemmaPipeline.from_files(str(path), None)
  assert pipe.tokenizer.vocab_size == tokenizer.vocab_size


# ---------------------------------------------------------------------------
# Out: our export, read back by us and by transformers.

@pytest.mark.parametrize("name", NAMES)
def test_npz_to_hf_to_ours_gives_identical_arrays(name, ckpt_path, tmp_path, tokenizer):
  spec = bv_fixtures.SPECS[name]
  npz = checkpoint.load_npz(ckpt_path(name), overrides=spec_overrides(spec))
  # From big_vision's tree, and from the pipeline's (per layer, out-major) tree.
  inference = checkpoint.load_npz(ckpt_path(name), unstack=True, out_major=True)
  for tag, params in (("stacked", npz.params), ("inference", inference.params)):
    out = hf_checkpoint.save_hf(tmp_path / tag, params, npz.config, tokenizer.path,
                                max_shard_size=200_000)
    back = hf_checkpoint.load_hf(out)
    assert back.config == npz.config
    want, got = _flat(npz), _flat(back)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{tag} {key}")
  files = sorted(os.listdir(out))
  assert hf_checkpoint.INDEX in files and "tokenizer.model" in files and "config.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1


@pytest.mark.parametrize("name", ["pg1_mqa", "pg2_gqa"])
def test_transformers_loads_our_export_and_matches_our_logits(name, ckpt_path, tmp_path,
                                                               tokenizer, test_image):
  spec = bv_fixtures.SPECS[name]
  loaded = checkpoint.load_npz(ckpt_path(name), overrides=spec_overrides(spec))
  out = hf_checkpoint.save_hf(tmp_path / "out", loaded.params, loaded.config, tokenizer.path,
                              max_shard_size=300_000)
  model, info = PaliGemmaForConditionalGeneration.from_pretrained(
      out, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  pixels, text, mask_ar = _inputs(tokenizer, test_image, spec)
  vocab = spec["vocab"]
  ref = _hf_text_logits(model.float().eval(), pixels, text, mask_ar)
  # HF's embedding carries `<image>` and padding rows (1536 -> 1600) after big_vision's.
  assert ref.shape[-1] == 1600 and model.config.image_token_index == vocab
  ours = _our_logits(loaded, pixels, text, mask_ar)
  err = rel_err(ours, ref[..., :vocab])
  print(f"{name}: transformers on our export, max relative logit error {err:.2e}")
  assert err < F32_TOLERANCE, err
  processor = PaliGemmaProcessor.from_pretrained(out)
  assert processor.image_seq_length == bv_fixtures.spec_image_tokens(spec)
  ids = processor.tokenizer("caption en")["input_ids"]
  assert ids[-3:] == tokenizer.encode("caption en")[-3:]


def test_bfloat16_export_and_single_file(ckpt_path, tmp_path):
  loaded = checkpoint.load_npz(ckpt_path("pg2_gqa"), dtype=jnp.bfloat16)
  out = hf_checkpoint.save_hf(tmp_path / "bf16", loaded.params, loaded.config)
  assert hf_checkpoint.SINGLE in os.listdir(out) and hf_checkpoint.INDEX not in os.listdir(out)
  from safetensors import safe_open
  with safe_open(os.path.join(out, hf_checkpoint.SINGLE), framework="pt") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  back = hf_checkpoint.load_hf(out, dtype=jnp.bfloat16)
  want, got = _flat(loaded), _flat(back)
  for key in want:
    assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key
  with pytest.raises(CheckpointError, match="already exists"):
    hf_checkpoint.save_hf(out, loaded.params, loaded.config)


# ---------------------------------------------------------------------------
# Broken directories: each error names the file and the tensor.

@pytest.fixture
def broken(hf_dirs, tmp_path):
  path = tmp_path / "broken"
  shutil.copytree(hf_dirs("pg2_gqa"), path)
  return path


def _index(path):
  with open(path / hf_checkpoint.INDEX) as f:
    return json.load(f)


def _config(path, edit):
  cfg = json.loads((path / "config.json").read_text())
  edit(cfg)
  (path / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(broken):
  wm = _index(broken)["weight_map"]
  name = "language_model.model.layers.1.mlp.down_proj.weight"
  os.remove(broken / wm[name])
  with pytest.raises(CheckpointError) as e:
    hf_checkpoint.load_hf(broken)
  msg = str(e.value)
  assert hf_checkpoint.INDEX in msg and wm[name] in msg and "missing" in msg
  assert "language_model.model." in msg, msg


def test_index_names_a_tensor_no_shard_has(broken):
  index = _index(broken)
  shard = next(iter(index["weight_map"].values()))
  index["weight_map"]["language_model.model.layers.7.mlp.up_proj.weight"] = shard
  (broken / hf_checkpoint.INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: lists tensor "
                     r"'language_model\.model\.layers\.7\.mlp\.up_proj\.weight' in shard "
                     f"'{shard}'.*no such tensor"):
    hf_checkpoint.load_hf(broken)


def test_index_names_a_tensor_the_model_lacks(broken):
  """A tensor present in a shard but not in PaliGemma (e.g. SigLIP's pooling head)."""
  from safetensors.numpy import save_file
  index = _index(broken)
  save_file({"vision_tower.vision_model.head.probe": np.zeros((2, 32), np.float32)},
            str(broken / "extra.safetensors"))
  index["weight_map"]["vision_tower.vision_model.head.probe"] = "extra.safetensors"
  (broken / hf_checkpoint.INDEX).write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=r"extra\.safetensors: tensor 'vision_tower\."
                     r"vision_model\.head\.probe' \(shape \(2, 32\)\) is not a parameter"):
    hf_checkpoint.load_hf(broken)


@pytest.mark.parametrize("edit, tensor, shape", [
    (lambda c: c["text_config"].update(num_attention_heads=8), "self_attn.q_proj.weight",
     "(64, 64)"),
    (lambda c: c["text_config"].update(intermediate_size=256), "mlp.", "(128, 64)"),
    (lambda c: c["vision_config"].update(patch_size=16), "patch_embedding.weight",
     "(32, 3, 14, 14)"),
])
def test_config_and_shapes_disagree(broken, edit, tensor, shape):
  _config(broken, edit)
  with pytest.raises(CheckpointError) as e:
    hf_checkpoint.load_hf(broken)
  msg = str(e.value)
  assert ".safetensors: tensor '" in msg and tensor in msg and shape in msg, msg
  assert "config.json" in msg and "disagree" in msg, msg


def test_not_a_paligemma_config(broken):
  _config(broken, lambda c: c.update(model_type="llava"))
  with pytest.raises(CheckpointError,
                     match=r"config\.json: model_type is 'llava', not 'paligemma'"):
    hf_checkpoint.load_hf(broken)
  _config(broken, lambda c: c.update(model_type="paligemma", text_config=dict(
      c["text_config"], model_type="gemma3")))
  with pytest.raises(CheckpointError, match="text_config.model_type is 'gemma3'"):
    hf_checkpoint.load_hf(broken)


def test_pytorch_bin_only_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(CheckpointError, match="pytorch_model.bin: PyTorch pickles are not read"):
    hf_checkpoint.load_hf(tmp_path)


# ---------------------------------------------------------------------------
# The command line: --ckpt=DIR without --tokenizer, --save_hf.

def test_main_reads_and_writes_hf_directories(hf_dirs, tokenizer, tmp_path, test_image):
  path = tmp_path / "hf"
  shutil.copytree(hf_dirs("pg2_gqa"), path)
  shutil.copyfile(tokenizer.path, path / "tokenizer.model")
  img = tmp_path / "img.png"
  from PIL import Image
  Image.fromarray(test_image).save(img)
  out, saved = tmp_path / "answer.json", tmp_path / "saved"
  env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
  r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), f"--ckpt={path}",
                      f"--image={img}", "--max_decode_len=6", f"--output_json={out}",
                      f"--save_hf={saved}"], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr
  assert f"wrote {saved}" in r.stdout
  pipe = PaliGemmaPipeline.from_files(str(path), None)
  [api] = pipe.generate([image.load_image(str(img))], ["caption en"], max_decode_len=6)
  assert json.loads(out.read_text())["tokens"] == api.tokens
  assert (saved / "tokenizer.model").read_bytes() == (path / "tokenizer.model").read_bytes()
  want, got = _flat(hf_checkpoint.load_hf(path)), _flat(hf_checkpoint.load_hf(saved))
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---------------------------------------------------------------------------
# Memory: a bfloat16 directory written with safetensors itself, loaded in bfloat16.

_LOAD = """
    split = sys.argv[2] == 'inference'
    params = hf_checkpoint.load_hf(sys.argv[1], dtype=jnp.bfloat16, unstack=split,
                                   out_major=split).params
"""


def test_load_peak_host_memory_under_1_3x(tmp_path):
  from safetensors.torch import save_file
  spec = dict(bv_fixtures.SPECS["pg1_mqa"], vocab=200_000, llm_width=256, llm_mlp=16384,
              llm_depth=4)
  cfg = hf_reference.hf_config(spec)
  path = tmp_path / "big"
  cfg.save_pretrained(path)
  with torch.device("meta"):
    shapes = {k: v.shape for k, v in PaliGemmaForConditionalGeneration(cfg).state_dict().items()
              if k != "lm_head.weight"}
  gen = torch.Generator().manual_seed(0)
  names = sorted(shapes)
  shards = [names[:len(names) // 2], names[len(names) // 2:]]
  weight_map, size = {}, 0
  for j, part in enumerate(shards):
    file = f"model-{j + 1:05d}-of-00002.safetensors"
    tensors = {k: torch.randn(shapes[k], generator=gen).to(torch.bfloat16) for k in part}
    save_file(tensors, str(path / file), metadata={"format": "pt"})
    size += sum(t.numel() * 2 for t in tensors.values())
    weight_map.update({k: file for k in part})
    del tensors
  (path / hf_checkpoint.INDEX).write_text(json.dumps({"weight_map": weight_map}))
  assert size > 200e6
  for mode in ("stacked", "inference"):
    peak = memprobe.peak_anonymous_bytes(
        tmp_path, "from paligemma_jax.ckpt import hf_checkpoint", _LOAD, path, mode)
    print(f"{mode}: peak anonymous memory {peak / size:.2f}x the {size / 1e6:.0f} MB directory")
    assert peak < 1.3 * size, f"{mode}: peak {peak / size:.2f}x the directory"


def test_export_refuses_what_transformers_cannot_express(ckpt_path, tmp_path):
  """transformers' Gemma 1 has no softcaps: such a model is refused before anything is written."""
  loaded = checkpoint.load_npz(ckpt_path("pg1_mqa"), overrides={"final_logits_softcap": 30.0})
  with pytest.raises(CheckpointError, match="has no softcaps"):
    hf_checkpoint.save_hf(tmp_path / "out", loaded.params, loaded.config)
  assert os.listdir(tmp_path) == []
