"""Evaluators: big_vision's PaliGemma metrics (caption, vqa, segment, perplexity) plus
detection mAP, on answers made here (`evaluators.predict`) or elsewhere (`--predictions`).

  metrics.py     one function per metric, on plain Python values
  evaluators.py  score(task, examples, predictions), predict(pipe, ...), perplexity(pipe, ...),
                 reading references and predictions files
  report.py      the picture of the worst detect/segment examples
"""
