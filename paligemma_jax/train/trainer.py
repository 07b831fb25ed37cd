"""big_vision's PaliGemma transfer trainer: `python -m paligemma_jax.train --config=... --workdir=DIR`.

One optimizer step: the batch (B examples) is split into `grad_accum_steps` micro-batches whose
gradients of big_vision's loss are averaged; the chain of `optim.py` updates the trainable
parameters (all, all but `freeze`, or only the LoRA adapters); the step is jitted once (once
per length of `text_len_buckets`) with the trainable parameters and the optimizer state donated.

Everything a run needs to continue lives in DIR: `config.json` (the settings and the
architecture), Orbax checkpoints under `checkpoints/` (parameters, optimizer state, step, RNG,
examples consumed), `metrics.jsonl`, and at the end `final.npz`.
"""
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from paligemma_jax import demo, sharding
from paligemma_jax.ckpt import checkpoint, orbax_io
from paligemma_jax.data import jsonl
from paligemma_jax.data.tokenizer import Tokenizer
from paligemma_jax.model import gemma, paligemma, vit
from paligemma_jax.options import as_dtype
from paligemma_jax.train import lora as lora_lib
from paligemma_jax.train import loss as loss_lib
from paligemma_jax.train import optim, shapes_recipe

ARCHS = {"demo": demo.demo_config, "shapes": demo.shapes_config}  # random-init architectures


class TrainError(ValueError):
  """A setting, a data file or a state that stops training before (or instead of) a step."""


