"""The interactive session (paligemma_jax/interactive.py, main.py --interactive)."""
import io
import os
import pty
import re
import subprocess
import sys
import types

import numpy as np
import pexpect
import pexpect.fdpexpect
import pytest
from PIL import Image

from tests.conftest import demo_pipeline
from paligemma_jax import interactive, options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_IMAGE = os.path.join(REPO, "assets", "demo.png")
BOX_ANSWER = "<loc0100><loc0200><loc0600><loc0900> cat"


class FakePipe:
  """Answers a box for detect prompts, words otherwise; records every call."""

  def __init__(self):
    self.calls = []

  def check_decoding(self, sampler, **kw):  # as the pipeline's, for a 1400-piece vocabulary
    sampler, forbidden = options.check_decoding_options(sampler, **kw)
    if sampler.kind == "topk" and sampler.k > 1400:
      raise ValueError(f"k={sampler.k} exceeds the 1400 token ids left to generate")
    return sampler, forbidden

  def generate(self, images, prompts, **kw):
    self.calls.append((images, prompts, kw))
    text = BOX_ANSWER if prompts[0].startswith("detect") else "a cat"
    if "fail" in prompts[0]:
      raise ValueError("prompt too long for the cache")
    timing = dict(compile_s=0.5 if len(self.calls) == 1 else 0.0, prefill_s=0.1, decode_s=0.4)
    return [types.SimpleNamespace(prompt=prompts[0], text=text, tokens=[5, 6, 7, 8],
                                  logprobs=[0.0] * 4, timing=timing)]


def _session(tmp_path, lines, **kw):
  out = io.StringIO()
  pipe = FakePipe()
  session = interactive.Session(pipe, DEMO_IMAGE, out=out, output_dir=str(tmp_path / "pics"), **kw)
  feed = iter(lines)

  def read_line(prompt):
    assert prompt == interactive.PROMPT
    try:
      return next(feed)
    except StopIteration:
      raise EOFError from None
  return session, pipe, out, read_line


def test_session_commands_and_errors(tmp_path):
  other = tmp_path / "other.png"
  Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(other)
  lines = ["caption en", "", "/image " + str(other), "/image /nope.png", "/sampler topk(5, 0.7)",
           "/sampler topk(0)", "/sampler topk(k=2000)", "/max_len 0", "/max_len 7", "/seed 3",
           "/save " + str(tmp_path),
           "/bogus", "please fail", "detect cat", "/save " + str(tmp_path / "d" / "s.png"),
           "/show", "/help", "caption en"]
  session, pipe, out, read_line = _session(tmp_path, lines, forbidden_ids=(9, 3))
  assert session.run(read_line) == 0  # ends at end of input (EOF)
  text = out.getvalue()
  assert "error: k=2000 exceeds the 1400 token ids left to generate (still using topk(5, 0.7))" \
      in text
  assert "a cat\n[4 tokens, 0.50 s, 8.0 tokens/s; compiled in 0.5 s]" in text
  assert "[4 tokens, 0.50 s, 8.0 tokens/s]" in text  # later turns: nothing compiled
  assert f"image: {other} (50x30)" in text
  assert "error: /nope.png: no such image file (still using" in text
  assert "sampler: topk(5, 0.7)" in text and "k must be an integer >= 1" in text
  assert "error: usage: /max_len N" in text and "max_len: 7" in text
  assert "error: no picture yet" in text and "unknown command /bogus" in text
  assert "error: prompt too long for the cache" in text
  picture = re.search(r"1 objects; picture: (\S+)", text).group(1)
  assert os.path.isfile(picture)
  with open(picture, "rb") as a, open(tmp_path / "d" / "s.png", "rb") as b:
    assert a.read() == b.read()
  assert "/sampler SPEC" in text and "seed: 3" in text
  # The same pipeline throughout; settings reach generate; the image switch stuck.
  prompts = [c[1][0] for c in pipe.calls]
  assert prompts == ["caption en", "please fail", "detect cat", "caption en"]
  kw = pipe.calls[-1][2]
  assert kw["max_decode_len"] == 7 and str(kw["sampler"]) == "topk(5, 0.7)"
  assert pipe.calls[-1][0][0].size == (50, 30)
  assert kw["seed"] == 3 + 4  # seed + turn
  assert all(c[2]["forbidden_ids"] == (3, 9) for c in pipe.calls)


def test_exit_words_end_the_loop(tmp_path):
  for word in ("exit", "quit", "/exit"):
    session, pipe, out, read_line = _session(tmp_path, [word, "caption en"])
    assert session.run(read_line) == 0 and pipe.calls == []


