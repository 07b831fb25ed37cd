"""SentencePiece tokenizer and big_vision's prompt layout.

Inference input: `[bos] + tok(prefix) + tok("\\n")`, the separator tokenized on
its own; `mask_ar` is 0 over it. An optional forced start of the answer follows
with `mask_ar` 1. Special pieces (`<locNNNN>`, `<segNNN>`) are looked up by name.
"""
import os
import re
import tempfile
from typing import Optional, Sequence

import numpy as np
import sentencepiece as spm

SEPARATOR = "\n"
LOC_PIECES = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_PIECES = tuple(f"<seg{i:03d}>" for i in range(128))


class Tokenizer:
  """Wraps a sentencepiece model file (e.g. `paligemma_tokenizer.model`)."""

  def __init__(self, path: str | os.PathLike):
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    self.pad_id = max(self.sp.pad_id(), 0)
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"{path}: the tokenizer defines no bos or eos piece")

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  def encode(self, text: str) -> list:
    return self.sp.EncodeAsIds(text)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self.sp.DecodeIds(ids)

  def piece_id(self, piece: str) -> int:
    """The id of a piece by name; KeyError if the vocabulary lacks it."""
    i = self.sp.PieceToId(piece)
    if self.sp.IdToPiece(i) != piece:
      raise KeyError(f"{self.path}: the tokenizer has no piece {piece!r}")
    return i

  def loc_ids(self) -> np.ndarray:
    return np.array([self.piece_id(p) for p in LOC_PIECES])

  def seg_ids(self) -> np.ndarray:
    return np.array([self.piece_id(p) for p in SEG_PIECES])

  def prompt(self, prefix: str, answer_start: Optional[str] = None):
    """-> (tokens, mask_ar) int32 arrays of the same length."""
    tokens = [self.bos_id] + self.encode(prefix) + self.encode(SEPARATOR)
    mask_ar = [0] * len(tokens)
    if answer_start:
      start = self.encode(answer_start)
      tokens += start
      mask_ar += [1] * len(start)
    return np.array(tokens, np.int32), np.array(mask_ar, np.int32)

  def training_example(self, prefix: str, suffix: str, text_len: int):
    """big_vision's training layout, padded to text_len + 1 tokens -> (tokens, mask_ar,
    mask_loss) int32 (text_len + 1,) and whether it was truncated.

    `[bos] + tok(prefix) + tok("\\n")` (mask_ar 0, no loss), then `tok(suffix) + [eos]`
    (mask_ar 1, loss), then pad (mask_ar 1, no loss). The model sees tokens[:-1] and predicts
    tokens[1:]. Too long, it keeps its eos (big_vision's truncation would drop it): the suffix
    is cut before the eos, and a prefix longer than the whole budget is cut too.
    """
    head = [self.bos_id] + self.encode(prefix) + self.encode(SEPARATOR)
    tail = self.encode(suffix) + [self.eos_id]
    n = text_len + 1
    truncated = len(head) + len(tail) > n
    if truncated:
      head = head[:max(n - 1, 1)]
      tail = tail[:max(n - len(head) - 1, 0)] + [self.eos_id]
    tokens = np.full(n, self.pad_id, np.int32)
    mask_ar, mask_loss = np.ones(n, np.int32), np.zeros(n, np.int32)
    tokens[:len(head)], mask_ar[:len(head)] = head, 0
    tokens[len(head):len(head) + len(tail)] = tail
    mask_loss[len(head):len(head) + len(tail)] = 1
    return tokens, mask_ar, mask_loss, truncated


_DEMO_CORPUS = """a cat sitting on a red sofa next to a window
two dogs running on the beach at sunset
a plate of food with rice and vegetables
a man riding a bicycle down a city street
caption en describe en answer en question en ocr detect segment
what is in the image ? how many people are there ? what color is the car ?
a small boat on a calm lake surrounded by trees and mountains
the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9
a bowl of fruit with apples oranges and bananas on a wooden table
a group of children playing football in a park on a sunny day
cat ; dog ; person ; car ; bird ; tree ; house ; bicycle ; boat ; chair
"""


def train_tiny_tokenizer(out_dir: Optional[str] = None, vocab_size: int = 1400,
                         corpus_text: str = _DEMO_CORPUS, name: str = "tiny_tokenizer") -> str:
  """Trains a small sentencepiece model with Gemma's special ids and the loc/seg pieces.

  pad 0, eos 1, bos 2, unk 3, then "\\n", `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`,
  then learned pieces. For the embedded demo and tests; never the real vocabulary.
  Returns the path of the `.model` file.
  """
  out_dir = out_dir or tempfile.mkdtemp(prefix="pg_tokenizer_")
  os.makedirs(out_dir, exist_ok=True)
  corpus = os.path.join(out_dir, "corpus.txt")
  with open(corpus, "w") as f:
    for _ in range(20):
      f.write(corpus_text)
  prefix = os.path.join(out_dir, name)
  spm.SentencePieceTrainer.Train(
      input=corpus, model_prefix=prefix, vocab_size=vocab_size, hard_vocab_limit=False,
      model_type="bpe", character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      user_defined_symbols=[SEPARATOR, *LOC_PIECES, *SEG_PIECES],
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
  return prefix + ".model"


def is_special(piece: str) -> bool:
  return bool(re.fullmatch(r"<(loc\d{4}|seg\d{3})>", piece))
