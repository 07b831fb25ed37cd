"""Bad input through the Python API (issue 20, items 5 and 6): a clear ValueError naming what is
wrong, before anything compiles; what a user plausibly passes gives the same answer as a file."""
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from tests import bv_fixtures
from tests.conftest import spec_pipeline
from paligemma_jax.sample import decode
from paligemma_jax.data import image
from paligemma_jax import pipeline
from paligemma_jax.data.tokenizer import Tokenizer

SPEC = bv_fixtures.SPECS["pg1_mqa"]


def _pipe(tokenizer, edit=None):
  return spec_pipeline("pg1_mqa", tokenizer, seed=5, edit=edit)


@pytest.fixture(scope="module")
def pipe(tokenizer):
  return _pipe(tokenizer)


def _pixels(pipe, img):
  return pipe.make_batch([img], ["caption en"])["images"][0]


# ---------------------------------------------------------------------------
# Images: uint8 and [0, 1] float arrays, PIL images and paths give load_image's pixels.

def _exif_rotated_jpeg(tmp_path, test_image):
  img = Image.fromarray(test_image)
  exif = img.getexif()
  exif[0x0112] = 6  # shown rotated 90 degrees clockwise
  path = tmp_path / "rotated.jpg"
  img.save(path, exif=exif, quality=95)
  return path


def test_accepted_images_equal_the_file(pipe, tmp_path, test_image):
  path = _exif_rotated_jpeg(tmp_path, test_image)
  want = _pixels(pipe, str(path))
  decoded = np.asarray(image.load_image(str(path)))
  assert decoded.shape == (300, 200, 3)  # rotated
  np.testing.assert_array_equal(_pixels(pipe, path), want)  # pathlib.Path
  np.testing.assert_array_equal(_pixels(pipe, decoded), want)
  np.testing.assert_array_equal(_pixels(pipe, image.load_image(str(path))), want)
  with Image.open(path) as opened:  # a PIL image as opened: EXIF rotation still applied
    np.testing.assert_array_equal(_pixels(pipe, opened), want)
  for dtype in (np.float32, np.float64, np.float16):
    np.testing.assert_allclose(_pixels(pipe, (decoded / 255).astype(dtype)), want,
                               atol=2e-3 if dtype == np.float16 else 1e-5)
  grey = decoded[..., 0]
  np.testing.assert_array_equal(_pixels(pipe, grey), _pixels(pipe, np.dstack([grey] * 3)))
  rgba = np.dstack([decoded, np.zeros_like(grey)])
  np.testing.assert_array_equal(_pixels(pipe, rgba), want)  # alpha dropped, as from a file


@pytest.mark.parametrize("bad, match", [
    (np.full((20, 30, 3), 1000, np.uint16), r"dtype uint16 and shape \(20, 30, 3\)"),
    (np.zeros((20, 30, 3), np.int64), r"dtype int64"),
    (np.zeros((20, 30, 3), bool), r"dtype bool"),
    (np.full((20, 30, 3), np.nan, np.float32), r"float32 .*NaN"),
    (np.full((20, 30, 3), 200.0), r"float64 .*\[0, 1\].*\[200, 200\]"),
    (np.zeros((0, 0, 3), np.uint8), r"shape \(0, 0, 3\).*empty"),
    (np.zeros((0, 0), np.uint8), r"shape \(0, 0\).*empty"),
    (np.zeros((20, 30, 5), np.uint8), r"shape \(20, 30, 5\)"),
    (np.zeros(30, np.uint8), r"shape \(30,\)"),
    (Image.new("RGB", (0, 0)), r"PIL image of size \(0, 0\)"),
    ([[1, 2], [3, 4]], r"got list"),
    (None, r"got NoneType"),
])
def test_bad_images_are_refused(pipe, bad, match):
  with pytest.raises(ValueError, match=match):
    pipe.generate([bad], ["caption en"])


# ---------------------------------------------------------------------------
# The other arguments: each refused with a clear ValueError before anything compiles.

@pytest.mark.parametrize("args, kw, match", [
    (([], []), {}, r"no images"),
    ((["IMG"], "caption en"), {}, r"prompts must be a list.*got str 'caption en'"),
    (("IMG", ["caption en"]), {}, r"images must be a list"),
    ((["IMG"], [None]), {}, r"prompt 0 .* got NoneType"),
    ((["IMG"], ["caption en", "x"]), {}, r"1 images but 2 prompts"),
    ((["IMG"], ["caption en"]), dict(answer_start=3), r"answer_start must be a string"),
    ((["IMG"], ["caption en"]), dict(max_decode_len=2.5), r"max_decode_len must be an integer"),
    ((["IMG"], ["caption en"]), dict(max_decode_len="8"), r"max_decode_len must be an integer"),
    ((["IMG"], ["caption en"]), dict(max_decode_len=True), r"max_decode_len must be an integer"),
    ((["IMG"], ["caption en"]), dict(beam_size=1.5), r"beam_size must be an integer"),
    ((["IMG"], ["caption en"]), dict(best_of_n=2.0), r"best_of_n must be an integer"),
    ((["IMG"], ["caption en"]), dict(seed=2 ** 64), r"seed must be an integer .*64 bits"),
    ((["IMG"], ["caption en"]), dict(seed=1.5), r"seed must be an integer"),
    ((["IMG"], ["caption en"]), dict(sampler=None), r"sampler must be .* got None"),
])
def test_bad_arguments_are_refused(pipe, test_image, compilations, args, kw, match):
  args = tuple(test_image if a == "IMG" else [test_image if x == "IMG" else x for x in a]
               if isinstance(a, list) else a for a in args)
  with pytest.raises(ValueError, match=match):
    pipe.generate(*args, **kw)
  assert not compilations


@pytest.fixture
def compilations(monkeypatch):
  seen = []
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, "compile",
                      lambda self, *a, **k: seen.append(self) or real(self, *a, **k))
  return seen


def test_seeds_use_all_64_bits():
  """jax.random.PRNGKey keeps only the low 32 bits without jax_enable_x64: 2**32 drew as 0."""
  assert (np.asarray(decode.seed_key(5)) == np.asarray(jax.random.PRNGKey(5))).all()
  keys = {tuple(np.asarray(decode.seed_key(s)).tolist()) for s in (0, 2 ** 32, 2 ** 64 - 1, -1)}
  assert len(keys) == 3  # -1 is 2**64 - 1 (two's complement), as PRNGKey with x64
  with pytest.raises(ValueError, match="64 bits"):
    decode.seed_key(-2 ** 63 - 1)


def test_path_tokenizer_works(tokenizer):
  tok = Tokenizer(pathlib.Path(tokenizer.path))
  assert tok.encode("a cat") == tokenizer.encode("a cat")
  assert isinstance(tok.path, str)


# ---------------------------------------------------------------------------
# Damaged weights: NaN or inf logits raise, naming what was not finite.

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_raise(tokenizer, test_image, value):
  def damage(flat):
    flat["llm/final_norm/scale"][3] = value
  bad = _pipe(tokenizer, damage)
  with pytest.raises(pipeline.NonFiniteError, match=r"not finite.*row 0.*damaged"):
    bad.generate([test_image], ["caption en"], max_decode_len=4)
  assert issubclass(pipeline.NonFiniteError, ValueError)  # main.py reports it as error: ...


def test_finite_weights_answer(pipe, test_image):
  [out] = pipe.generate([test_image], ["caption en"], max_decode_len=4)
  assert np.isfinite(out.logprobs).all()