def test_bad_start_arguments(capsys):
  assert interactive.main(lambda: pytest.fail("no model"), "/nope.png") == 2
  assert interactive.main(lambda: pytest.fail("no model"), DEMO_IMAGE, sampler="beam") == 2
  err = capsys.readouterr().err
  assert "no such image file" in err and "unknown sampler" in err


def test_options_beyond_the_vocabulary_stop_the_session_before_compiling(tokenizer, capsys):
  pipe = demo_pipeline(tokenizer, cache_dtype="bfloat16")
  for kw, message in [(dict(sampler="topk(1401)"), "k=1401 exceeds the 1400 token ids"),
                      (dict(forbidden_ids=(1536,)), "1536 is not a token id of this model")]:
    assert interactive.main(lambda: pipe, DEMO_IMAGE, **kw) == 2
    assert message in capsys.readouterr().err
  assert not pipe._compiled


def test_real_program_through_a_terminal(tmp_path, tmp_path_factory):
  """main.py --interactive driven through a pseudo-terminal, as a person would type."""
  home = tmp_path_factory.getbasetemp() / "pg_home"  # shared with test_jobs: XLA cache
  home.mkdir(exist_ok=True)
  other = tmp_path / "other.png"
  Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(other)
  env = dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home), TERM="dumb")
  # A pty pair and subprocess (fork+exec in C) rather than pexpect.spawn, whose Python-level
  # fork is unsafe once this test process runs JAX threads.
  master, slave = pty.openpty()
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), "--interactive",
                           f"--image={DEMO_IMAGE}", "--max_decode_len=6",
                           f"--output_dir={tmp_path / 'pics'}"],
                          stdin=slave, stdout=slave, stderr=slave, env=env, cwd=str(tmp_path),
                          start_new_session=True)
  os.close(slave)
  child = pexpect.fdpexpect.fdspawn(master, encoding="utf-8", timeout=240)
  log = io.StringIO()
  child.logfile_read = log
  stats = r"\[(\d+) tokens, [\d.]+ s, [\d.naninf]+ tokens/s(; compiled in [\d.]+ s)?\]"

  def step(line, pattern, exact=False):
    child.sendline(line)
    (child.expect_exact if exact else child.expect)(pattern)
    match = child.match
    child.expect_exact(interactive.PROMPT)
    return match

  try:
    child.expect_exact("embedded default")
    child.expect_exact(interactive.PROMPT)
    first = step("caption en", stats)
    assert int(first.group(1)) <= 6 and first.group(2)  # the first prompt compiles
    again = step("caption en", stats)
    assert again.group(2) is None  # same pipeline, same shapes: nothing compiled again
    step(f"/image {other}", f"image: {other} (50x30)", exact=True)
    step("/image /nope.png", "error: /nope.png: no such image file", exact=True)
    step("/sampler nucleus(0.9)", "sampler: nucleus(0.9, 1)", exact=True)
    step("/sampler nucleus(2)", "error: sampler 'nucleus(2)': p must be in (0, 1]", exact=True)
    step("/sampler topk(k=5000)", "error: sampler topk(5000, 1): k=5000 exceeds the 1280 token "
         "ids left to generate", exact=True)
    step("/frobnicate", "error: unknown command /frobnicate", exact=True)
    step("/max_len 4", "max_len: 4", exact=True)
    child.sendline("detect cat")
    child.expect(stats)
    assert int(child.match.group(1)) <= 4
    child.expect(r"picture: (\S+\.png)")
    picture = child.match.group(1)
    child.expect_exact(interactive.PROMPT)
    assert os.path.isfile(picture) and picture.startswith(str(tmp_path / "pics"))
    assert Image.open(picture).size == (50, 30)  # drawn on the switched image
    step(f"/save {tmp_path / 'saved.png'}", "saved", exact=True)
    with open(picture, "rb") as a, open(tmp_path / "saved.png", "rb") as b:
      assert a.read() == b.read()
    child.sendline("exit")
    child.expect(pexpect.EOF)
  except (pexpect.TIMEOUT, pexpect.EOF) as e:
    pytest.fail(f"{type(e).__name__}; session so far:\n{log.getvalue()[-4000:]}")
  finally:
    if proc.poll() is None:
      proc.kill()
    returncode = proc.wait()
    child.close()
  assert returncode == 0, log.getvalue()[-2000:]
  assert "Traceback" not in log.getvalue()
