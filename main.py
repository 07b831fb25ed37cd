"""PaliGemma from the command line.

  python main.py --ckpt=pt_224.npz --tokenizer=paligemma_tokenizer.model \
      --image=cat.jpg --prompt="caption en" --max_decode_len=32 --output_json=out.json

With no --ckpt it runs the embedded default: a small model trained here on procedural scenes of
coloured shapes (checkpoints/shapes/, configs/shapes.py), on a scene in assets/.
"""
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags


def _innermost_message(e: BaseException) -> str:
  while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps its KeyError
    e = e.args[0]
  return "; ".join(l.strip() for l in str(e.args[0] if e.args else e).splitlines() if l.strip())


try:  # --config.NAME=VALUE overrides are parsed here, as the flag is defined
  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
      "Model/runtime settings (ml_collections); override fields with --config.NAME=VALUE.")
except (AttributeError, KeyError, TypeError, ValueError) as e:
  unknown = "no such field " if isinstance(e, (AttributeError, KeyError)) else ""
  print(f"error: --config: {unknown}{_innermost_message(e).replace('Did you', 'did you')}",
        file=sys.stderr)
  sys.exit(2)
_CKPT = flags.DEFINE_string("ckpt", None, "big_vision PaliGemma .npz, Orbax directory or "
                            "transformers PaliGemma directory; none = the embedded shapes model.")
_IMG_CKPT = flags.DEFINE_string(
    "img_ckpt", None, "With --ckpt=GEMMA_ORBAX_DIR (a Gemma release): the big_vision .npz whose "
    "img/... (vision tower) completes the model, as big_vision's model_init combines them.")
_SAVE_ORBAX = flags.DEFINE_string("save_orbax", None,
                                  "Write the loaded model to this new Orbax checkpoint directory.")
_SAVE_HF = flags.DEFINE_string(
    "save_hf", None, "Write the loaded model to this new directory as a transformers PaliGemma "
    "(config.json, safetensors shards, the tokenizer).")
_ORBAX_UNMARKED_OK = flags.DEFINE_bool(
    "orbax_unmarked_ok", False, "Accept an Orbax directory without commit_success.txt (written "
    "by orbax before 2024); otherwise it is refused as a possibly interrupted save.")
