"""Image decoding to RGB and big_vision's bilinear-without-antialias preprocessing."""
import io

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma_jax import image


@pytest.mark.parametrize("shape", [(200, 300), (17, 5), (500, 224), (224, 224), (10, 900)])
def test_resize_matches_jax_bilinear_without_antialias(shape, test_image):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, shape + (3,)).astype(np.uint8)
  ours = image.resize_bilinear(x, 224)
  ref = np.asarray(jax.image.resize(x.astype(np.float32), (224, 224, 3), "bilinear", antialias=False))
  # Same interpolation; only float32 rounding of the weights differs (1 grey level = 1.0).
  np.testing.assert_allclose(ours, ref, atol=0.05)


def test_preprocess_range_and_shape(test_image):
  x = image.preprocess(test_image, 224)
  assert x.shape == (224, 224, 3) and x.dtype == np.float32
  assert x.min() >= -1 and x.max() <= 1
  flat = image.preprocess(np.full((5, 7, 3), 255, np.uint8), 14)
  np.testing.assert_allclose(flat, 1.0)
  np.testing.assert_allclose(image.preprocess(np.zeros((5, 7, 3), np.uint8), 14), -1.0)


def _save(tmp_path, img, name, **kw):
  path = tmp_path / name
  img.save(path, **kw)
  return str(path)


def test_modes_become_rgb(tmp_path):
  grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
  out = np.asarray(image.load_image(_save(tmp_path, grey, "g.png")))
  assert out.shape == (8, 8, 3) and (out[..., 0] == np.asarray(grey)).all()

  rgba = Image.fromarray(np.dstack([np.full((4, 4, 3), 200, np.uint8), np.zeros((4, 4), np.uint8)]), "RGBA")
  out = np.asarray(image.load_image(_save(tmp_path, rgba, "a.png")))
  assert (out == 200).all()  # alpha dropped, not composited onto black

  pal = grey.convert("P")
  pal.info["transparency"] = 0
  out = np.asarray(image.load_image(_save(tmp_path, pal, "p.png", transparency=0)))
  assert out.shape == (8, 8, 3)

  cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # pure red in CMYK
  out = np.asarray(image.load_image(_save(tmp_path, cmyk, "c.jpg", quality=100)))
  assert out.shape == (6, 6, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60

  deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  assert deep.mode.startswith("I")
  out = np.asarray(image.load_image(_save(tmp_path, deep, "d.png")))
  assert (out == 255).all()
  half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
  assert abs(int(np.asarray(image.load_image(_save(tmp_path, half, "h.png")))[0, 0, 0]) - 128) <= 1


def test_exif_rotation_applied(tmp_path):
  arr = np.zeros((10, 20, 3), np.uint8)
  arr[:, :10] = 255  # left half white
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6  # rotate 90 CW on display
  path = _save(tmp_path, img, "r.jpg", exif=exif, quality=100)
  out = np.asarray(image.load_image(path))
  assert out.shape == (20, 10, 3)
  assert out[:10].mean() > 200 and out[10:].mean() < 50  # the white half is now on top


def test_not_an_image(tmp_path):
  bad = tmp_path / "notes.jpg"
  bad.write_text("hello")
  with pytest.raises(image.ImageError, match="notes.jpg: not an image"):
    image.load_image(str(bad))
  with pytest.raises(image.ImageError, match="no such image"):
    image.load_image(str(tmp_path / "none.png"))
  trunc = tmp_path / "t.png"
  buf = io.BytesIO()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 9).save(buf, "PNG")
  trunc.write_bytes(buf.getvalue()[:60])
  with pytest.raises(image.ImageError, match="t.png"):
    image.load_image(str(trunc))
