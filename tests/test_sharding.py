"""Meshes ('data', 'model') on 8 CPU devices: parameter rules, sharded decode equal to one device,
and the collectives XLA puts inside the decode while_loop.

XLA fixes the number of CPU devices when JAX starts, so the `check_*` functions run in one
child pytest with XLA_FLAGS=--xla_force_host_platform_device_count=8 (`run_on_8_devices`);
this process reports each of them as `test_on_8_devices[name]`.
"""
import re

import numpy as np
import pytest

from tests import bv_fixtures
from tests.conftest import spec_config
from tests.multidevice import (INNER, MESH_SPEC, export_checks, make_outer_test,
                               report_ids)

# ---------------------------------------------------------------------------
# What runs on 8 devices.

MESHES = ("1x8", "8x1", "2x4")
BATCH = 8
MAX_LEN = 8


@pytest.fixture(scope="module")
def mesh_params():
  from flax import traverse_util
  return traverse_util.unflatten_dict(bv_fixtures.make_params(MESH_SPEC, seed=5), sep="/")


@pytest.fixture(scope="module")
def requests(test_image):
  rng = np.random.default_rng(0)
  images = [test_image, test_image[::-1], test_image[:, ::-1]] + [
      rng.integers(0, 256, (40 + 7 * i, 50, 3)).astype(np.uint8) for i in range(BATCH - 3)]
  prompts = ["caption en", "detect cat ; dog", "ocr", "answer en what is this ?",
             "describe en", "caption es", "segment cat", "question en where ?"]
  return images, prompts


def _pipe(params, tokenizer, mesh=None):
  from paligemma_jax.pipeline import PaliGemmaPipeline
  return PaliGemmaPipeline(spec_config(MESH_SPEC), params, tokenizer, cache_dtype="float32",
                           mesh=mesh)


@pytest.fixture(scope="module")
def pipes(mesh_params, tokenizer):
  """mesh name -> pipeline on that mesh (one per mesh: its compiled functions are shared)."""
  made = {}

  def get(name):
    if name not in made:
      made[name] = _pipe(mesh_params, tokenizer, _mesh(name))
    return made[name]
  return get


@pytest.fixture(scope="module")
def single(mesh_params, tokenizer, requests):
  """One device: the reference answers and prefill logits."""
  import jax
  pipe = _pipe(jax.device_put(mesh_params, jax.devices()[0]), tokenizer)
  out = pipe.generate(*requests, max_decode_len=MAX_LEN)
  return out, _prefill_logits(pipe, requests)


def _prefill_logits(pipe, requests):
  from paligemma_jax.sample import decode
  batch = pipe.make_batch(*requests)
  b, t = batch["text"].shape
  prefill, _, _ = pipe._functions(b, t, MAX_LEN, ("sample", decode.Sampler()), ())
  if pipe.mesh is not None:
    from paligemma_jax import sharding
    rows = sharding.batch_sharding(b, pipe.mesh)
    batch = {k: sharding.put_global(v, rows) for k, v in batch.items()}
  logits, *_ = prefill(pipe.params, batch["images"], batch["text"], batch["input_mask"],
                       batch["mask_ar"])
  return np.asarray(logits)


def _mesh(name):
  from paligemma_jax import sharding
  return sharding.make_mesh(*sharding.parse_mesh(name))


def check_eight_devices():
  import jax
  assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("mesh_name", MESHES)
