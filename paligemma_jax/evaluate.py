"""Scores PaliGemma on the trainer's JSONL: decodes it with a model, or scores answers made
elsewhere (main.py --images=REF.jsonl --output_jsonl=PRED.jsonl).

  python -m paligemma_jax.evaluate --task=caption --data=val.jsonl \
      --ckpt=final.npz --tokenizer=paligemma_tokenizer.model --output_json=eval.json
  python -m paligemma_jax.evaluate --task=detect --data=val.jsonl \
      --predictions=pred.jsonl --output_json=eval.json

Tasks: caption (cider, bleu4, exact_match), vqa (accuracy, anls), detect (map, map50),
segment (miou, boxacc50; needs --vae_ckpt); with --ckpt also the references' perplexity.
Writes OUT.json (metrics), a per-example JSONL and, for detect/segment, OUT.worst.png.
"""
import os
import sys

from absl import app, flags, logging

from paligemma_jax.eval.evaluators import TASKS  # numpy and PIL only: no jax before it is needed

DEFAULT_DECODE_LEN = {"caption": 32, "vqa": 32, "detect": 128, "segment": 64}
SHOW_MISSING = 5

_TASK = flags.DEFINE_string("task", None, f"One of {', '.join(TASKS)}.")
_DATA = flags.DEFINE_string("data", None, "References: the trainer's JSONL ({\"image\", "
                            "\"prefix\", \"suffix\": str or [str, ...]}, optional \"mask\").")
_CKPT = flags.DEFINE_string("ckpt", None, "Model to decode --data with (.npz, Orbax or "
                            "transformers directory); or give --predictions.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "With --ckpt: the sentencepiece model.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "Answers made elsewhere: the JSONL of "
                                   "main.py --images=... --output_jsonl; no model is loaded.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Metrics are written here.")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None, "Per-example predictions and scores; "
                                    "default OUT.examples.jsonl beside --output_json.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "detect/segment: OUT.worst.png goes here; "
                                  "default the folder of --output_json.")
