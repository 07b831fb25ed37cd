"""One function per metric, on plain Python values (no model, no files).

Boxes are (y1, x1, y2, x2), PaliGemma's order, in any consistent unit; masks are (h, w) bool.
Captioning metrics call pycocoevalcap (`pip install -e '.[eval]'`), detection mAP pycocotools.
"""
import contextlib
import io
import re
from typing import Sequence

import numpy as np

EVAL_EXTRA = "pip install -e '.[eval]'"

# ---------------------------------------------------------------------------
# Captioning: CIDEr-D, BLEU-4, exact match.

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_WORD = re.compile(r"\w+(?:[-.'/]\w+)*|'\w+|\S")


def caption_tokens(text: str) -> list:
  """A caption -> lowercase tokens, as coco-caption's PTBTokenizer + punctuation filter would
  give them, without Java.

  PTB-like: lowercase; clitics split off ("dog's" -> "dog 's", "don't" -> "do n't"); words keep
  inner hyphens, dots, slashes and apostrophes ("t-shirt", "3.5"); every token made only of
  punctuation is dropped (coco drops . , ? ! : ; - -- ... ' '' ` `` and brackets; here any
  such token). Differences from Stanford's PTB tokenizer are rare ("u.s." -> "u.s").
  """
  text = _CLITIC.sub(r" \1", text.lower())
  return [t for t in _WORD.findall(text) if any(c.isalnum() for c in t)]


def _pycocoevalcap():
  """The scorer classes (Cider, Bleu); ImportError naming the extra to install."""
  try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
  except ImportError as e:
    raise ImportError(f"caption metrics need pycocoevalcap ({e}); install it with "
                      f"{EVAL_EXTRA}") from None
  return Cider, Bleu


def _coco_inputs(references: Sequence[Sequence[str]], predictions: Sequence[str]):
  """-> (gts, res) as the pycocoevalcap scorers take them: {i: [tokenized string]}."""
  if len(references) != len(predictions):
    raise ValueError(f"{len(references)} reference lists but {len(predictions)} predictions")
  gts = {i: [" ".join(caption_tokens(r)) for r in refs] for i, refs in enumerate(references)}
  res = {i: [" ".join(caption_tokens(p))] for i, p in enumerate(predictions)}
  return gts, res


def cider(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> tuple:
  """CIDEr-D (pycocoevalcap's `Cider`: n=1..4, sigma 6, clipped, x10), on `caption_tokens`.

  references: one list of reference captions per example; predictions: one caption each.
  -> (corpus score = mean of the per-example scores, [per-example score]). The idf comes from
  all references together, so a corpus of one example scores 0.
  """
  Cider, _ = _pycocoevalcap()
  gts, res = _coco_inputs(references, predictions)
  if not gts:
    return 0.0, []
  score, scores = Cider().compute_score(gts, res)
  return float(score), [float(s) for s in scores]


def bleu4(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> tuple:
  """BLEU-4 (pycocoevalcap's `Bleu(4)`, closest reference length), on `caption_tokens`.

  -> (corpus BLEU-4, from the n-gram counts of all examples, [per-example BLEU-4]).
  """
  _, Bleu = _pycocoevalcap()
  gts, res = _coco_inputs(references, predictions)
  if not gts:
    return 0.0, []
  with contextlib.redirect_stdout(io.StringIO()):
    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
  return float(score[3]), [float(s) for s in scores[3]]


def caption_exact_match(references: Sequence[str], prediction: str) -> float:
  """1.0 when the prediction's `caption_tokens` equal those of some reference, else 0.0."""
  return float(caption_tokens(prediction) in [caption_tokens(r) for r in references])


# ---------------------------------------------------------------------------
# VQA: accuracy after big_vision's VQAv2 answer normalisation, and ANLS.
# The tables and rules of the official VQA evaluation, which big_vision's vqav2.py follows.

_VQA_PUNCT = (";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!")
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}
_VQA_REPLACE = {**_VQA_CONTRACTIONS, **_VQA_NUMBERS}


def normalize_vqa(text: str) -> str:
  """big_vision's VQAv2 answer cleanup (`stripspace_vqav2` + `postprocess_vqav2_text`, as
  the official VQA evaluation): whitespace, punctuation (removed, or a space between words),
  full stops not in a number, lowercase, articles dropped, number words to digits
  ("two" -> "2"), contractions restored ("dont" -> "don't").

  big_vision applies the second part only when an example's references disagree; here it is
  applied to every answer and reference, so that "A Dog." and "dog" match everywhere.
  """
  txt = text.replace("\n", " ").replace("\t", " ").strip()
  has_digit_comma = re.search(r"(\d)(\,)(\d)", txt) is not None
  out = txt
  for p in _VQA_PUNCT:
    # As the official code (a bug kept on purpose): a digit comma removes every punctuation.
    if has_digit_comma or f"{p} " in txt or f" {p}" in txt:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  out = re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, flags=re.UNICODE)  # the official regex, "(?!<=" quirk kept
  words = [_VQA_REPLACE.get(w, w) for w in out.lower().split() if w not in _VQA_ARTICLES]
  return " ".join(words)