def check_params_follow_rules(mesh_name, mesh_params):
  """Every array lands with its rule's spec; each device holds 1/N of each split array."""
  import jax
  from flax import traverse_util
  from paligemma_jax import sharding
  mesh = _mesh(mesh_name)
  placed = traverse_util.flatten_dict(sharding.shard_params(mesh_params, mesh), sep="/")
  expected_per_device = 0
  for key, x in placed.items():
    spec = sharding.param_spec(key, x.shape, mesh)
    assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), x.ndim), key
    parts = int(np.prod([mesh.shape[a] for a in spec if a is not None]))
    for shard in x.addressable_shards:
      assert shard.data.size * parts == x.size, (key, shard.data.shape, x.shape)
    expected_per_device += x.nbytes // parts
  per_device = sharding.per_device_bytes(placed)
  assert len(per_device) == 8 and set(per_device.values()) == {expected_per_device}
  if mesh_name == "2x4":  # the table in sharding.py, spelled out
    want = {"llm/layers/attn/q_einsum/w": (None, "model", "data"),
            "llm/layers/attn/kv_einsum/w": (None, None, "model", "data"),
            "llm/layers/attn/attn_vec_einsum/w": (None, "model", None, "data"),
            "llm/layers/mlp/gating_einsum": (None, None, "data", "model"),
            "llm/layers/mlp/linear": (None, "model", "data"),
            "llm/embedder/input_embedding": ("model", "data"),
            "llm/final_norm/scale": (),
            "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel":
                (None, "data", "model"),
            "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": (None, "model", "data")}
    for key, spec in want.items():
      assert tuple(placed[key].sharding.spec) == spec, (key, placed[key].sharding.spec)
  if mesh_name == "1x8":  # K=4 does not divide 8: replicated on 'model', D still on 'data'
    assert tuple(placed["llm/layers/attn/kv_einsum/w"].sharding.spec) == (None, None, None, "data")


@pytest.mark.parametrize("mesh_name", MESHES)
def check_sharded_decode_matches_one_device(mesh_name, pipes, requests, single):
  """Same tokens as one device; prefill logits within 1e-5 relative; log-probabilities within
  5e-5 (float32 sums over the width split 8 ways, in another order: up to 1.6e-5 seen)."""
  ref, ref_logits = single
  pipe = pipes(mesh_name)
  out = pipe.generate(*requests, max_decode_len=MAX_LEN)
  assert [o.tokens for o in out] == [o.tokens for o in ref]
  assert sum(len(o.tokens) for o in out) >= BATCH  # something was generated
  logits = _prefill_logits(pipe, requests)
  rel = np.abs(logits - ref_logits).max() / np.abs(ref_logits).max()
  assert rel < 1e-5, rel
  for o, r in zip(out, ref):
    np.testing.assert_allclose(o.logprobs, r.logprobs, rtol=0, atol=5e-5)


# -- HLO of the decode loop.

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")


def _computations(hlo: str):
  comps, entry, current = {}, None, None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None and line.strip():
      comps[current].append(line.strip())
  return comps, entry


def _closure(comps, root):
  """`root` and every computation it calls (fusions, reductions, nested loops, branches)."""
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:  # key=%name, or key={%a, %b} (a list only inside braces)
      for m in re.finditer(r"\b(?:calls|to_apply|body|condition|branch_computations)="
                           r"(?:\{([^}]*)\}|%?([\w.\-]+))", line):
        todo += [c.strip().lstrip("%") for c in (m.group(1) or m.group(2)).split(",")]
  return seen


def _shapes(text: str):
  """Array shapes in an HLO result type: 'f32[2,1,64]{2,1,0}' or a tuple of them."""
  return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\w+\[([\d,]*)\]",
                                                                             text)]


def _collectives(lines):
  found = []
  for line in lines:
    m = re.match(r"(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\(", line)
    if m and m.group(2).replace("-start", "").replace("-done", "") in COLLECTIVES:
      found.append((m.group(2), _shapes(m.group(1))))
  return found


def entry_collectives(hlo: str):
  """[(op, [result shapes])] at the top level of the compiled decode, outside any loop: where
  XLA hoists loop-invariant work, e.g. gathering layer weights once before the loop."""
  comps, entry = _computations(hlo)
  return _collectives(comps[entry])


