"""Batch jobs: many images through `PaliGemmaPipeline.generate`, one JSON line per result.

    python main.py --images='photos/*.jpg' --prompt="caption en" --output_jsonl=out.jsonl
    python main.py --images=photos/ --output_jsonl=out.jsonl --batch_size=16
    python main.py --images=requests.jsonl --output_jsonl=out.jsonl  # {"image", "prompt"} lines

Nothing is lost: every finished result is appended as one line, flushed and fsync'ed. A job
killed at any point and started again with the same arguments truncates a half-written last
line, skips the (image, prompt) pairs already in the output and does the rest, so the output
ends with exactly one line per input. An input that cannot be used (missing, unreadable, empty,
not an image, too many pixels) gets a line with "error" and the job goes on; a rerun retries
the inputs whose line is an error (a restored image, a failed generate call) and replaces
those lines. A file that is not such an output is refused and never modified.

Images are decoded and resized by a few threads while the device runs the current batch.
"""
import collections
import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from paligemma_jax.data import image as image_lib
from paligemma_jax.answers import outputs
from paligemma_jax import paths

try:
  import fcntl
except ImportError:  # not POSIX: no lock against two jobs on one output
  fcntl = None

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm", ".jfif", ".ico")
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
GENERATE_FAILED = "generate failed: "


class JobError(ValueError):
  """A job that cannot start (bad --images, bad output file); the message says why."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: `image` as the user gave it (written to the output), `path` to open."""
  index: int
  image: str
  path: str
  prompt: str

  @property
  def key(self):
    return (self.image, self.prompt)


# ---------------------------------------------------------------------------
# Inputs.

def _is_image_name(name: str) -> bool:
  return not os.path.basename(name).startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _read_jsonl_inputs(path: str, prompt: str) -> list:
  base = os.path.dirname(os.path.abspath(path))
  items = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise JobError(f"{path}: cannot read ({e})") from None
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise JobError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"]:
      raise JobError(f'{path}:{n}: expected {{"image": PATH, "prompt": "..."}}, got {line[:80]}')
    p = row.get("prompt", row.get("prefix", prompt))  # "prefix": the trainer's data lines
    if not isinstance(p, str):
      raise JobError(f"{path}:{n}: prompt must be a string")
    image = row["image"]
    # Relative paths are relative to the .jsonl file, so a request file travels with its images.
    items.append(Item(len(items), image, os.path.join(base, os.path.expanduser(image)), p))
  return items


def collect_inputs(spec: str, prompt: str) -> list:
  """--images value -> [Item], in a stable order (sorted paths, or the .jsonl's order).

  spec: a directory (its image files by extension, not recursive), a .jsonl file of
  {"image": path, "prompt": "..."} lines (prompt optional, default `prompt`; the trainer's
  lines, with "prefix", serve as they are; relative paths are relative to the .jsonl), a glob (`**` recurses) or one image file.
  """
  if not spec:
    raise JobError("--images is empty")
  expanded = os.path.expanduser(spec)
  if os.path.isdir(expanded):
    names = sorted(n for n in os.listdir(expanded)
                   if _is_image_name(n) and not os.path.isdir(os.path.join(expanded, n)))
    paths = [os.path.join(spec, n) for n in names]
  elif expanded.lower().endswith(".jsonl") and os.path.isfile(expanded):
    items = _read_jsonl_inputs(expanded, prompt)
    if not items:
      raise JobError(f"{spec}: no inputs (no non-blank lines)")
    return items
  elif glob.has_magic(spec):
    paths = sorted(p for p in glob.glob(expanded, recursive=True) if not os.path.isdir(p))
  elif os.path.lexists(expanded):
    paths = [spec]
  else:
    raise JobError(f"--images={spec}: no such file or directory")
  if not paths:
    raise JobError(f"--images={spec}: no image files found")
  return [Item(i, p, os.path.expanduser(p), prompt) for i, p in enumerate(paths)]


# ---------------------------------------------------------------------------
# The output file: repair on restart, one fsync'ed line per result.

_RESULT_START = re.compile(rb'\{"index": \d+')
_AFTER_INDEX = b', "image": "'


def _is_result(rec) -> bool:
  """The shape of the lines `run_job` writes: index, image, prompt, and text or error."""
  return (isinstance(rec, dict) and isinstance(rec.get("index"), int)
          and isinstance(rec.get("image"), str) and isinstance(rec.get("prompt"), str)
          and ("text" in rec or "error" in rec))