_MESH = flags.DEFINE_string("mesh", None, "DATAxMODEL device mesh, e.g. 2x4 (parameters FSDP over "
                            "data and Megatron over model, batch over data); default: one device.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Multi-host: call jax.distributed.initialize() first (one "
                                 "command per host; see README).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "--distributed: host:port of process 0 (default: detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: number of hosts.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this host's index.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "sentencepiece model (paligemma_tokenizer.model).")
_IMAGE = flags.DEFINE_string("image", None, "Image file; default: the demo image in assets/.")
_PROMPT = flags.DEFINE_string("prompt", "caption en", "Prompt (prefix), e.g. 'caption en', 'detect cat'.")
_MAX_LEN = flags.DEFINE_integer("max_decode_len", 32, "Most tokens to generate.")
_SAMPLER = flags.DEFINE_string("sampler", "greedy",
                               "greedy | temperature(t) | topk(k, t) | nucleus(p, t); arguments "
                               "may be named: nucleus(p=0.9, t=0.7)")
_FORBIDDEN = flags.DEFINE_list("forbidden_ids", [],
                               "Token ids never to generate, comma-separated: 1,2,3.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BEAM = flags.DEFINE_integer("beam_size", 0, "Beam search with this many beams (0: sample).")
_BEST_OF_N = flags.DEFINE_integer("best_of_n", 1,
                                  "Draw N samples, keep the most likely (log-probability to eos).")
_STREAM = flags.DEFINE_bool("stream", False, "Print the answer as it is produced.")
_ANSWER_START = flags.DEFINE_string("answer_start", None, "Forced start of the answer; the "
                                    "printed and written text begins with it.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write prompt, text, tokens, timing here.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "For detect/segment: write annotated.png, masks and objects.json.")
_VAE_CKPT = flags.DEFINE_string("vae_ckpt", None, "vae-oid.npz, to decode segmentation masks.")
_ANSWER = flags.DEFINE_string("answer", None,
                              "Render this answer string (from elsewhere) without loading a model.")
_IMAGES = flags.DEFINE_string(
    "images", None, "Batch job: a glob, a directory or a .jsonl of {\"image\", \"prompt\"} lines; "
    "needs --output_jsonl. A rerun with the same arguments resumes.")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None,
                                    "Batch job: one JSON line per image is appended here.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch job: images per generate call.")
_INTERACTIVE = flags.DEFINE_bool("interactive", False,
                                 "Prompt loop on --image: type prompts and /commands (/help).")


def _fail(msg):
  print(f"error: {msg}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: after a failed Orbax read its background threads may still post to a closed
  # event loop, and interpreter shutdown would print their tracebacks under the one error line.
  os._exit(2)


def _check_flags(cfg, many: bool = False) -> tuple:
  """Checks what needs no model, before anything loads -> (Sampler, forbidden ids). Exits 2."""
  from paligemma_jax.options import as_dtype, check_decoding_options
  for field in ("dtype", "cache_dtype"):
    try:
      as_dtype(cfg[field], f"--config.{field}")
    except ValueError as e:
      _fail(str(e))
  if cfg.prompt_bucket < 1:
    _fail(f"--config.prompt_bucket must be >= 1, got {cfg.prompt_bucket}")
  forbidden = []
  for s in _FORBIDDEN.value:
    try:
      forbidden.append(int(s.strip()))
    except ValueError:
      _fail(f"--forbidden_ids: {s!r} is not a token id; expected integers separated by "
            "commas, e.g. --forbidden_ids=1,2,3")
  if many:  # jobs and the prompt loop sample; these three are single-image options
    used = [f"--{f.name}={f.value}" for f in (_BEAM, _BEST_OF_N, _STREAM)
            if f.value != f.default]
    if used:
      _fail(f"{', '.join(used)}: for a single --image run only; --images and --interactive "
            "take --sampler, --seed and --forbidden_ids")
  try:
    return check_decoding_options(_SAMPLER.value, beam_size=_BEAM.value,
                                  best_of_n=_BEST_OF_N.value, stream=_STREAM.value,
                                  forbidden_ids=forbidden)
  except ValueError as e:
    _fail(str(e))


def _setup_jax(cfg):
  import jax
  if _DISTRIBUTED.value and not getattr(_setup_jax, "distributed", False):
    from paligemma_jax import sharding
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    _setup_jax.distributed = True
  if cfg.matmul_precision:
    jax.config.update("jax_default_matmul_precision", cfg.matmul_precision)
  if cfg.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _pipeline(cfg):
  """-> (pipeline, note). Loads the checkpoint, or builds the embedded default."""
  from paligemma_jax.ckpt import checkpoint
  from paligemma_jax import demo
  from paligemma_jax.model import paligemma
  from paligemma_jax.options import as_dtype
  from paligemma_jax.pipeline import PaliGemmaPipeline
  from paligemma_jax.data.tokenizer import Tokenizer
  from paligemma_jax.ckpt import orbax_io
  from paligemma_jax import sharding
  try:
    mesh = sharding.mesh_from_flag(_MESH.value)
  except ValueError as e:
    _fail(str(e))
  kw = dict(dtype=cfg.dtype, cache_dtype=cfg.cache_dtype, prompt_bucket=cfg.prompt_bucket,
            max_seq_len=cfg.max_seq_len)
  kw["mesh"] = mesh
  if _CKPT.value:
    from paligemma_jax.ckpt import hf_checkpoint  # its directories may hold tokenizer.model
    if not _TOKENIZER.value and (_IMG_CKPT.value or not hf_checkpoint.is_hf_dir(_CKPT.value)):
      _fail("--ckpt needs --tokenizer=PATH (paligemma_tokenizer.model)")
    overrides = {k: v for k, v in cfg.model.items() if v is not None}
    unmarked_ok = _ORBAX_UNMARKED_OK.value
    try:
      if _IMG_CKPT.value:  # a Gemma release (Orbax) + a big_vision vision tower
        t0 = time.perf_counter()
        tokenizer = Tokenizer(_TOKENIZER.value)  # rows it names beyond Gemma's are drawn
        loaded = orbax_io.load_gemma_orbax(
            _CKPT.value, _IMG_CKPT.value, dtype=as_dtype(cfg.dtype), overrides=overrides,
            mesh=mesh, min_vocab_size=tokenizer.vocab_size,
            require_commit_marker=not unmarked_ok)
        return PaliGemmaPipeline.from_loaded(loaded, tokenizer, t0=t0, **kw), None
      return PaliGemmaPipeline.from_files(_CKPT.value, _TOKENIZER.value, overrides=overrides,
                                          require_commit_marker=not unmarked_ok, **kw), None
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
      _fail(str(e))
  if demo.shipped():
    try:
      pipe = PaliGemmaPipeline.from_files(demo.SHAPES_MODEL, _TOKENIZER.value or
                                          demo.SHAPES_TOKENIZER, **kw)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
      _fail(str(e))
    return pipe, ("embedded default: checkpoints/shapes/model.npz, a small PaliGemma-2-like "
                  "model trained by this project (configs/shapes.py) on scenes of coloured "
                  "circles, squares and triangles; it knows nothing else. Pass --ckpt and "
                  "--tokenizer for a real model.")
  import jax
  t0 = time.perf_counter()
  config = demo.demo_config()
  params = jax.tree_util.tree_map(lambda x: x.astype(as_dtype(cfg.dtype)),
                                  paligemma.init_params(config, seed=0))
  jax.block_until_ready(params)
  cache_dir = os.path.expanduser("~/.cache/paligemma_jax/demo")
  tokenizer = Tokenizer(_TOKENIZER.value or demo.demo_tokenizer(cache_dir))
  pipe = PaliGemmaPipeline(config, params, tokenizer, load_s=time.perf_counter() - t0, **kw)
  return pipe, ("embedded default: checkpoints/shapes/ is missing, so a tiny model with "
                "RANDOM weights answers noise. Pass --ckpt and --tokenizer for a real model.")


def _vae_ckpt():
  """--vae_ckpt, or with the embedded default its own VQ-VAE."""
  from paligemma_jax import demo
  if _VAE_CKPT.value or _CKPT.value or not demo.shipped():
    return _VAE_CKPT.value
  return demo.SHAPES_VAE


def _check_paths(**kw):
  """Every path the run will write, and the VAE file, checked before anything loads."""
  from paligemma_jax import paths
  try:
    paths.check_outputs(**kw)
  except paths.PathError as e:
    _fail(str(e))


def _write_task_outputs(text, prompt, img, vae_ckpt, output_dir):
  from paligemma_jax.answers import outputs
  answer = outputs.task_answer(text, prompt, (img.height, img.width),
                               outputs.LazyVae(vae_ckpt) if vae_ckpt else None)
  if answer is None:
    return None
  written = outputs.write_task_outputs(answer, img, output_dir)
  if answer.warning:
    print(f"warning: {answer.warning}", file=sys.stderr)
  print(f"wrote {written['annotated_png']} and {os.path.join(output_dir, 'objects.json')}")
  return written


def _run_many(cfg):
  """--images (jobs.py) or --interactive (interactive.py); the model loads only when needed."""
  from paligemma_jax import demo, interactive, jobs
  if _IMAGES.value and _INTERACTIVE.value:
    _fail("--images and --interactive do not combine")
  _, forbidden = _check_flags(cfg, many=True)

  def load():
    _setup_jax(cfg)
    pipe, note = _pipeline(cfg)
    if note:
      print(f"note: {note}", flush=True)
    return pipe

  common = dict(max_decode_len=_MAX_LEN.value, sampler=_SAMPLER.value, seed=_SEED.value,
                answer_start=_ANSWER_START.value, forbidden_ids=forbidden,
                output_dir=_OUTPUT_DIR.value, vae_ckpt=_vae_ckpt())
  if _INTERACTIVE.value:
    sys.exit(interactive.main(load, _IMAGE.value or demo.DEMO_IMAGE, **common))
  try:
    jobs.run_job(load, _IMAGES.value, _PROMPT.value, _OUTPUT_JSONL.value,
                 batch_size=_BATCH_SIZE.value, **common)
  except jobs.JobError as e:
    _fail(str(e))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _IMAGES.value is not None or _INTERACTIVE.value:
    return _run_many(cfg)
  from paligemma_jax import demo
  from paligemma_jax.data.image import ImageError, load_image
  image_path = _IMAGE.value or demo.DEMO_IMAGE
  try:
    img = load_image(image_path)
  except ImageError as e:
    _fail(str(e))

  if _ANSWER.value is not None:  # render only, no model
    if not _OUTPUT_DIR.value:
      _fail("--answer needs --output_dir=DIR")
    prompt = _PROMPT.value if _PROMPT.value != "caption en" else "detect"
    if "<seg" in _ANSWER.value:
      prompt = "segment"
    _check_paths(output_dir=_OUTPUT_DIR.value, vae_ckpt=_VAE_CKPT.value)
    _write_task_outputs(_ANSWER.value, prompt, img, _VAE_CKPT.value, _OUTPUT_DIR.value)
    return

  sampler, forbidden = _check_flags(cfg)
  _check_paths(output_json=_OUTPUT_JSON.value, output_dir=_OUTPUT_DIR.value,
               save_orbax=_SAVE_ORBAX.value, save_hf=_SAVE_HF.value, vae_ckpt=_vae_ckpt())
  _setup_jax(cfg)
  pipe, note = _pipeline(cfg)
  if note:
    print(f"note: {note}")
  if _SAVE_HF.value:  # every process calls it (multi-host: gathered, process 0 writes)
    from paligemma_jax.ckpt import hf_checkpoint
    try:
      written = hf_checkpoint.save_hf(_SAVE_HF.value, pipe.params, pipe.config,
                                      pipe.tokenizer.path)
      print(f"wrote {written}")
    except (ValueError, OSError) as e:
      _fail(str(e))
  if _SAVE_ORBAX.value:  # every process calls it (each writes its own shards)
    from paligemma_jax.ckpt import orbax_io
    try:
      print(f"wrote {orbax_io.save(_SAVE_ORBAX.value, pipe.params)}")
    except (ValueError, OSError) as e:
      _fail(str(e))
  # Streaming prints the text as it grows, the forced answer start first (as in result.text).
  streamed = pipe.tokenizer.encode(_ANSWER_START.value) if _ANSWER_START.value else []
  shown = [""]

  def on_token(tokens, done):
    if not bool(done[0]) and int(tokens[0]) != pipe.tokenizer.eos_id:
      streamed.append(int(tokens[0]))
      text = pipe.tokenizer.decode(streamed)
      print(text[len(shown[0]):], end="", flush=True)
      shown[0] = text

  try:
    [result] = pipe.generate([img], [_PROMPT.value], max_decode_len=_MAX_LEN.value,
                             sampler=sampler, seed=_SEED.value,
                             answer_start=_ANSWER_START.value, forbidden_ids=forbidden,
                             beam_size=_BEAM.value, best_of_n=_BEST_OF_N.value,
                             on_token=on_token if _STREAM.value else None)
  except ValueError as e:
    _fail(str(e))
  t = result.timing
  # Streamed: the rest (the forced start alone when eos came first).
  print(result.text[len(shown[0]):] if _STREAM.value else result.text)
  rate = t["generated_tokens"] / t["decode_s"] if t["decode_s"] > 0 else float("nan")
  print(f"timing: load {t['load_s']:.3f}s  compile {t['compile_s']:.3f}s  prefill "
        f"{t['prefill_s'] * 1e3:.1f}ms  decode {t['decode_s'] * 1e3:.1f}ms for "
        f"{t['generated_tokens']} tokens ({rate:.1f} tokens/s)")
  random_weights = not _CKPT.value and not demo.shipped()  # _pipeline's last branch
  record = dict(prompt=result.prompt, text=result.text, tokens=result.tokens,
                logprobs=result.logprobs, timing=t, image=image_path,
                ckpt=_CKPT.value, random_weights=random_weights,
                model=_CKPT.value or (demo.SHAPES_MODEL if demo.shipped() else "random"))
  if _OUTPUT_DIR.value:
    written = _write_task_outputs(result.text, result.prompt, img, _vae_ckpt(),
                                  _OUTPUT_DIR.value)
    if written:
      record["objects"] = written.get("objects")
  if _OUTPUT_JSON.value:
    from paligemma_jax.answers import outputs
    try:
      outputs.write_json(_OUTPUT_JSON.value, record)
    except (ValueError, OSError) as e:  # ValueError: a NaN or infinity, which JSON cannot hold
      _fail(f"{_OUTPUT_JSON.value}: not written: {e}")
    print(f"wrote {_OUTPUT_JSON.value}")


if __name__ == "__main__":
  app.run(main)