def vqa_accuracy(references: Sequence[str], prediction: str) -> float:
  """big_vision's vqa.py accuracy on `normalize_vqa`-ed strings: one reference -> 1.0 on an
  exact match, else 0.0; several (VQA's ten human answers) -> min(1, matches / 3) (no
  leave-one-out averaging, as vqa.py)."""
  answer = normalize_vqa(prediction)
  refs = [normalize_vqa(r) for r in references]
  matches = sum(answer == r for r in refs)
  if len(refs) == 1:
    return float(matches)
  return min(1.0, matches / 3.0)


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions of characters)."""
  if len(a) < len(b):
    a, b = b, a
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def anls(references: Sequence[str], prediction: str, threshold: float = 0.5) -> float:
  """ANLS of one answer (DocVQA; big_vision's `anls_metric`): the best over references of
  1 - NL if NL < threshold else 0, NL = levenshtein / max(len(ref), len(pred)); an empty
  reference scores 1 only against an empty answer. Strings are compared as DocVQA's official
  script does: lowercase, whitespace collapsed (big_vision's docvqa config: to_lower=True).
  """
  pred = " ".join(prediction.lower().split())
  best = 0.0
  for ref in references:
    ref = " ".join(ref.lower().split())
    if not ref:
      best = max(best, float(pred == ""))
      continue
    nl = levenshtein(ref, pred) / max(len(ref), len(pred))
    best = max(best, 1.0 - nl if nl < threshold else 0.0)
  return best


# ---------------------------------------------------------------------------
# Boxes and masks.

def box_area(box) -> float:
  y1, x1, y2, x2 = box
  return max(y2 - y1, 0.0) * max(x2 - x1, 0.0)


def box_iou(a, b) -> float:
  """IoU of two (y1, x1, y2, x2) boxes; 0.0 when both are empty."""
  inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
  union = box_area(a) + box_area(b) - inter
  return inter / union if union > 0 else 0.0


def mask_iou(pred: np.ndarray, ref: np.ndarray) -> float:
  """IoU of two (h, w) bool masks, as big_vision's segmentation evaluator; 0.0 when both
  are empty (big_vision would divide 0 by 0)."""
  pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
  if pred.shape != ref.shape:
    raise ValueError(f"masks differ in shape: {pred.shape} vs {ref.shape}")
  inter = int((pred & ref).sum())
  union = int(pred.sum()) + int(ref.sum()) - inter
  return inter / union if union else 0.0


def match_at(references: Sequence[tuple], predictions: Sequence[tuple], threshold=0.5) -> dict:
  """A per-example detection proxy: greedy one-to-one matching of same-label boxes at IoU >=
  threshold, predictions in their order. references, predictions: [(label, box)].
  -> {"matched", "precision", "recall", "f1", "mean_iou"} (precision and recall 1.0 when there
  is nothing to find or nothing predicted; mean_iou: each reference's best same-label IoU)."""
  free = list(range(len(references)))
  matched = 0
  for label, box in predictions:
    ious = [(box_iou(box, references[j][1]), j) for j in free if references[j][0] == label]
    if ious and max(ious)[0] >= threshold:
      free.remove(max(ious)[1])
      matched += 1
  precision = matched / len(predictions) if predictions else float(not references)
  recall = matched / len(references) if references else float(not predictions)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  best = [max([box_iou(b, rb) for lab, b in predictions if lab == rl], default=0.0)
          for rl, rb in references]
  return dict(matched=matched, precision=precision, recall=recall, f1=f1,
              mean_iou=float(np.mean(best)) if best else float(not predictions))


def coco_map(references: Sequence[Sequence[tuple]], predictions: Sequence[Sequence[tuple]],
             image_sizes: Sequence[tuple]) -> dict:
  """COCO box mAP with pycocotools' COCOeval (iouType "bbox", up to 100 objects an image).

  references: per image [(label, (y1, x1, y2, x2))] in pixels; predictions: per image
  [(label, (y1, x1, y2, x2), score)]; image_sizes: per image (h, w). Categories: every label
  of either side (a label no reference has never counts: COCO skips classes without ground
  truth). Equal scores keep their order (COCOeval sorts stably: image order, then object
  order). -> {"map": AP@[.5:.95], "map50": AP@.5}; None where no image has a reference object.
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  if not len(references) == len(predictions) == len(image_sizes):
    raise ValueError(f"{len(references)} reference lists, {len(predictions)} prediction lists, "
                     f"{len(image_sizes)} image sizes")
  if not any(references):
    return {"map": None, "map50": None}
  if not any(predictions):
    return {"map": 0.0, "map50": 0.0}
  labels = sorted({o[0] for objs in (*references, *predictions) for o in objs})
  cat = {label: i + 1 for i, label in enumerate(labels)}

  def xywh(box):
    y1, x1, y2, x2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]

  gt_anns = []
  for i, objs in enumerate(references):
    for label, box in objs:
      gt_anns.append(dict(id=len(gt_anns) + 1, image_id=i + 1, category_id=cat[label],
                          bbox=xywh(box), area=box_area(box), iscrowd=0))
  dt_anns = [dict(image_id=i + 1, category_id=cat[label], bbox=xywh(box), score=float(score))
             for i, objs in enumerate(predictions) for label, box, score in objs]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    gt = COCO()
    gt.dataset = dict(images=[dict(id=i + 1, height=h, width=w)
                              for i, (h, w) in enumerate(image_sizes)],
                      categories=[dict(id=c, name=label) for label, c in cat.items()],
                      annotations=gt_anns)
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dt_anns), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return {"map": float(ev.stats[0]), "map50": float(ev.stats[1])}