def _torn_result(data: bytes) -> bool:
  """Whether `data` (no newline) can be the start of a line `ResultWriter` writes."""
  m = _RESULT_START.match(data)
  if m is None:
    return b'{"index": '.startswith(data)
  rest = data[m.end():]
  return rest.startswith(_AFTER_INDEX) or _AFTER_INDEX.startswith(rest)


def _read_results(path: str) -> tuple:
  """-> ([(record, line bytes)], bytes of a torn last line). Raises JobError, touching nothing,
  unless every line is a result line of this program."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  lines = data[:end].split(b"\n")[:-1]
  done = []
  for n, line in enumerate(lines, 1):
    try:
      rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
      rec = None
    if not _is_result(rec):
      raise JobError(_not_results(path, n, line))
    done.append((rec, line + b"\n"))
  if end < len(data) and not _torn_result(data[end:]):
    raise JobError(_not_results(path, len(lines) + 1, data[end:]))
  return done, data[end:]


def _not_results(path, n, line: bytes) -> str:
  shown = line[:60].decode("utf-8", "replace") + ("..." if len(line) > 60 else "")
  return (f"{path} is not a results file of this program (line {n}: {shown!r}); it is left "
          "untouched: choose another --output_jsonl")


def read_done(path: str) -> list:
  """Records already in `path` (an output of this module). Truncates a half-written last line.

  The whole file is checked first: a file with any line this program would not write is
  refused (JobError) and never modified. Only the last line can be partial (lines are written
  whole, in order, with O_APPEND), and only the start of a result line is dropped.
  """
  return [rec for rec, _ in _read_done(path)]


def _read_done(path: str) -> list:
  """read_done's records with their lines: [(record, line bytes)]."""
  if not os.path.exists(path):
    return []
  done, torn = _read_results(path)
  if torn:
    with open(path, "r+b") as f:
      f.truncate(sum(len(line) for _, line in done))
      f.flush()
      os.fsync(f.fileno())
    print(f"note: {path}: removed a half-written last line ({len(torn)} bytes)", file=sys.stderr)
  return done


def _retry_failed(done: list, todo: list) -> tuple:
  """Inputs whose line is an error are done again -> (todo, the error records they replace).

  An error from generate (maybe transient) is retried; one from reading the image only when
  the image now opens (restored), so a still-broken input keeps its line and loads no model.
  """
  failed = collections.defaultdict(list)
  for rec, _ in done:
    if "error" in rec:
      failed[(rec["image"], rec["prompt"])].append(rec)
  kept, replaced = [], []
  for item in todo:
    old = failed[item.key].pop(0) if failed[item.key] else None
    if old is not None and not old["error"].startswith(GENERATE_FAILED) \
        and _open(item)[1] is not None:
      continue  # still cannot be read: its error line stays
    kept.append(item)
    if old is not None:
      replaced.append(old)
  return kept, replaced


def pending(items: list, records: list) -> list:
  """Items without a result yet. An (image, prompt) pair given k times needs k results."""
  done = collections.Counter((r["image"], r["prompt"]) for r in records)
  todo = []
  for item in items:
    if done[item.key] > 0:
      done[item.key] -= 1
    else:
      todo.append(item)
  return todo


class ResultWriter:
  """Appends whole JSON lines; each is flushed and fsync'ed before write() returns."""

  def __init__(self, path: str):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    self.path = path
    self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if fcntl is not None:
      try:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        os.close(self.fd)
        raise JobError(f"{path}: another job is writing this file") from None

  def write(self, record: dict):
    """Strict JSON: ValueError (nothing written) for a NaN or infinity in `record`."""
    self._write_all(self.fd, (outputs.dumps_strict(record, ensure_ascii=False) + "\n")
                    .encode("utf-8"))

  @staticmethod
  def _write_all(fd, data: bytes):
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)

  def rewrite(self, lines: list):
    """Replaces the file by `lines` (bytes, each ending in a newline), atomically: a locked
    temporary file next to it, fsync'ed, then renamed over it. Later writes go to the new file."""
    parent = os.path.dirname(os.path.abspath(self.path))
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=os.path.basename(self.path) + ".",
                               suffix=".tmp")
    os.close(fd)
    fd = None
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_APPEND)
      if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new, nobody else can hold it
      shutil.copymode(self.path, tmp)
      self._write_all(fd, b"".join(lines))
      os.replace(tmp, self.path)
    except BaseException:
      if fd is not None:
        os.close(fd)
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
      os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
      os.close(dir_fd)
    os.close(self.fd)
    self.fd = fd

  def close(self):
    if self.fd is not None:
      os.close(self.fd)  # releases the lock
      self.fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ---------------------------------------------------------------------------
