"""Training and evaluation examples: big_vision's `bv:jsonl` format, one example a line:

  {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

`image` is relative to the JSONL file's folder (or absolute). The same file is the trainer's
data, the evaluator's references and the batch job's input.

Axis letters: N examples, T text_len + 1 tokens.
"""
import concurrent.futures
import dataclasses
import json
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from paligemma_jax.data import image as image_lib

FIELDS = ("image", "prefix", "suffix")


class DataError(ValueError):
  """A data file that cannot be used; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class Example:
  image: str  # resolved path
  prefix: str
  suffix: object  # str; a list of str (several references) where the caller allows it
  line: int  # 1-based line in its file


def json_lines(path: str):
  """Yields (line number, "FILE:LINE", parsed value) for each non-empty line of a JSONL file;
  DataError naming the file and line for one that is not JSON."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        yield number, where, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg} at column {e.colno}): "
                        f"{line.strip()[:80]!r}") from None


def read_examples(path: str, suffix_lists: bool = False, rows: Optional[list] = None) -> list:
  """Reads a JSONL file of examples -> [Example]. Empty lines are skipped.

  Raises DataError naming the file and line for a line that is not a JSON object, lacks a
  field or has one of the wrong type, and for an empty file. suffix_lists: a list of strings is
  allowed as `suffix` (the evaluator's several references). rows: a list that receives each
  example's parsed line (a dict), for callers that read further fields of the same pass.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such data file")
  base = os.path.dirname(os.path.abspath(path))
  examples = []
  for number, where, row in json_lines(path):
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got "
                      f"{type(row).__name__}")
    missing = [k for k in FIELDS if k not in row]
    if missing:
      raise DataError(f"{where}: missing field{'s' * (len(missing) > 1)} "
                      f"{', '.join(missing)} (each line needs {', '.join(FIELDS)})")
    for key in ("image", "prefix"):
      if not isinstance(row[key], str):
        raise DataError(f"{where}: field {key!r} must be a string, got "
                        f"{type(row[key]).__name__}")
    suffix = row["suffix"]
    is_list = (isinstance(suffix, list) and suffix and all(isinstance(s, str) for s in suffix))
    if not (isinstance(suffix, str) or (suffix_lists and is_list)):
      want = "a string or a non-empty list of strings" if suffix_lists else "a string"
      raise DataError(f"{where}: field 'suffix' must be {want}, got {json.dumps(suffix)[:60]}")
    examples.append(Example(os.path.normpath(os.path.join(base, row["image"])), row["prefix"],
                            suffix, number))
    if rows is not None:
      rows.append(row)
  if not examples:
    raise DataError(f"{path}: no examples (the file is empty)")
  return examples


def check_images(examples: Sequence[Example], path: str):
  """Opens every image's header (no decoding). An unreadable image is fatal, before training
  starts: skipping it would silently change what the model learns and the data order that an
  exact resume relies on; fix or remove the line."""
  for ex in examples:
    try:
      with Image.open(ex.image) as img:
        if img.width == 0 or img.height == 0:
          raise ValueError("zero size")
    except FileNotFoundError:
      raise DataError(f"{path}:{ex.line}: image {ex.image} does not exist (unreadable images "
                      "stop training: fix or remove the line)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise DataError(f"{path}:{ex.line}: image {ex.image} cannot be read ({e}; unreadable "
                      "images stop training: fix or remove the line)") from None


@dataclasses.dataclass
class Tokenized:
  tokens: np.ndarray     # (N, T) int32
  mask_ar: np.ndarray    # (N, T) int32
  mask_loss: np.ndarray  # (N, T) int32
  truncated: int         # examples cut to fit text_len (each keeps its eos)


def tokenize(tokenizer, examples: Sequence[Example], text_len: int, path: str) -> Tokenized:
  """Every example in big_vision's training layout (`Tokenizer.training_example`).

  Raises DataError when text_len cannot hold an example's `[bos] prefix "\\n"` plus one suffix
  token and the eos: such an example would teach nothing.
  """
  rows, truncated, too_short = [], 0, []
  for ex in examples:
    head = 1 + len(tokenizer.encode(ex.prefix)) + len(tokenizer.encode("\n"))
    if head + 2 > text_len + 1:
      too_short.append((ex.line, head))
    tokens, mask_ar, mask_loss, cut = tokenizer.training_example(ex.prefix, ex.suffix, text_len)
    rows.append((tokens, mask_ar, mask_loss))
    truncated += bool(cut)
  if too_short:
    line, head = max(too_short, key=lambda x: x[1])
    raise DataError(
        f"{path}: text_len={text_len} is too small for {len(too_short)} of {len(examples)} "
        f"examples (line {line}: bos + prefix + separator alone take {head} tokens, and the "
        f"suffix needs at least 2 more); use text_len >= {head + 1}")
  tokens, mask_ar, mask_loss = (np.stack(r) for r in zip(*rows))
  return Tokenized(tokens, mask_ar, mask_loss, truncated)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so that any step's
  examples can be found again on resume."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, seed: int, start: int, count: int) -> np.ndarray:
  """Indices of examples start .. start+count-1 of the endless stream of shuffled epochs."""
  positions = np.arange(start, start + count)
  epochs, within = np.divmod(positions, num_examples)
  orders = {e: epoch_order(num_examples, seed, e) for e in np.unique(epochs)}
  return np.array([orders[e][i] for e, i in zip(epochs, within)], np.int64)


def text_widths(text: Tokenized) -> np.ndarray:
  """(N,) positions each example fills: through its eos, the last position with a loss."""
  width = text.mask_loss.shape[1]
  return width - np.argmax(text.mask_loss[:, ::-1] > 0, axis=1)


def length_buckets(widths: np.ndarray, text_lens: Sequence[int]) -> np.ndarray:
  """(N,) index into the ascending text_lens of the shortest that holds each example (a
  text_len of L holds L + 1 positions, as `Tokenizer.training_example`)."""
  return np.searchsorted(np.asarray(text_lens) + 1, widths, side="left")


def bucketed_epoch(buckets: np.ndarray, num_buckets: int, batch_size: int, seed: int,
                   epoch: int) -> list:
  """Epoch `epoch` as batches that each hold examples of one bucket -> [(bucket, indices)].

  The epoch's shuffled order (`epoch_order`) is split by bucket and cut into batches; a
  bucket's last partial batch waits for a later epoch (whose order differs); the batches are
  shuffled together. Every epoch has the same number of batches, and the plan is a function of
  (seed, epoch) only, as `batch_indices`."""
  order = epoch_order(len(buckets), seed, epoch)
  plan = []
  for b in range(num_buckets):
    members = order[buckets[order] == b]
    full = len(members) // batch_size * batch_size
    plan += [(b, chunk) for chunk in members[:full].reshape(-1, batch_size)]
  shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(plan))
  return [plan[i] for i in shuffle]


class Pixels:
  """Decodes and preprocesses images on a thread pool: `get(examples)` -> (n, S, S, 3) float32
  in [-1, 1]. `prefetch` starts a batch early so that decoding overlaps training.

  cache_bytes: keep up to this many bytes of preprocessed pictures, so that a picture asked
  several questions (or seen again next epoch) is decoded once; the first ones seen stay."""

  def __init__(self, size: int, threads: int = 2, cache_bytes: int = 0):
    self.size = size
    self.pool = concurrent.futures.ThreadPoolExecutor(threads)
    self._pending = {}
    self._cache, self._cache_left = {}, cache_bytes

  def _load(self, path: str) -> np.ndarray:
    pixels = self._cache.get(path)
    if pixels is None:
      pixels = image_lib.preprocess(image_lib.load_image(path), self.size)
      if pixels.nbytes <= self._cache_left:
        self._cache_left -= pixels.nbytes  # (a race between threads only costs a few bytes)
        self._cache[path] = pixels
    return pixels

  def prefetch(self, key, paths: Sequence[str]):
    self._pending[key] = [self.pool.submit(self._load, p) for p in paths]

  def get(self, key, paths: Optional[Sequence[str]] = None) -> np.ndarray:
    futures = self._pending.pop(key, None)
    if futures is None:
      self.prefetch(key, paths)
      futures = self._pending.pop(key)
    return np.stack([f.result() for f in futures])

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)