def log(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Settings.

def check_config(cfg):
  """Everything a setting alone can get wrong, before any file is read."""
  def positive(name, minimum=1):
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise TrainError(f"--config.{name} must be an integer >= {minimum}, got {value!r}")
  for name in ("batch_size", "grad_accum_steps", "total_steps", "text_len", "ckpt_steps",
               "keep_ckpts", "log_steps", "eval_steps"):
    positive(name)
  positive("warmup_steps", 0)
  if cfg.batch_size % cfg.grad_accum_steps:
    raise TrainError(f"--config.batch_size={cfg.batch_size} is not divisible by "
                     f"--config.grad_accum_steps={cfg.grad_accum_steps}")
  for name in ("lr", "grad_clip_norm", "weight_decay", "dropout", "label_smoothing",
               "image_cache_gb"):
    if not isinstance(cfg[name], (int, float)) or cfg[name] < 0 or not math.isfinite(cfg[name]):
      raise TrainError(f"--config.{name} must be a finite number >= 0, got {cfg[name]!r}")
  if cfg.dropout >= 1 or cfg.label_smoothing >= 1:
    raise TrainError("--config.dropout and --config.label_smoothing must be below 1")
  if cfg.optimizer not in optim.OPTIMIZERS:
    raise TrainError(f"--config.optimizer must be one of {', '.join(optim.OPTIMIZERS)}, got "
                     f"{cfg.optimizer!r}")
  if cfg.loss_norm not in ("examples", "tokens"):
    raise TrainError(f"--config.loss_norm must be 'examples' or 'tokens', got {cfg.loss_norm!r}")
  try:
    optim.schedule(cfg.schedule, cfg.total_steps, cfg.warmup_steps)
    as_dtype(cfg.dtype, "--config.dtype")
    sharding.parse_mesh(cfg.mesh)
  except ValueError as e:
    raise TrainError(str(e).replace("--mesh", "--config.mesh")) from None
  if cfg.dtype not in ("float32", "bfloat16"):
    raise TrainError(f"--config.dtype must be float32 or bfloat16 for training, got {cfg.dtype!r}")
  if cfg.remat_policy != "none" and not hasattr(jax.checkpoint_policies, cfg.remat_policy):
    raise TrainError(f"--config.remat_policy={cfg.remat_policy!r} is not a "
                     "jax.checkpoint_policies member (e.g. nothing_saveable) or 'none'")
  if cfg.lora.rank < 0 or (cfg.lora.rank and cfg.lora.alpha <= 0):
    raise TrainError(f"--config.lora.rank must be >= 0 and lora.alpha > 0, got "
                     f"{cfg.lora.rank}, {cfg.lora.alpha}")
  if cfg.export_lora and not cfg.lora.rank:
    raise TrainError("--config.export_lora needs --config.lora.rank > 0")
  for name in ("tokenizer", "train_data"):
    if not cfg[name]:
      raise TrainError(f"--config.{name} is required")
  text_lens(cfg)
  if not cfg.init and cfg.arch not in ARCHS:
    raise TrainError(f"--config.init is empty and --config.arch={cfg.arch!r} is not one of "
                     f"{', '.join(ARCHS)}")


def text_lens(cfg) -> list:
  """--config.text_len_buckets ("16,24") and text_len -> the ascending lengths that batches
  are cut to."""
  raw = str(cfg.get("text_len_buckets", "") or "")
  try:
    lens = sorted({int(x) for x in raw.split(",") if x.strip()})
  except ValueError:
    raise TrainError(f"--config.text_len_buckets={raw!r}: expected integers joined by commas, "
                     "e.g. '16,24'") from None
  if any(not 2 <= n < cfg.text_len for n in lens):
    raise TrainError(f"--config.text_len_buckets={raw!r}: each length must be at least 2 and "
                     f"below --config.text_len={cfg.text_len}")
  return lens + [cfg.text_len]


def _overrides(cfg) -> dict:
  return {k: v for k, v in cfg.model.items() if v is not None}


# ---------------------------------------------------------------------------
# Data.

@dataclasses.dataclass
class Dataset:
  path: str
  examples: list
  text: jsonl.Tokenized

  def __len__(self):
    return len(self.examples)


def load_data(path: str, tokenizer: Tokenizer, text_len: int, what: str) -> Dataset:
  examples = jsonl.read_examples(path)
  jsonl.check_images(examples, path)
  text = jsonl.tokenize(tokenizer, examples, text_len, path)
  if text.truncated:
    log(f"warning: {path}: {text.truncated} of {len(examples)} {what} examples are longer than "
        f"text_len={text_len} tokens and were truncated (each keeps its eos)")
  return Dataset(path, examples, text)


# ---------------------------------------------------------------------------
# The step.

def _model(config, cfg):
  return paligemma.PaliGemma(config, as_dtype(cfg.dtype), scan_layers=True,
                             llm_dropout=cfg.dropout, remat_policy=cfg.remat_policy)


def _apply_loss(model, params, batch, rng, cfg, intercept):
  with nn.intercept_methods(intercept) if intercept else _nothing():
    return loss_lib.batch_loss(model, params, batch["images"], batch["tokens"],
                               batch["mask_ar"], batch["mask_loss"],
                               label_smoothing=cfg.label_smoothing, norm=cfg.loss_norm,
                               train=True, rngs={"dropout": rng})


class _nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def make_train_step(model, tx, sched, cfg, intercept=None):
  """-> step(trainable, opt_state, frozen, batch, step, rng) -> (trainable, opt_state,
  metrics). batch arrays are (A, B/A, ...): A micro-batches, whose gradients are averaged."""
  accum = cfg.grad_accum_steps

  def loss_fn(trainable, frozen, micro, rng):
    params = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
    return _apply_loss(model, params, micro, rng, cfg, intercept)

  grad_fn = jax.value_and_grad(loss_fn)

  def step(trainable, opt_state, frozen, batch, step, rng):
    rng = jax.random.fold_in(rng, step)
    if accum == 1:
      loss, grads = grad_fn(trainable, frozen, jax.tree_util.tree_map(lambda x: x[0], batch),
                            rng)
    else:
      def body(carry, xs):
        i, micro = xs
        l, g = grad_fn(trainable, frozen, micro, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (l, g)), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, trainable))
      (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), batch))
      loss, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": cfg.lr * sched(step)}
    return trainable, opt_state, metrics

  return step


def make_eval_step(model, cfg, intercept=None):
  """-> f(trainable, frozen, batch) -> (B,) each example's loss (big_vision's, no smoothing,
  no dropout)."""
  def per_example(trainable, frozen, batch):
    params = traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
    with nn.intercept_methods(intercept) if intercept else _nothing():
      logits, _ = model.apply({"params": params}, batch["images"], batch["tokens"][:, :-1],
                              batch["mask_ar"][:, :-1])
    weights = batch["mask_loss"][:, 1:].astype(jnp.float32)
    per_token = loss_lib.token_losses(logits, batch["tokens"][:, 1:]) * weights
    return per_token.sum(-1) / jnp.maximum(weights.sum(-1), 1)
  return per_example


# ---------------------------------------------------------------------------
# The run.