# Decoding ahead of the device.

@dataclasses.dataclass
class Decoded:
  item: Item
  pixels: Optional[np.ndarray] = None   # (S, S, 3) float32 in [0, 255], already resized
  hw: Optional[tuple] = None            # original (height, width)
  picture: object = None                # the PIL image, kept only when it will be drawn on
  error: Optional[str] = None


def _open(item: Item) -> tuple:
  """-> (PIL image, None) or (None, why it cannot be used). Never raises."""
  try:
    if os.path.isfile(item.path) and os.path.getsize(item.path) == 0:
      return None, f"{item.image}: empty file (0 bytes)"
    return image_lib.load_image(item.path), None
  except image_lib.ImageError as e:
    msg = str(e)
    if item.path != item.image and msg.startswith(item.path):
      msg = item.image + msg[len(item.path):]
    return None, msg
  except Exception as e:  # noqa: BLE001 -- one odd file must not stop the job
    return None, f"{item.image}: {type(e).__name__}: {e}"


def decode_item(item: Item, size: int, keep_picture: bool) -> Decoded:
  """Never raises: a bad input comes back with `error` set."""
  img, error = _open(item)
  if error is not None:
    return Decoded(item, error=error)
  try:
    # The resize runs here, off the device thread. preprocess() of an (S, S, 3) array resizes
    # S -> S, which is exact (weights 0), so generate() sees the same pixels as from the file.
    pixels = image_lib.resize_bilinear(np.asarray(img), size)
    return Decoded(item, pixels, (img.height, img.width), img if keep_picture else None)
  except Exception as e:  # noqa: BLE001
    return Decoded(item, error=f"{item.image}: {type(e).__name__}: {e}")


def decoded_stream(items, decode: Callable, executor, lookahead: int):
  """Yields decode(item) in order while up to `lookahead` later items decode in threads."""
  queue = collections.deque()
  it = iter(items)
  for item in it:
    queue.append(executor.submit(decode, item))
    if len(queue) >= lookahead:
      break
  while queue:
    done = queue.popleft().result()
    nxt = next(it, None)
    if nxt is not None:
      queue.append(executor.submit(decode, nxt))
    yield done


def batches(stream, batch_size: int, on_error: Callable):
  """Good decodes grouped by batch_size (the last group may be shorter); errors -> on_error."""
  group = []
  for d in stream:
    if d.error is not None:
      on_error(d)
      continue
    group.append(d)
    if len(group) == batch_size:
      yield group
      group = []
  if group:
    yield group


# ---------------------------------------------------------------------------
# The job.

