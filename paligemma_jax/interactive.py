"""An interactive session: one loaded, compiled model; prompts and commands typed at a prompt.

    python main.py --interactive --image=cat.jpg [--ckpt=... --tokenizer=...]

    paligemma> caption en
    a cat sitting on a sofa
    [7 tokens, 0.21 s, 33.3 tokens/s]
    paligemma> /image dog.jpg
    paligemma> detect dog
    paligemma> /save dog_boxes.png

Every prompt runs on the same pipeline object, so shapes compiled once stay compiled.
"""
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

from paligemma_jax.sample import decode
from paligemma_jax.data import image as image_lib
from paligemma_jax import paths
from paligemma_jax.answers import outputs

PROMPT = "paligemma> "
EXIT_WORDS = ("exit", "quit", "/exit", "/quit")

HELP = """\
Type a prompt (e.g. "caption en", "answer en what is this?", "detect cat", "segment dog")
to ask about the current image, or a command:
  /image PATH        use another image
  /sampler SPEC      greedy | temperature(t) | topk(k, t) | nucleus(p, t)
  /max_len N         most tokens to generate per answer
  /seed N            sampling seed (each answer uses seed + its turn number)
  /save PATH         copy the last detect/segment picture to PATH
  /show              the current image and settings
  /help              this text
  exit               leave (or Ctrl-D)"""


