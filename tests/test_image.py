"""Image decoding to RGB and big_vision's bilinear-without-antialias preprocessing."""
import io
import os
import re
import struct
import subprocess
import sys
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from paligemma_jax.data import image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ---------------------------------------------------------------------------
# Memory: our pixel limit, checked from the header; JPEGs beyond it decode at reduced size.

def _png(path, width, height, rgb=False, rows=True):
  """A black PNG written row by row (a 13000x13000 one is 164 KB), never whole in memory.
  rows=False: the header only, with an empty IDAT (what `Image.open` reads)."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  z = zlib.compressobj(9)
  row = b"\0" * (1 + width * (3 if rgb else 1))
  data = b"".join([z.compress(row) for _ in range(height if rows else 0)] + [z.flush()])
  header = struct.pack(">IIBBBBB", width, height, 8, 2 if rgb else 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                   + chunk(b"IEND", b""))
  return str(path)


_PEAK_PROBE = """
import sys
from paligemma_jax.data import image
def hwm():
  return int([l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]) * 1024
base = hwm()
try:
  image.preprocess(image.load_image(sys.argv[1]), 224)
  print('ok')
except image.ImageError as e:
  print('error:', e)
print(hwm() - base)
"""


def _peak(path):
  """(what load_image + preprocess said, peak resident bytes added) in a fresh process."""
  out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, path], capture_output=True, text=True,
                       check=True, cwd=REPO).stdout.strip().splitlines()
  return out[-2], int(out[-1])


def test_pixel_limit_is_ours_and_fires_before_decoding(tmp_path):
  """A 13000x13000 PNG (164 KB) decoded to 2.8 GB; PIL's own limit (~179M) never fired."""
  said, peak = _peak(_png(tmp_path / "huge.png", 13000, 13000))
  assert re.search(r"huge.png: image of 13000x13000 pixels exceeds the limit of 67108864 "
                   r"pixels", said), said
  assert peak < 100e6, peak
  # Beyond PIL's limit its check, at open, comes first; the message is still ours.
  with pytest.raises(image.ImageError, match=r"bomb.png: image exceeds the limit of 67108864"):
    image.load_image(_png(tmp_path / "bomb.png", 20000, 20000, rows=False))


def test_largest_allowed_image_peaks_near_two_copies(tmp_path):
  """8192x8192 RGB: PIL's picture (4 bytes a pixel) + the uint8 array (3): ~8 bytes a pixel
  (0.54 GB; 17 before: a whole float32 copy in the resize and tobytes()'s transient copy)."""
  pixels = 8192 * 8192
  assert image.MAX_PIXELS == pixels
  said, peak = _peak(_png(tmp_path / "max.png", 8192, 8192, rgb=True))
  assert said == "ok"
  assert peak < 10 * pixels, f"{peak / pixels:.1f} bytes a pixel"


def test_jpeg_beyond_the_limit_decodes_at_reduced_size(tmp_path, monkeypatch, test_image):
  monkeypatch.setattr(image, "MAX_PIXELS", 100 * 100)
  jpeg = _save(tmp_path, Image.fromarray(test_image), "big.jpg", quality=95)  # 300x200
  out = image.load_image(jpeg)
  assert out.size == (75, 50)  # 1/2 would still be 15000 pixels; 1/4 fits
  small = np.asarray(Image.fromarray(test_image).resize((75, 50), Image.BOX), np.float32)
  assert np.abs(np.asarray(out, np.float32) - small).mean() < 12
  with pytest.raises(image.ImageError,
                     match=r"big.png: image of 300x200 pixels exceeds the limit of 10000 pixels"):
    image.load_image(_save(tmp_path, Image.fromarray(test_image), "big.png"))


def test_pixels_cache_decodes_each_picture_once_within_its_budget(tmp_path, monkeypatch):
  """jsonl.Pixels(cache_bytes=...) hands back the same arrays as without a cache, decodes a
  cached picture once, and keeps no more pictures than the budget holds."""
  from paligemma_jax.data import jsonl
  rng = np.random.default_rng(0)
  paths = []
  for i in range(3):
    paths.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(paths[-1])
  decoded = []
  load = image.load_image
  monkeypatch.setattr(image, "load_image", lambda p: decoded.append(p) or load(p))
  plain = jsonl.Pixels(28).get(0, paths)
  one_picture = 28 * 28 * 3 * 4
  cached = jsonl.Pixels(28, threads=1, cache_bytes=2 * one_picture)  # room for two of three
  decoded.clear()
  for step in range(3):
    np.testing.assert_array_equal(cached.get(step, paths + paths[:1]), np.concatenate(
        [plain, plain[:1]]))
  assert decoded.count(paths[0]) == 1 and decoded.count(paths[1]) == 1
  assert decoded.count(paths[2]) == 3  # over budget: decoded every time