def run_job(make_pipeline: Callable, images: str, prompt: str, output_jsonl: str, *,
            batch_size: int = 8, max_decode_len: int = 32, sampler: str = "greedy",
            seed: int = 0, answer_start: Optional[str] = None, forbidden_ids=(),
            output_dir: Optional[str] = None, vae_ckpt: Optional[str] = None,
            progress: bool = True, log=None) -> dict:
  """Runs (or resumes) a job; returns a summary dict. Raises JobError for a job that cannot start.

  make_pipeline: () -> PaliGemmaPipeline, called only when something is left to do; the
  sampler and forbidden_ids are checked against it before anything compiles (a bad one
  stops the job rather than failing every image).
  Each line: {"index", "image", "prompt", "text", "tokens"} (+ "objects", "skipped",
  "output_dir" for detect/segment prompts), or {"index", "image", "prompt", "error"}.
  Pictures for detect/segment prompts go to output_dir/<index>_<name>/ when output_dir is set.
  """
  from tqdm import tqdm
  log = log or (lambda msg: print(msg, file=sys.stderr))
  if batch_size < 1:
    raise JobError(f"--batch_size must be >= 1, got {batch_size}")
  if not output_jsonl:
    raise JobError("--images needs --output_jsonl=PATH")
  if paths.same_file(os.path.expanduser(images), output_jsonl):
    raise JobError(f"--output_jsonl={output_jsonl} is the --images file: results would be "
                   "mixed with the requests; write them to another file")
  try:
    paths.check_outputs(output_jsonl=output_jsonl, output_dir=output_dir, vae_ckpt=vae_ckpt)
  except paths.PathError as e:
    raise JobError(str(e)) from None
  items = collect_inputs(images, prompt)
  with ResultWriter(output_jsonl) as writer:  # locked before the file is read or repaired
    done = _read_done(output_jsonl)
    todo = pending(items, [rec for rec, _ in done if "error" not in rec])
    todo, replaced = _retry_failed(done, todo)
    summary = dict(inputs=len(items), already_done=len(items) - len(todo), results=0, errors=0,
                   seconds=0.0, images_per_s=0.0, output_jsonl=output_jsonl)
    if not todo:
      log(f"nothing to do: all {len(items)} inputs already have a line in {output_jsonl}")
      return summary
    if summary["already_done"] or replaced:
      log(f"resuming: {summary['already_done']} of {len(items)} already done"
          + (f"; retrying {len(replaced)} that ended in an error" if replaced else ""))
    pipe = make_pipeline()
    try:
      sampler, forbidden_ids = pipe.check_decoding(sampler, forbidden_ids=forbidden_ids)
    except ValueError as e:
      raise JobError(str(e)) from None
    vae = outputs.LazyVae(vae_ckpt) if vae_ckpt else None  # read at the first segment
    if replaced:  # their error lines go; each gets a new line below
      gone = {id(rec) for rec in replaced}
      writer.rewrite([line for rec, line in done if id(rec) not in gone])
    size = pipe.config.image_size

    def decode(item):
      draw = bool(output_dir) and outputs.task_of(item.prompt) is not None
      return decode_item(item, size, draw)

    bar = tqdm(total=len(items), initial=summary["already_done"], unit="img",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)

    def emit(record, error=False):
      try:
        writer.write(record)
      except ValueError as e:  # a NaN or infinity: not written as invalid JSON
        record = dict(index=record["index"], image=record["image"], prompt=record["prompt"],
                      error=f"result not written: {e}")
        writer.write(record)
        error = True
      summary["errors" if error else "results"] += 1
      bar.update(1)
      if summary["errors"]:
        bar.set_postfix(errors=summary["errors"], refresh=False)

    def on_error(d):
      emit(dict(index=d.item.index, image=d.item.image, prompt=d.item.prompt, error=d.error),
           error=True)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS, "decode") as executor:
      stream = decoded_stream(todo, decode, executor, lookahead=2 * batch_size)
      def run(group):
        rows = group + [group[-1]] * (batch_size - len(group))  # one compiled shape for all
        return pipe.generate([d.pixels for d in rows], [d.item.prompt for d in rows],
                             max_decode_len=max_decode_len, sampler=sampler,
                             seed=seed + group[0].item.index, answer_start=answer_start,
                             forbidden_ids=forbidden_ids)

      for group in batches(stream, batch_size, on_error):
        try:
          results = list(zip(group, run(group)))
        except Exception:  # noqa: BLE001 -- e.g. one prompt too long: find which, alone
          results = []
          for d in group:
            try:
              results.append((d, run([d])[0]))
            except Exception as e:  # noqa: BLE001
              emit(dict(index=d.item.index, image=d.item.image, prompt=d.item.prompt,
                        error=f"{GENERATE_FAILED}{type(e).__name__}: {e}"), error=True)
        for d, r in results:
          emit(_result_record(d, r, output_dir, vae))
    bar.close()
    summary["seconds"] = time.perf_counter() - t0
    done = summary["results"] + summary["errors"]
    summary["images_per_s"] = done / summary["seconds"] if summary["seconds"] > 0 else 0.0
    log(f"done: {summary['results']} results, {summary['errors']} errors in "
        f"{summary['seconds']:.1f}s ({summary['images_per_s']:.2f} images/s); "
        f"wrote {output_jsonl}")
    return summary


def _result_record(d: Decoded, r, output_dir, vae) -> dict:
  """The JSONL line of one answer; a detect/segment answer is parsed (and its masks
  decoded) once, for both its fields here and its pictures in `output_dir`."""
  item = d.item
  rec = dict(index=item.index, image=item.image, prompt=item.prompt, text=r.text,
             tokens=r.tokens)
  try:
    answer = outputs.task_answer(r.text, item.prompt, d.hw, vae)
    if answer is not None:
      rec.update(outputs.answer_fields(answer))
      if output_dir:
        stem = os.path.splitext(os.path.basename(item.image))[0] or "image"
        sub = os.path.join(output_dir, f"{item.index:06d}_{stem}")
        written = outputs.write_task_outputs(answer, d.picture, sub)
        rec["output_dir"] = sub
        rec["annotated_png"] = written["annotated_png"]
        for entry, w in zip(rec["objects"], written.get("objects", [])):
          if "mask_png" in w:
            entry["mask_png"] = w["mask_png"]
  except Exception as e:  # noqa: BLE001 -- the answer is kept; drawing it failed
    rec["warning"] = f"could not write the detect/segment outputs: {type(e).__name__}: {e}"
  return rec