class Session:
  """The state of one session and the handling of one input line at a time."""

  def __init__(self, pipe, image_path: str, *, sampler: str = "greedy", max_decode_len: int = 32,
               seed: int = 0, answer_start: Optional[str] = None, forbidden_ids=(),
               output_dir: Optional[str] = None, vae_ckpt: Optional[str] = None, out=None):
    self.pipe = pipe
    self.out = out or sys.stdout
    self.image_path = image_path
    self.image = image_lib.load_image(image_path)  # ImageError: the caller reports it
    # ValueError: likewise (a bad sampler, or a forbidden id outside this model's vocabulary)
    self.sampler, self.forbidden_ids = pipe.check_decoding(sampler, forbidden_ids=forbidden_ids)
    self.max_decode_len = max_decode_len
    self.seed = seed
    self.answer_start = answer_start
    self.output_dir = output_dir
    self.vae_ckpt = vae_ckpt
    self._vae = outputs.LazyVae(vae_ckpt) if vae_ckpt else None  # read at the first segment
    self.turn = 0
    self.last_picture = None

  def say(self, msg: str = ""):
    print(msg, file=self.out, flush=True)

  def error(self, msg: str):
    self.say(f"error: {msg}")

  # -------------------------------------------------------------------------

  def handle(self, line: str) -> bool:
    """Handles one input line; False when the session should end."""
    line = line.strip()
    if not line:
      return True
    if line.lower() in EXIT_WORDS:
      return False
    if line.startswith("/"):
      name, _, arg = line.partition(" ")
      command = self.COMMANDS.get(name.lower())
      if command is None:
        self.error(f"unknown command {name}; type /help for the list")
      else:
        command(self, arg.strip())
      return True
    self.ask(line)
    return True

  def _image(self, arg):
    if not arg:
      return self.error("usage: /image PATH")
    path = os.path.expanduser(arg)
    try:
      img = image_lib.load_image(path)
    except image_lib.ImageError as e:
      return self.error(f"{e} (still using {self.image_path})")
    self.image, self.image_path = img, path
    self.say(f"image: {path} ({img.width}x{img.height})")

  def _sampler(self, arg):
    try:
      self.sampler, _ = self.pipe.check_decoding(arg or "", forbidden_ids=self.forbidden_ids)
    except ValueError as e:
      return self.error(f"{e} (still using {self.sampler})")
    self.say(f"sampler: {self.sampler}")

  def _int_arg(self, arg, usage, lowest):
    try:
      value = int(arg)
    except ValueError:
      value = None
    if value is None or value < lowest:
      self.error(f"usage: {usage}")
      return None
    return value

  def _max_len(self, arg):
    value = self._int_arg(arg, "/max_len N with N >= 1", 1)
    if value is not None:
      self.max_decode_len = value
      self.say(f"max_len: {value}")

  def _seed(self, arg):
    value = self._int_arg(arg, "/seed N with N >= 0", 0)
    if value is not None:
      self.seed = value
      self.say(f"seed: {value}")

  def _save(self, arg):
    if not arg:
      return self.error("usage: /save PATH")
    if self.last_picture is None:
      return self.error("no picture yet: ask a detect or segment prompt first")
    dest = os.path.expanduser(arg)
    if os.path.isdir(dest):
      dest = os.path.join(dest, os.path.basename(self.last_picture))
    try:
      os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
      shutil.copyfile(self.last_picture, dest)
    except OSError as e:
      return self.error(f"cannot save to {dest}: {e}")
    self.say(f"saved {dest}")

  def _show(self, arg):
    del arg
    self.say(f"image: {self.image_path} ({self.image.width}x{self.image.height})  "
             f"sampler: {self.sampler}  max_len: {self.max_decode_len}  seed: {self.seed}")

  def _help(self, arg):
    del arg
    self.say(HELP)

  COMMANDS = {"/image": _image, "/sampler": _sampler, "/max_len": _max_len, "/seed": _seed,
              "/save": _save, "/show": _show, "/help": _help}

  # -------------------------------------------------------------------------

  def ask(self, prompt: str):
    """Answers one prompt about the current image, with its numbers and picture."""
    self.turn += 1
    try:
      [r] = self.pipe.generate([self.image], [prompt], max_decode_len=self.max_decode_len,
                               sampler=self.sampler, seed=self.seed + self.turn,
                               answer_start=self.answer_start,
                               forbidden_ids=self.forbidden_ids)
    except ValueError as e:
      return self.error(str(e))
    t = r.timing
    n, seconds = len(r.tokens), t["prefill_s"] + t["decode_s"]
    rate = n / seconds if seconds > 0 else float("nan")
    self.say(r.text)
    stats = f"[{n} tokens, {seconds:.2f} s, {rate:.1f} tokens/s"
    if t.get("compile_s", 0) > 0:
      stats += f"; compiled in {t['compile_s']:.1f} s"
    self.say(stats + "]")
    self._picture(r.text, prompt)

  def _picture(self, text, prompt):
    try:
      answer = outputs.task_answer(text, prompt, (self.image.height, self.image.width),
                                   self._vae)
      if answer is None:
        return
      if self.output_dir is None:
        self.output_dir = tempfile.mkdtemp(prefix="paligemma_session_")
      folder = os.path.join(self.output_dir, f"turn_{self.turn:03d}")
      written = outputs.write_task_outputs(answer, self.image, folder)
    except Exception as e:  # noqa: BLE001 -- drawing must not end the session
      return self.error(f"could not draw the answer: {type(e).__name__}: {e}")
    if answer.warning:
      self.say(f"warning: {answer.warning}")
    self.last_picture = written["annotated_png"]
    self.say(f"{len(written['objects'])} objects; picture: {self.last_picture}")

  # -------------------------------------------------------------------------

  def run(self, read_line: Optional[Callable[[str], str]] = None) -> int:
    """Reads lines until exit or end of input; returns the exit status (0)."""
    if read_line is None:
      read_line = input
      if sys.stdin.isatty():
        try:
          import readline  # noqa: F401 -- line editing and history for input()
        except ImportError:
          pass
    self.say(f"image: {self.image_path} ({self.image.width}x{self.image.height}); "
             "type a prompt, /help for commands, exit to leave")
    while True:
      try:
        line = read_line(PROMPT)
      except EOFError:
        self.say()
        return 0
      except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
        self.say()
        continue
      try:
        if not self.handle(line):
          return 0
      except KeyboardInterrupt:
        self.say("\ninterrupted")
      except Exception as e:  # noqa: BLE001 -- report and keep the model loaded
        self.error(f"{type(e).__name__}: {e}")


def main(make_pipeline: Callable, image_path: str, **session_kw) -> int:
  """Checks the image, loads the model once, runs the loop. Returns the exit status."""
  try:
    image_lib.load_image(image_path)
    decode.parse_sampler(session_kw.get("sampler", "greedy"))
    paths.check_outputs(output_dir=session_kw.get("output_dir"),
                        vae_ckpt=session_kw.get("vae_ckpt"))
  except (image_lib.ImageError, ValueError) as e:  # PathError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  t0 = time.perf_counter()
  pipe = make_pipeline()
  try:
    session = Session(pipe, image_path, **session_kw)
  except ValueError as e:  # e.g. topk(k) with k beyond the vocabulary, checked before compiling
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"model ready in {time.perf_counter() - t0:.1f} s", flush=True)
  return session.run()
