"""Batch jobs (paligemma_jax/jobs.py and main.py --images): inputs, resume, bad inputs, outputs."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from paligemma_jax import jobs
from paligemma_jax.data.image import load_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, h, w, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return str(path)


def _huge_png_header(path, side=40_000):
  """A PNG whose header claims side x side pixels: refused before any pixel is decoded."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))
  return str(path)


def _lines(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data.endswith(b"\n")
  return [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture(scope="module")
def pipe(demo_pipe):
  return demo_pipe


# ---------------------------------------------------------------------------
# No model.

def test_collect_inputs(tmp_path):
  for name in ("b.png", "a.JPG", "notes.txt", ".hidden.png"):
    (tmp_path / name).write_bytes(b"x")
  (tmp_path / "sub.png").mkdir()
  items = jobs.collect_inputs(str(tmp_path), "caption en")
  assert [os.path.basename(i.image) for i in items] == ["a.JPG", "b.png"]
  assert [i.index for i in items] == [0, 1] and {i.prompt for i in items} == {"caption en"}
  assert [os.path.basename(i.image) for i in jobs.collect_inputs(str(tmp_path / "*.png"), "p")] \
      == ["b.png"]
  assert len(jobs.collect_inputs(str(tmp_path / "b.png"), "p")) == 1

  req = tmp_path / "req.jsonl"
  req.write_text('{"image": "b.png", "prompt": "detect cat"}\n\n{"image": "/abs/x.png"}\n')
  a, b = jobs.collect_inputs(str(req), "caption en")
  assert (a.image, a.path, a.prompt) == ("b.png", str(tmp_path / "b.png"), "detect cat")
  assert (b.image, b.path, b.prompt, b.index) == ("/abs/x.png", "/abs/x.png", "caption en", 1)

  for spec, message in [(str(tmp_path / "nope"), "no such file"),
                        (str(tmp_path / "*.gif"), "no image files"),
                        (str(tmp_path / "empty_dir_does_not_exist/"), "no such file")]:
    with pytest.raises(jobs.JobError, match=message):
      jobs.collect_inputs(spec, "p")
  req.write_text('{"image": "b.png"}\n{"prompt": "no image"}\n')
  with pytest.raises(jobs.JobError, match=r"req.jsonl:2: expected"):
    jobs.collect_inputs(str(req), "p")
  req.write_text('{"image": "b.png"\n')
  with pytest.raises(jobs.JobError, match=r"req.jsonl:1: not valid JSON"):
    jobs.collect_inputs(str(req), "p")


def test_read_done_truncates_a_torn_last_line_only(tmp_path):
  out = tmp_path / "out.jsonl"
  good = '{"index": 0, "image": "a.png", "prompt": "p", "text": "x"}\n'
  out.write_text(good + '{"index": 1, "image": "b.p')
  records = jobs.read_done(str(out))
  assert [r["image"] for r in records] == ["a.png"] and out.read_text() == good
  assert jobs.read_done(str(tmp_path / "missing.jsonl")) == []
  out.write_text(good + "garbage\n" + good)
  with pytest.raises(jobs.JobError, match=r"out.jsonl is not a results file of this program "
                     r"\(line 2: 'garbage'\)"):
    jobs.read_done(str(out))
  assert out.read_text() == good + "garbage\n" + good


def test_pending_counts_repeated_inputs():
  items = [jobs.Item(i, im, im, p) for i, (im, p) in
           enumerate([("a", "p"), ("a", "p"), ("a", "q"), ("b", "p")])]
  done = [dict(image="a", prompt="p"), dict(image="b", prompt="p")]
  assert [i.index for i in jobs.pending(items, done)] == [1, 2]


def test_writer_lock_refuses_a_second_job(tmp_path):
  path = str(tmp_path / "o.jsonl")
  with jobs.ResultWriter(path) as w:
    w.write({"image": "a", "prompt": "p"})
    with pytest.raises(jobs.JobError, match="another job"):
      jobs.ResultWriter(path)
  assert _lines(path) == [{"image": "a", "prompt": "p"}]


# ---------------------------------------------------------------------------
# With the tiny random model, in process.

def test_job_results_bad_inputs_and_rerun(tmp_path, pipe):
  d = tmp_path / "imgs"
  d.mkdir()
  good = [_png(d / f"g{i}.png", 30 + 17 * i, 200 - 23 * i, seed=i) for i in range(5)]
  (d / "empty.png").write_bytes(b"")
  (d / "text.jpg").write_bytes(b"not an image at all")
  _huge_png_header(d / "huge.png")
  os.symlink(str(d / "gone.png"), str(d / "dangling.png"))
  out = tmp_path / "out" / "results.jsonl"
  summary = jobs.run_job(lambda: pipe, str(d), "caption en", str(out), batch_size=3,
                         max_decode_len=6, progress=False)
  records = _lines(out)
  assert summary["results"] == 5 and summary["errors"] == 4 and len(records) == 9
  assert sorted(r["index"] for r in records) == list(range(9))
  by_name = {os.path.basename(r["image"]): r for r in records}
  assert "empty file" in by_name["empty.png"]["error"]
  assert "not an image" in by_name["text.jpg"]["error"]
  assert "pixels" in by_name["huge.png"]["error"]
  assert "no such image file" in by_name["dangling.png"]["error"]
  # The job (decoded and resized in threads, last batch padded) == generate() on the files'
  # PIL images (rows are independent; the same batch of 3 reuses the compiled shape).
  refs = pipe.generate([load_image(p) for p in good[:3]], ["caption en"] * 3, max_decode_len=6)
  refs += pipe.generate([load_image(p) for p in good[3:] + good[-1:]], ["caption en"] * 3,
                        max_decode_len=6)[:2]
  for path, ref in zip(good, refs):
    rec = by_name[os.path.basename(path)]
    assert rec["tokens"] == ref.tokens and rec["text"] == ref.text and "error" not in rec

  before = out.read_bytes()
  again = jobs.run_job(lambda: pytest.fail("nothing to do, no model"), str(d), "caption en",
                       str(out), batch_size=3, max_decode_len=6, progress=False)
  assert again["already_done"] == 9 and again["results"] == 0 and out.read_bytes() == before


def test_jsonl_prompts_and_detect_pictures(tmp_path, pipe):
  a, b = _png(tmp_path / "a.png", 64, 80), _png(tmp_path / "b.png", 50, 50, seed=3)
  req = tmp_path / "req.jsonl"
  req.write_text("\n".join(json.dumps(r) for r in [
      {"image": "a.png", "prompt": "detect cat"}, {"image": "b.png", "prompt": "caption explode"},
      {"image": "a.png", "prompt": "caption en"}, {"image": "missing.png", "prompt": "detect"},
      {"image": "b.png"}]))

  class Flaky:  # generate() refuses any batch holding the "explode" prompt
    config = pipe.config
    check_decoding = pipe.check_decoding

    def generate(self, images, prompts, **kw):
      if any("explode" in p for p in prompts):
        raise ValueError("prompt too long")
      return pipe.generate(images, prompts, **kw)

  out, pics = tmp_path / "out.jsonl", tmp_path / "pics"
  jobs.run_job(Flaky, str(req), "caption en", str(out), batch_size=3, max_decode_len=6,
               output_dir=str(pics), progress=False)
  records = {r["index"]: r for r in _lines(out)}
  assert len(records) == 5
  assert [records[i]["prompt"] for i in range(5)] == ["detect cat", "caption explode",
                                                      "caption en", "detect", "caption en"]
  # The batch [a detect, b explode, a caption] failed; retried one by one, only explode fails.
  assert records[1]["error"] == "generate failed: ValueError: prompt too long"
  assert "error" not in records[0] and "error" not in records[2] and "error" not in records[4]
  det = records[0]
  assert isinstance(det["objects"], list) and isinstance(det["skipped"], list)
  assert det["output_dir"] == str(pics / "000000_a") and os.path.isfile(det["annotated_png"])
  assert json.loads((pics / "000000_a" / "objects.json").read_text())["task"] == "detect"
  assert "objects" not in records[2] and "objects" not in records[4]
  assert "no such image file" in records[3]["error"]
  assert sorted(os.listdir(pics)) == ["000000_a"]


def test_answer_start_and_forbidden_ids_reach_the_results(tmp_path, pipe):
  """A forced start is part of each line's text, so a detect answer parses with its boxes."""
  img = _png(tmp_path / "a.png", 64, 80)
  start = "<loc0100><loc0200><loc0600><loc0900> cat ;"
  out = tmp_path / "out.jsonl"
  banned = list(range(1000, 1400))
  jobs.run_job(lambda: pipe, img, "detect cat", str(out), batch_size=1, max_decode_len=4,
               answer_start=start, forbidden_ids=banned, progress=False)
  [rec] = _lines(out)
  assert rec["text"].startswith(start) and not set(banned) & set(rec["tokens"])
  first = rec["objects"][0]
  assert first["label"] == "cat"
  np.testing.assert_allclose(first["box"], [100 / 1023 * 64, 200 / 1023 * 80, 600 / 1023 * 64,
                                            900 / 1023 * 80])


def test_options_beyond_the_vocabulary_stop_the_job(tmp_path, pipe):
  """Not one error line per image: the job refuses to start, before compiling anything."""
  img = _png(tmp_path / "a.png", 20, 20)
  out = tmp_path / "out.jsonl"
  compiled = dict(pipe._compiled)
  for kw, message in [(dict(sampler="topk(1401)"), "k=1401 exceeds the 1400 token ids"),
                      (dict(forbidden_ids=[1536]), "1536 is not a token id of this model")]:
    with pytest.raises(jobs.JobError, match=message):
      jobs.run_job(lambda: pipe, img, "caption en", str(out), progress=False, **kw)
  assert out.read_bytes() == b"" and pipe._compiled == compiled


# ---------------------------------------------------------------------------
# The real program, killed and restarted.

def _env(tmp_path_factory):
  home = tmp_path_factory.getbasetemp() / "pg_home"  # shared: tokenizer and XLA cache
  home.mkdir(exist_ok=True)
  return dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(home))


def test_killed_job_resumes_without_loss_or_duplicates(tmp_path, tmp_path_factory):
  d = tmp_path / "imgs"
  d.mkdir()
  n = 36
  for i in range(n):
    _png(d / f"im{i:02d}.png", 20 + i, 40, seed=i)
  (d / "zz_bad.png").write_bytes(b"\x89PNG broken")
  out = tmp_path / "out.jsonl"
  cmd = [sys.executable, os.path.join(REPO, "main.py"), f"--images={d}", f"--output_jsonl={out}",
         "--batch_size=2", "--max_decode_len=4"]
  env = _env(tmp_path_factory)
  with open(tmp_path / "log1", "w") as log:
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_bytes().count(b"\n") >= 4):
      assert proc.poll() is None, (tmp_path / "log1").read_text()
      assert time.monotonic() < deadline
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  written = out.read_bytes().count(b"\n")
  assert 4 <= written < n + 1, "the job finished before it could be killed"
  with open(out, "ab") as f:  # as if killed in the middle of a write
    f.write(b'{"index": 30, "image": "' + str(d).encode() + b'/im30.p')

  r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "half-written last line" in r.stderr and "resuming" in r.stderr
  records = _lines(out)  # every line whole and valid JSON
  assert len(records) == n + 1
  assert sorted(r["index"] for r in records) == list(range(n + 1))
  assert len({r["image"] for r in records}) == n + 1
  assert [r for r in records if "error" in r] == [records_by_image(records, d / "zz_bad.png")]
  assert all(len(r["tokens"]) <= 4 for r in records if "error" not in r)


def records_by_image(records, path):
  [r] = [r for r in records if r["image"] == str(path)]
  return r


@pytest.mark.parametrize("args, message", [
    (["--images=/nonexistent/dir"], "--images needs --output_jsonl"),
    (["--images=x", "--interactive"], "do not combine"),
    (["--images=x", "--output_jsonl=o.jsonl", "--beam_size=2", "--stream"],
     "--beam_size=2, --stream=True: for a single --image run only"),
    (["--interactive", "--sampler=topk(inf)"], "k must be a finite number"),
])
def test_cli_errors(args, message, tmp_path):
  r = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=tmp_path,
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", HOME=str(tmp_path)))
  assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