class Trainer:
  """Sets a run up from its config and workdir (resuming when DIR holds a checkpoint) and
  trains it: `Trainer(cfg, workdir).run()`."""

  def __init__(self, cfg, workdir: str, progress: bool = True):
    check_config(cfg)
    self.cfg, self.workdir, self.progress = cfg, os.path.abspath(workdir), progress
    if cfg.matmul_precision:
      jax.config.update("jax_default_matmul_precision", cfg.matmul_precision)
    try:
      self.mesh = sharding.mesh_from_flag(cfg.mesh)
    except ValueError as e:
      raise TrainError(str(e).replace("--mesh", "--config.mesh")) from None
    data_shards = self.mesh.shape[sharding.DATA] if self.mesh else 1
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro % data_shards:
      raise TrainError(
          f"the micro-batch of {micro} examples (batch_size {cfg.batch_size} / grad_accum_steps "
          f"{cfg.grad_accum_steps}) is not divisible by the mesh's data axis ({data_shards})")
    self.micro = micro
    try:
      self.tokenizer = Tokenizer(cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:
      raise TrainError(f"--config.tokenizer: {e}") from None
    self.train = load_data(self._data_path(cfg.train_data), self.tokenizer, cfg.text_len,
                           "training")
    self.val = (load_data(self._data_path(cfg.val_data), self.tokenizer, cfg.text_len,
                          "validation") if cfg.val_data else None)
    self._plan_batches()
    if self.val is not None and cfg.eval_decode:
      from paligemma_jax.eval import evaluators
      self.val_refs, self.val_masks = evaluators.read_references(self.val.path)
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise TrainError(f"--workdir={workdir} exists and is not a directory")
    os.makedirs(self.workdir, exist_ok=True)
    self.ckpt_dir = os.path.join(self.workdir, "checkpoints")
    self.manager = _manager(self.ckpt_dir, cfg.keep_ckpts)
    self.resume_step = self.manager.latest_step()
    self._setup_params()

  def _data_path(self, path: str) -> str:
    """A JSONL path, or `shapes:NUM:SEED`: the procedural data set, written on first use."""
    if not shapes_recipe.is_spec(path):
      return path
    try:
      return shapes_recipe.prepare(path, self.cfg.get("data_cache", "~/.cache/paligemma_jax"),
                                   self.cfg.get("shapes_vae", ""))
    except (FileNotFoundError, ValueError) as e:
      raise TrainError(f"{path}: {e}") from None

  def _plan_batches(self):
    """With text_len_buckets, each example joins the shortest length that holds it and every
    batch is drawn from one of them (`jsonl.bucketed_epoch`): short answers stop paying for
    the longest one's padding."""
    cfg = self.cfg
    self.text_lens = text_lens(cfg)
    self._epoch_plan = (None, None)
    if len(self.text_lens) == 1:
      return
    self.buckets = jsonl.length_buckets(jsonl.text_widths(self.train.text), self.text_lens)
    counts = np.bincount(self.buckets, minlength=len(self.text_lens))
    self.batches_per_epoch = int((counts // cfg.batch_size).sum())
    log("length buckets: " + ", ".join(
        f"text_len {n}: {c:,} examples" for n, c in zip(self.text_lens, counts)))
    if not self.batches_per_epoch:
      raise TrainError(f"--config.text_len_buckets: no length holds a batch of "
                       f"{cfg.batch_size} examples ({', '.join(map(str, counts))})")
    idle = [n for n, c in zip(self.text_lens, counts) if 0 < c < cfg.batch_size]
    if idle:
      log(f"warning: text_len {', '.join(map(str, idle))} holds fewer examples than a batch: "
          "they are never trained on; change --config.text_len_buckets")

  # -- parameters --------------------------------------------------------------------------

  def _setup_params(self):
    cfg = self.cfg
    config_file = os.path.join(self.workdir, "config.json")
    if self.resume_step is not None:
      with open(config_file) as f:
        saved = json.load(f)
      self.config = _config_from_dict(saved["architecture"])
      base = None  # restored below, with the optimizer state
      log(f"resuming {self.workdir} from step {self.resume_step} (config.init is not read)")
    elif cfg.init:
      t0 = time.perf_counter()
      try:
        loaded = orbax_io.load(cfg.init, jnp.float32, _overrides(cfg), mesh=self.mesh)
      except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise TrainError(f"--config.init: {e}") from None
      self.config = loaded.config
      base = traverse_util.flatten_dict(loaded.params, sep="/")
      log(f"loaded {cfg.init} in {time.perf_counter() - t0:.1f} s")
    else:
      config = ARCHS[cfg.arch]()
      self.config = dataclasses.replace(config, llm=dataclasses.replace(
          config.llm, **{k: v for k, v in _overrides(cfg).items()}))
      base = traverse_util.flatten_dict(paligemma.init_params(
          self.config, cfg.seed, posemb=cfg.get("init_posemb", "normal")), sep="/")
    if self.tokenizer.vocab_size > self.config.llm.vocab_size:
      raise TrainError(f"--config.tokenizer has {self.tokenizer.vocab_size} pieces but the "
                       f"model's embedding has {self.config.llm.vocab_size} rows")
    self.model = _model(self.config, cfg)
    self.intercept, self.lora_eqns = None, {}
    abstract = (base if base is not None else
                traverse_util.flatten_dict(paligemma.abstract_params(self.config), sep="/"))
    if cfg.lora.rank:
      size = self.config.image_size
      example = (jnp.zeros((1, size, size, 3)), jnp.zeros((1, 2), jnp.int32),
                 jnp.zeros((1, 2), jnp.int32))
      shapes, self.lora_eqns = lora_lib.adapter_shapes(
          paligemma.PaliGemma(self.config), None, example, cfg.lora.targets, cfg.lora.rank)
      if not shapes:
        raise TrainError(f"--config.lora.targets={cfg.lora.targets!r} matches no einsum weight "
                         "of the language model (paths look like llm/layers/attn/q_einsum/w, "
                         "llm/layers/mlp/linear)")
      self.intercept = lora_lib.interceptor(cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha)
      trainable_abstract = shapes
      frozen_keys = set(abstract)
    else:
      trainable_keys = set(abstract)
      if cfg.freeze:
        try:
          trainable_keys -= optim.matching(abstract, cfg.freeze, "--config.freeze")
        except ValueError as e:
          raise TrainError(str(e)) from None
      if not trainable_keys:
        raise TrainError(f"--config.freeze={cfg.freeze!r} freezes every parameter")
      trainable_abstract = {k: abstract[k] for k in trainable_keys}
      frozen_keys = set(abstract) - trainable_keys
    self.frozen_keys = frozen_keys
    wd_keys = set()
    if cfg.weight_decay and cfg.wd_mask:
      try:
        wd_keys = optim.matching(list(trainable_abstract), cfg.wd_mask, "--config.wd_mask")
      except ValueError:
        wd_keys = set()  # e.g. LoRA adapters: nothing named kernel; no decay, as big_vision
    self.sched = optim.schedule(cfg.schedule, cfg.total_steps, cfg.warmup_steps)
    self.tx = optim.optimizer(cfg.optimizer, lr=cfg.lr,
                              sched=self.sched, grad_clip_norm=cfg.grad_clip_norm,
                              weight_decay=cfg.weight_decay,
                              wd_mask={k: k in wd_keys for k in trainable_abstract})
    if self.resume_step is not None:
      self._restore(abstract, trainable_abstract)
    else:
      trainable = (lora_lib.init_adapters(trainable_abstract, cfg.seed) if cfg.lora.rank
                   else {k: base[k] for k in trainable_abstract})
      self.frozen = self._place({k: base[k] for k in frozen_keys})
      self.trainable = self._place(trainable)
      self.opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings(
          self.trainable))(self.trainable)
      self.step = 0
      self.rng = jax.random.PRNGKey(cfg.seed)
      self._write_config(config_file)
    n_train = sum(int(np.prod(v.shape)) for v in self.trainable.values())
    n_base = sum(int(np.prod(v.shape)) for v in self.frozen.values())
    n_base += 0 if cfg.lora.rank else n_train
    self.counts = (n_train, n_base)

  def _shardings(self, flat):
    """{key: NamedSharding} by sharding.py's rules; LoRA adapters (small) are replicated."""
    if self.mesh is None:
      return None
    spec = lambda k, shape: (jax.sharding.PartitionSpec() if k.endswith(lora_lib.SUFFIXES)
                             else sharding.param_spec(k, shape, self.mesh))
    return {k: jax.sharding.NamedSharding(self.mesh, spec(k, v.shape)) for k, v in flat.items()}

  def _place(self, flat):
    if self.mesh is None:
      return {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
    shard = self._shardings(flat)
    return {k: (v if isinstance(v, jax.Array) and v.sharding == shard[k] and v.dtype == jnp.float32
                else sharding.put_global(np.asarray(v, np.float32), shard[k]))
            for k, v in flat.items()}

  def _opt_shardings(self, trainable):
    if self.mesh is None:
      return None
    shard = self._shardings(trainable)
    abstract = jax.eval_shape(self.tx.init, trainable)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return optax.tree_utils.tree_map_params(self.tx, lambda _, s: s, abstract, shard,
                                            transform_non_params=lambda _: replicated)

  def _write_config(self, path):
    if jax.process_index() != 0:
      return
    record = {"config": json.loads(self.cfg.to_json()),
              "architecture": dataclasses.asdict(self.config)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, path)

  def _state(self):
    # The scalars and the key as host (numpy) arrays: a one-device jax.Array cannot be saved
    # when several processes save together; numpy ones are written by process 0.
    return {"trainable": self.trainable, "frozen": self.frozen, "opt_state": self.opt_state,
            "step": np.asarray(self.step, np.int32), "rng": np.asarray(self.rng),
            "examples_seen": np.asarray(self.step * self.cfg.batch_size, np.int32)}

  def _restore(self, abstract, trainable_abstract):
    def spec(flat):
      shard = self._shardings(flat)
      return {k: jax.ShapeDtypeStruct(v.shape, jnp.float32,
                                      sharding=shard[k] if shard else None)
              for k, v in flat.items()}
    frozen_abstract = {k: abstract[k] for k in self.frozen_keys}
    trainable_spec = spec(trainable_abstract)
    opt_abstract = jax.eval_shape(self.tx.init, trainable_spec)
    opt_shard = self._opt_shardings(trainable_spec)
    if opt_shard is not None:
      opt_abstract = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_shard)
    target = {"trainable": trainable_spec, "frozen": spec(frozen_abstract),
              "opt_state": opt_abstract, "step": np.zeros((), np.int32),
              "rng": np.zeros((2,), np.uint32), "examples_seen": np.zeros((), np.int32)}
    import orbax.checkpoint as ocp
    state = self.manager.restore(self.resume_step, args=ocp.args.StandardRestore(target))
    self.trainable, self.frozen, self.opt_state = (state["trainable"], state["frozen"],
                                                   state["opt_state"])
    self.step, self.rng = int(state["step"]), jnp.asarray(state["rng"], jnp.uint32)

  # -- batches ------------------------------------------------------------------------------

  def _indices(self, step: int) -> tuple:
    """-> (the examples of step's batch, the text_len it is cut to)."""
    cfg = self.cfg
    if len(self.text_lens) == 1:
      return (jsonl.batch_indices(len(self.train), cfg.seed, step * cfg.batch_size,
                                  cfg.batch_size), cfg.text_len)
    epoch, j = divmod(step, self.batches_per_epoch)
    if self._epoch_plan[0] != epoch:
      self._epoch_plan = (epoch, jsonl.bucketed_epoch(self.buckets, len(self.text_lens),
                                                      cfg.batch_size, cfg.seed, epoch))
    bucket, indices = self._epoch_plan[1][j]
    return indices, self.text_lens[bucket]

  def _host_batch(self, data: Dataset, indices, pixels: np.ndarray,
                  text_len: Optional[int] = None) -> dict:
    t, width = data.text, (text_len or self.cfg.text_len) + 1
    return {"images": pixels, "tokens": t.tokens[indices, :width],
            "mask_ar": t.mask_ar[indices, :width], "mask_loss": t.mask_loss[indices, :width]}

  def _device_batch(self, host: dict, shape_prefix: tuple) -> dict:
    """Host arrays (n, ...) -> device arrays shape_prefix + (...), batch axis over `data`."""
    out = {}
    for k, v in host.items():
      v = v.reshape(shape_prefix + v.shape[1:])
      if self.mesh is None:
        out[k] = jnp.asarray(v)
      else:
        spec = (None,) * (len(shape_prefix) - 1) + (sharding.DATA,)
        out[k] = sharding.put_global(v, jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(*spec)))
    return out

  # -- the loop -----------------------------------------------------------------------------

  def run(self) -> dict:
    """Trains to total_steps (from where DIR stands) and writes final.npz -> the last metrics."""
    cfg = self.cfg
    keep = {}
    if self.mesh is not None:  # the state keeps its layout (the compiled step checks it)
      layout = lambda tree: jax.tree_util.tree_map(lambda x: x.sharding, tree)
      keep["out_shardings"] = (layout(self.trainable), layout(self.opt_state),
                               jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    step_fn = jax.jit(make_train_step(self.model, self.tx, self.sched, cfg, self.intercept),
                      donate_argnums=(0, 1), **keep)
    eval_fn = jax.jit(make_eval_step(self.model, cfg, self.intercept))
    pixels = jsonl.Pixels(self.config.image_size, cache_bytes=int(cfg.image_cache_gb * 2**30))
    paths = lambda idx: [self.train.examples[i].image for i in idx]
    accum, micro = cfg.grad_accum_steps, self.micro
    metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    _truncate_metrics(metrics_path, self.step)
    last = {}
    try:
      if self.step < cfg.total_steps:
        idx, text_len = self._indices(self.step)
        pixels.prefetch(self.step, paths(idx))
        batch = self._device_batch(
            self._host_batch(self.train, idx, pixels.get(self.step), text_len), (accum, micro))
        compiled = self._compile(step_fn, batch)
        bar = _progress(self.step, cfg.total_steps, self.progress)
        while self.step < cfg.total_steps:
          t0 = time.perf_counter()
          if self.step + 1 < cfg.total_steps:
            pixels.prefetch(self.step + 1, paths(self._indices(self.step + 1)[0]))
          width = batch["tokens"].shape[-1]
          self.trainable, self.opt_state, m = compiled[width](
              self.trainable, self.opt_state, self.frozen, batch, jnp.int32(self.step), self.rng)
          self.step += 1
          if self.step < cfg.total_steps:  # while the step runs (dispatch is asynchronous)
            idx, text_len = self._indices(self.step)
            batch = self._device_batch(
                self._host_batch(self.train, idx, pixels.get(self.step), text_len),
                (accum, micro))
          loss = float(m["loss"])
          if not math.isfinite(loss):
            raise TrainError(
                f"the loss is {loss} at step {self.step}; stopped without saving that state "
                f"(the last checkpoint, step {self.manager.latest_step()}, is intact). Try a "
                "lower --config.lr or --config.grad_clip_norm=1")
          dt = time.perf_counter() - t0
          last = {"step": self.step, "loss": loss, "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "examples_per_s": cfg.batch_size / dt,
                  "tokens_per_s": cfg.batch_size * (self.config.num_image_tokens + width - 1)
                                  / dt}
          done = self.step == cfg.total_steps
          if self.val is not None and (self.step % cfg.eval_steps == 0 or done):
            last["val_loss"] = self.validate(eval_fn, pixels)
            if cfg.eval_decode:
              last.update(self.evaluate())
          if self.step % cfg.log_steps == 0 or done or "val_loss" in last:
            _append_metrics(metrics_path, last)
          if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)
          if self.step % cfg.ckpt_steps == 0 or done:
            self.save()
        if bar is not None:
          bar.close()
      self.manager.wait_until_finished()
      self.write_final()
    finally:
      pixels.close()
    return last

  def _compile(self, step_fn, batch: dict) -> dict:
    """The step compiled for each text length a batch can have -> {positions: executable};
    the memory report is the longest's."""
    compiled = {}
    for text_len in reversed(self.text_lens):
      like = {k: v if k == "images" else jax.ShapeDtypeStruct(
          v.shape[:-1] + (text_len + 1,), v.dtype, sharding=v.sharding) for k, v in batch.items()}
      compiled[text_len + 1] = step_fn.lower(self.trainable, self.opt_state, self.frozen, like,
                                             jnp.int32(self.step), self.rng).compile()
      if len(compiled) == 1:
        self._report_size(compiled[text_len + 1])
    return compiled

  def validate(self, eval_fn, pixels) -> float:
    """Mean over the validation examples of big_vision's per-example loss."""
    n, total = len(self.val), 0.0
    for start in range(0, n, self.micro):
      idx = np.arange(start, start + self.micro) % n  # the last batch wraps; extras not counted
      px = pixels.get(("val", start), [self.val.examples[i].image for i in idx])
      batch = self._device_batch(self._host_batch(self.val, idx, px), (self.micro,))
      losses = sharding.to_host(eval_fn(self.trainable, self.frozen, batch))
      total += float(losses[:min(self.micro, n - start)].sum())
    return total / n

  def evaluate(self) -> dict:
    """The evaluators of `eval/` on val_data, per task its prompts ask for (greedy answers of
    the model as it stands) -> {"val_TASK_METRIC": value}."""
    from paligemma_jax.eval import evaluators
    from paligemma_jax.pipeline import PaliGemmaPipeline
    params = {k: jnp.asarray(v) for k, v in self.merged_params().items()}
    pipe = PaliGemmaPipeline(self.config, traverse_util.unflatten_dict(params, sep="/"),
                             self.tokenizer, cache_dtype="float32", mesh=self.mesh)
    vae = self.cfg.get("vae") or self.cfg.get("shapes_vae") or None
    out = {}
    for task in evaluators.TASKS:
      rows = [i for i, ex in enumerate(self.val_refs) if evaluators.task_of(ex.prefix) == task]
      if not rows or (task == "segment" and not vae):
        continue
      examples = [self.val_refs[i] for i in rows]
      answers = evaluators.predict(pipe, examples, batch_size=self.micro,
                                   max_decode_len=self.cfg.text_len)
      metrics, _ = evaluators.score(task, examples, answers, vae=vae,
                                    gt_masks=[self.val_masks[i] for i in rows])
      out.update({f"val_{task}_{k}": v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out

  def save(self):
    import orbax.checkpoint as ocp
    self.manager.save(self.step, args=ocp.args.StandardSave(self._state()))

  def merged_params(self) -> dict:
    """{flat key: host float32 array}: the model as trained (adapters merged)."""
    flat = {**self.frozen, **self.trainable}
    if self.cfg.lora.rank:
      adapters = {k: v for k, v in flat.items() if k.endswith(lora_lib.SUFFIXES)}
      base = {k: v for k, v in flat.items() if k not in adapters}
      flat = lora_lib.merge(base, adapters, self.lora_eqns, self.cfg.lora.alpha,
                            self.cfg.lora.rank)
    return {k: sharding.to_host(v).astype(np.float32) for k, v in flat.items()}

  def write_final(self):
    merged = self.merged_params()
    if jax.process_index() != 0:
      return
    path = os.path.join(self.workdir, "final.npz")
    tmp = path + ".tmp.npz"
    checkpoint.save_npz(tmp, traverse_util.unflatten_dict(merged, sep="/"))
    os.replace(tmp, path)
    log(f"wrote {path}")
    if self.cfg.export_lora:
      adapters = {k: sharding.to_host(v) for k, v in self.trainable.items()}
      tmp = self.cfg.export_lora + ".tmp.npz"
      np.savez(tmp, **{"params/" + k: v for k, v in adapters.items()},
               **{"lora/alpha": np.float32(self.cfg.lora.alpha),
                  "lora/rank": np.int32(self.cfg.lora.rank)})
      os.replace(tmp, self.cfg.export_lora)
      log(f"wrote {self.cfg.export_lora}")

  def _report_size(self, compiled):
    n_train, n_total = self.counts
    try:
      mem = compiled.memory_analysis()
      peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
              - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
      memory = (f"estimated peak memory {peak / 1e9:.2f} GB per device (XLA: arguments "
                f"{mem.argument_size_in_bytes / 1e9:.2f} GB, temporaries "
                f"{mem.temp_size_in_bytes / 1e9:.2f} GB)")
    except (AttributeError, NotImplementedError, TypeError):
      memory = "peak memory: unknown (XLA gave no memory analysis)"
    what = "LoRA adapters" if self.cfg.lora.rank else "trainable"
    log(f"{what} {n_train:,} / total {n_total:,} parameters ({100 * n_train / n_total:.2f}%); "
        f"{memory}")


def _manager(directory: str, keep: int):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options)


def _config_from_dict(d: dict) -> paligemma.PaliGemmaConfig:
  return paligemma.PaliGemmaConfig(vit=vit.ViTConfig(**d["vit"]), llm=gemma.GemmaConfig(**d["llm"]))


def _truncate_metrics(path: str, step: int):
  """Keeps the lines of steps <= `step` (a resumed run logs the later ones again); drops a torn
  last line."""
  if not os.path.exists(path) or jax.process_index() != 0:
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (json.JSONDecodeError, KeyError, TypeError):
        pass
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _append_metrics(path: str, record: dict):
  if jax.process_index() != 0:
    return
  with open(path, "a") as f:
    f.write(json.dumps(record, allow_nan=False) + "\n")


def _progress(start: int, total: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr)