_VAE_CKPT = flags.DEFINE_string("vae_ckpt", None, "segment: the VQ-VAE vae-oid.npz.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "With --ckpt: examples per batch.")
_MAX_LEN = flags.DEFINE_integer("max_decode_len", None, "With --ckpt: most tokens per answer; "
                                f"default per task {DEFAULT_DECODE_LEN}.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "With --ckpt: float32 | bfloat16 | float16.")
_PROGRESS = flags.DEFINE_bool("progress", True, "With --ckpt: progress bars on stderr.")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(2)  # as main.py: no background thread may print under the error line


def _check_flags() -> dict:
  """Everything that needs no file read -> the resolved output paths. Exits 2."""
  if _TASK.value not in TASKS:
    _fail(f"--task={_TASK.value}: unknown task; expected one of {', '.join(TASKS)}"
          if _TASK.value else f"--task is required: one of {', '.join(TASKS)}")
  if not _DATA.value:
    _fail("--data=REF.jsonl is required (the references)")
  if bool(_CKPT.value) == bool(_PREDICTIONS.value):
    _fail("give either --ckpt=MODEL (with --tokenizer) to decode --data, or "
          "--predictions=PRED.jsonl to score answers made elsewhere" +
          (", not both" if _CKPT.value else ""))
  if not _OUTPUT_JSON.value:
    _fail("--output_json=OUT.json is required")
  if _BATCH_SIZE.value < 1:
    _fail(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}")
  if _MAX_LEN.value is not None and _MAX_LEN.value < 1:
    _fail(f"--max_decode_len must be >= 1, got {_MAX_LEN.value}")
  if _TASK.value == "segment" and not _VAE_CKPT.value:
    _fail("--task=segment needs --vae_ckpt=vae-oid.npz (the VQ-VAE that decodes <seg> tokens)")
  if _CKPT.value and not _TOKENIZER.value:
    from paligemma_jax.ckpt import hf_checkpoint
    if not hf_checkpoint.is_hf_dir(_CKPT.value):
      _fail("--ckpt needs --tokenizer=PATH (paligemma_tokenizer.model)")
  if _TASK.value == "caption":
    from paligemma_jax.eval import metrics
    try:
      metrics._pycocoevalcap()
    except ImportError as e:
      _fail(str(e))
  out_json = _OUTPUT_JSON.value
  out = dict(output_json=out_json,
             output_jsonl=_OUTPUT_JSONL.value or os.path.splitext(out_json)[0] +
             ".examples.jsonl")
  if _TASK.value in ("detect", "segment"):
    out["output_dir"] = _OUTPUT_DIR.value or os.path.dirname(os.path.abspath(out_json))
  from paligemma_jax import paths
  try:
    paths.check_outputs(**out, vae_ckpt=_VAE_CKPT.value)
  except paths.PathError as e:
    _fail(str(e))
  return out


def _model_predictions(examples, task):
  """Loads --ckpt, decodes the examples greedily and scores the references' perplexity."""
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as main.py's default config
  from paligemma_jax.ckpt import checkpoint
  from paligemma_jax.eval import evaluators
  from paligemma_jax.pipeline import PaliGemmaPipeline
  try:
    pipe = PaliGemmaPipeline.from_files(_CKPT.value, _TOKENIZER.value, dtype=_DTYPE.value)
    answers = evaluators.predict(pipe, examples, batch_size=_BATCH_SIZE.value,
                                 max_decode_len=_MAX_LEN.value or DEFAULT_DECODE_LEN[task],
                                 progress=_PROGRESS.value)
    ppl, nll = evaluators.perplexity(pipe, examples, batch_size=_BATCH_SIZE.value,
                                     progress=_PROGRESS.value)
  except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
    _fail(str(e))
  return answers, ppl, nll


def _report_missing(matched, total):
  if not matched.missing:
    return
  shown = "; ".join(f"line {m['line']} ({os.path.basename(m['image'])}, {m['prefix']!r}): "
                    f"{m['reason']}" for m in matched.missing[:SHOW_MISSING])
  more = f"; and {len(matched.missing) - SHOW_MISSING} more" if len(
      matched.missing) > SHOW_MISSING else ""
  print(f"warning: {len(matched.missing)} of {total} examples have no prediction and count as "
        f"wrong answers (empty prediction): {shown}{more}", file=sys.stderr)


def _write_jsonl(path, records):
  from paligemma_jax.answers import outputs
  text = "".join(outputs.dumps_strict(r, ensure_ascii=False) + "\n" for r in records)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; settings are --flag=VALUE")
  out = _check_flags()
  task = _TASK.value
  from paligemma_jax.answers import outputs
  from paligemma_jax.data import image as image_lib
  from paligemma_jax.data import jsonl
  from paligemma_jax.eval import evaluators, report
  try:
    examples, gt_masks = evaluators.read_references(_DATA.value)
    evaluators.check_references(task, examples, gt_masks, _DATA.value)
    ppl = nll = None
    if _PREDICTIONS.value:
      matched = evaluators.read_predictions(_PREDICTIONS.value, examples, _DATA.value)
    else:
      jsonl.check_images(examples, _DATA.value)
      answers, ppl, nll = _model_predictions(examples, task)
      matched = evaluators.Matched(answers, [], 0)
    _report_missing(matched, len(examples))
    vae = outputs.LazyVae(_VAE_CKPT.value) if _VAE_CKPT.value else None
    scores, per_example = evaluators.score(task, examples, matched.predictions, vae=vae,
                                           gt_masks=gt_masks)
  except (jsonl.DataError, image_lib.ImageError, ValueError, OSError) as e:
    _fail(str(e))

  missing = {m["index"] for m in matched.missing}
  records = []
  for i, (ex, pred, s) in enumerate(zip(examples, matched.predictions, per_example)):
    rec = dict(index=i, line=ex.line, image=ex.image, prefix=ex.prefix, prediction=pred,
               references=evaluators.references(ex), missing=i in missing, **s)
    if nll is not None:
      rec["nll"] = nll[i]
    records.append(rec)
  result = dict(task=task, num_examples=len(examples), **scores)
  if ppl is not None:
    result["perplexity"] = ppl
  result["missing_predictions"] = len(matched.missing)
  result["missing_examples"] = [{k: m[k] for k in ("line", "image", "prefix", "reason")}
                             for m in matched.missing[:SHOW_MISSING]]
  if _PREDICTIONS.value:
    result["unmatched_predictions"] = matched.unmatched
  result.update(data=os.path.abspath(_DATA.value),
                source=os.path.abspath(_PREDICTIONS.value or _CKPT.value),
                output_jsonl=os.path.abspath(out["output_jsonl"]))
  try:
    if "output_dir" in out:
      os.makedirs(out["output_dir"], exist_ok=True)
      # Named after OUT.json, so that detect and segment scored into one folder keep both.
      stem = os.path.splitext(os.path.basename(out["output_json"]))[0]
      worst = os.path.join(out["output_dir"], f"{stem}.worst.png")
      report.draw_worst(task, examples, matched.predictions, per_example, worst, vae=vae,
                        gt_masks=gt_masks)
      result["worst_png"] = worst
    _write_jsonl(out["output_jsonl"], records)
    outputs.write_json(out["output_json"], result)
  except (ValueError, OSError) as e:
    _fail(f"results not written: {e}")
  shown = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "task"}
  print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in shown.items()))
  print(f"wrote {out['output_json']} and {out['output_jsonl']}" +
        (f" and {result['worst_png']}" if "worst_png" in result else ""))


def _parse_flags(argv):
  """absl's parser, with a bad flag reported as one `error:` line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