def decode_loop_collectives(hlo: str):
  """-> (shape of the decode while's carry, [(op, [result shapes]) inside its body])."""
  comps, entry = _computations(hlo)
  loops = [line for line in comps[entry] if re.search(r"\swhile\(", line)]
  assert loops, "no while loop at the top of the compiled decode"
  # The decode loop is the top-level while with the largest body (others: rng splitting).
  loop = max(loops, key=lambda l: len(_closure(comps, re.search(r"body=%?([\w.\-]+)", l).group(1))))
  body = re.search(r"body=%?([\w.\-]+)", loop).group(1)
  found = [c for name in _closure(comps, body) for c in _collectives(comps[name])]
  carry = loop.split("while(")[0]
  return _shapes(carry), found


def _shard_shapes(shape, mesh):
  """Every shape `shape` takes when any of its dims is split by data, model or both."""
  factors = sorted({1, mesh.shape["data"], mesh.shape["model"],
                    mesh.shape["data"] * mesh.shape["model"]})
  out = {()}
  for d in shape:
    out = {s + (d // f,) for s in out for f in factors if d % f == 0}
  return out


def loop_violations(pipe, hlo: str, batch: int, width: int) -> list:
  """What a compiled decode loop must not do; [] when it is clean.

  Allowed inside the while body: all-reduce of partial sums (a contraction over a split
  axis: the model axis' heads/mlp/vocab, and the data axis' D, which the weight-stationary
  step contracts where the weights lie), all-gather / all-to-all of activations (a step's q
  heads, the sampled token per row, per-shard argmax candidates). Forbidden (a bug): any
  collective whose result has the shape of a parameter or of the KV cache, whole or as a
  shard (FSDP gathers of weights every token, cache re-layouts; an all-reduce sums partial
  products and moves no stored array, so a shape it shares with a weight shard is a
  coincidence and only its size is bounded), or more elements than the
  largest activation of a step (the logits of the whole batch). Also forbidden before the
  loop: a parameter- or cache-shaped collective there is XLA hoisting the same gathers out of
  the loop (the language model's layers are loop-invariant arrays), which holds gathered
  weights on every device for the whole decode. And the loop must carry the cache in its
  sharded per-device block.
  """
  from flax import traverse_util
  from paligemma_jax import sharding
  mesh, cfg = pipe.mesh, pipe.config.llm
  carry, found = decode_loop_collectives(hlo)
  cache = (cfg.depth, batch, pipe.config.num_image_tokens + width + MAX_LEN, cfg.num_kv_heads,
           cfg.head_dim)
  weights = traverse_util.flatten_dict(pipe.params["llm"], sep="/")
  forbidden = set()
  # One layer's block: a per-layer array (`layers_i/`) whole, a stacked one (`layers/`) sliced.
  blocks = [x.shape[1:] if k.startswith("layers/") else x.shape for k, x in weights.items()]
  for x, block in zip(weights.values(), blocks):
    forbidden |= _shard_shapes(x.shape, mesh) | _shard_shapes(block, mesh)
  forbidden |= _shard_shapes(cache, mesh) | _shard_shapes(cache[1:], mesh)
  limit = batch * cfg.vocab_size
  smallest_block = min([int(np.prod(b)) for k, b in zip(weights, blocks)
                        if k.startswith("layers") and len(b) > 1] + [int(np.prod(cache[1:]))])
  assert smallest_block > limit  # the size rule alone separates weights from activations

  bad = []
  if not found:
    bad.append("no collectives at all: the loop is not partitioned")
  for op, shapes in found:
    kind = op.replace("-start", "").replace("-done", "")
    if kind not in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter",
                    "collective-permute"):
      bad.append(f"{op} in the loop")
    for shape in shapes:
      if shape in forbidden and kind != "all-reduce":
        bad.append(f"{op} of a parameter/cache-shaped {shape} in the loop")
      elif int(np.prod(shape)) > limit:
        bad.append(f"{op} of {shape} in the loop: more than a step's logits ({limit})")
  for op, shapes in entry_collectives(hlo):
    bad += [f"{op} of a parameter/cache-shaped {shape} before the loop" for shape in shapes
            if shape in forbidden and not op.startswith("all-reduce")]
  spec = sharding.cache_sharding(cfg.num_kv_heads, batch, mesh).spec
  block = tuple(d // (mesh.shape[a] if a else 1)
                for d, a in zip(cache, tuple(spec) + (None,) * (5 - len(spec))))
  if carry.count(block) != 2:  # k and v, each in its per-device block
    bad.append(f"the loop does not carry the cache as {block} blocks: {carry}")
  return bad


def _compiled_decode(pipe, requests, gather_weights=False):
  """-> (HLO text of the pipeline's compiled decode, batch, prompt width).

  gather_weights: the negative control, the same loop on the same sharded inputs with every
  language-model weight constrained to be whole on each device, as an FSDP loop that gathers
  its weights each step would have them."""
  import functools
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from paligemma_jax.model import gemma
  from paligemma_jax.sample import decode
  batch = pipe.make_batch(*requests)
  b, t = batch["text"].shape
  prefill, dec, _ = pipe._functions(b, t, MAX_LEN, ("sample", decode.Sampler()), ())
  if gather_weights:
    def gather(next_fun, args, kwargs, context):
      if isinstance(context.module, gemma.Einsum) and context.method_name == "__call__":
        eqn, x = args
        w = context.module.get_variable("params", "w")
        w = jax.lax.with_sharding_constraint(w, NamedSharding(pipe.mesh, PartitionSpec()))
        return jnp.einsum(eqn, x, w.astype(context.module.dtype))
      return next_fun(*args, **kwargs)
    logits, cache, valid, last = prefill.out_info
    dec = jax.jit(functools.partial(
        decode.decode, pipe.model, prompt_len=pipe.config.num_image_tokens + t,
        max_decode_len=MAX_LEN, sampler=decode.Sampler(), eos_id=pipe.tokenizer.eos_id))
    with nn.intercept_methods(gather):
      dec = dec.lower(pipe.params, logits, cache, valid, last, jax.random.PRNGKey(0)).compile()
  return dec.as_text(), b, t


@pytest.mark.parametrize("mesh_name", MESHES)
def check_decode_loop_moves_no_weights_or_cache(mesh_name, pipes, requests):
  """Inside the compiled decode while_loop, only activation-sized collectives (see
  `loop_violations`); the model-axis matmuls' partial sums are all-reduced."""
  pipe = pipes(mesh_name)
  hlo, b, t = _compiled_decode(pipe, requests)
  assert loop_violations(pipe, hlo, b, t) == []
  ops = {op for op, _ in decode_loop_collectives(hlo)[1]}
  if pipe.mesh.shape["model"] > 1:
    assert any(op.startswith("all-reduce") for op in ops)  # the Megatron partial sums


def check_loop_check_catches_fsdp_weight_gathers(pipes, requests):
  """Negative control: a loop that all-gathers FSDP weight shards every token (each weight
  constrained whole on every device) is caught by `loop_violations`."""
  pipe = pipes("2x4")
  hlo, b, t = _compiled_decode(pipe, requests, gather_weights=True)
  bad = loop_violations(pipe, hlo, b, t)
  assert any("parameter/cache-shaped" in v and "all-gather" in v for v in bad), bad


if INNER:
  export_checks(globals())
else:
  test_on_8_devices = make_outer_test(
      __file__, report_ids(globals(), {n: MESHES for n in (
          "check_params_follow_rules", "check_sharded_decode_matches_one_device",
          "check_decode_loop_moves_no_weights_or_cache")}))


# ---------------------------------------------------------------------------
# Single process, no mesh needed.

def test_parse_mesh():
  from paligemma_jax import sharding
  assert sharding.parse_mesh("2x4") == (2, 4) and sharding.parse_mesh(" 8X1 ") == (8, 1)
  assert sharding.parse_mesh(None) is None and sharding.parse_mesh("") is None
  for bad in ("2x", "x4", "0x8", "2x4x1", "two"):
    with pytest.raises(ValueError, match="DATAxMODEL"):
      sharding.parse_mesh(bad)


def test_mesh_needs_all_devices():
  import jax
  from paligemma_jax import sharding
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(jax.device_count() + 1, 1)
