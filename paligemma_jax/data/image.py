"""Image loading and big_vision's eval preprocessing.

Any file PIL opens becomes 8-bit RGB (EXIF orientation applied, alpha dropped,
16-bit scaled down), then is resized to the model's square with bilinear
interpolation, half-pixel centres and no antialias (tf.image.resize semantics),
then mapped to [-1, 1] by x / 127.5 - 1.

Memory: a file is refused beyond MAX_PIXELS, from its header, before anything is
decoded; a JPEG beyond it is decoded at 1/2, 1/4 or 1/8 of its size instead (libjpeg's
DCT scaling), the least reduction that fits. Decoding then holds the picture once in
PIL (4 bytes a pixel for RGB) and once as an (H, W, 3) uint8 array: about 7 bytes a
pixel, 0.5 GB at the limit (tests/test_image.py measures it).
"""
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Ours, and below PIL's own (Image.MAX_IMAGE_PIXELS, ~89.5M, whose warning and, at twice
# that, error would otherwise come first): 8192 x 8192, a 67-megapixel photo.
MAX_PIXELS = 8192 * 8192
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
  """An image that cannot be used; the message names the file (or the array's dtype/shape)."""


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB. Alpha is dropped (not composited), as big_vision decodes."""
  if img.mode == "RGB":
    return img  # convert() would copy it
  if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
    a = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a, "L")
  elif img.mode == "F":
    a = np.asarray(img, dtype=np.float64)
    scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
    img = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8), "L")
  elif img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    img = img.convert("RGBA")
    img = Image.fromarray(np.asarray(img)[..., :3], "RGB")
  return img.convert("RGB")


def _reduce(img: Image.Image, path) -> Image.Image:
  """Refuses an image beyond MAX_PIXELS from its header, or asks a JPEG's decoder for a
  reduced size that fits. Nothing is decoded yet."""
  w, h = img.size
  if w * h <= MAX_PIXELS:
    return img
  for scale in (2, 4, 8):  # PIL's draft() scales JPEGs by these only
    if -(-w // scale) * -(-h // scale) <= MAX_PIXELS:
      img.draft("RGB", (w // scale, h // scale))
      break
  if img.width * img.height > MAX_PIXELS:
    raise ImageError(f"{path}: image of {w}x{h} pixels exceeds the limit of {MAX_PIXELS} pixels "
                     "(paligemma_jax.data.image.MAX_PIXELS); downscale it first")
  return img


def load_image(path) -> Image.Image:
  """Opens and decodes an image file to RGB, EXIF-rotated. Raises ImageError on bad input.

  Memory stays bounded: see MAX_PIXELS (a JPEG beyond it decodes at reduced size)."""
  try:
    with warnings.catch_warnings():  # PIL's warning beyond ~89.5M pixels: ours applies instead
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(path)
    with img:
      if img.width == 0 or img.height == 0:
        raise ImageError(f"{path}: image has zero size")
      img = _reduce(img, path)
      ImageOps.exif_transpose(img, in_place=True)  # loads it; a copy only when it rotates
      return to_rgb(img)
  except FileNotFoundError:
    raise ImageError(f"{path}: no such image file") from None
  except IsADirectoryError:
    raise ImageError(f"{path}: is a directory, not an image file") from None
  except UnidentifiedImageError:
    raise ImageError(f"{path}: not an image file PIL can read") from None
  except Image.DecompressionBombError as e:  # PIL's check, at open, of images far beyond ours
    raise ImageError(f"{path}: image exceeds the limit of {MAX_PIXELS} pixels "
                     f"(paligemma_jax.data.image.MAX_PIXELS; PIL: {e})") from None
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f"{path}: could not decode image ({e})") from e


def rgb_pixels(img: Image.Image) -> np.ndarray:
  """An RGB PIL image -> (H, W, 3) uint8, as np.asarray(img) but strip by strip: np.asarray
  goes through PIL's tobytes(), which briefly holds the picture twice more."""
  out = np.empty((img.height, img.width, 3), np.uint8)
  step = max(1, (4 << 20) // (3 * img.width))
  for y in range(0, img.height, step):
    out[y:y + step] = np.asarray(img.crop((0, y, img.width, min(y + step, img.height))))
  return out


def _resize_weights(n_in: int, n_out: int):
  """Bilinear, half-pixel centres, no antialias: source indices and weights for one axis."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  w = (src - lo).astype(np.float32)
  return lo, hi, w


class Resized(np.ndarray):
  """(S, S, 3) float32 pixels in [0, 255] that `resize_bilinear` made for a model of size S
  (e.g. in a decode thread); `preprocess` takes them as they are."""


def resize_bilinear(x: np.ndarray, size: int) -> Resized:
  """(H, W, C) -> (size, size, C) float32, as jax.image.resize(..., 'bilinear', antialias=False).

  Rows are gathered before the cast to float32, so a large uint8 picture is never copied
  whole at 4 bytes a channel."""
  # a + w (b - a) rather than (1 - w) a + w b: exact where a == b, so 255 stays 255.
  lo, hi, w = _resize_weights(x.shape[0], size)
  a = x[lo].astype(np.float32)
  x = a + w[:, None, None] * (x[hi].astype(np.float32) - a)
  lo, hi, w = _resize_weights(x.shape[1], size)
  return (x[:, lo] + w[None, :, None] * (x[:, hi] - x[:, lo])).view(Resized)


def as_rgb_array(x) -> np.ndarray:
  """What the Python API accepts as an image -> (H, W, 3), uint8 or float32 in [0, 255].

  An image file's path (str or os.PathLike; `load_image`), a PIL image (EXIF-rotated and
  converted as `load_image` does), a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)
  (alpha dropped), a float array of those shapes with values in [0, 1], or `Resized`
  pixels. Anything else raises ImageError (a ValueError) naming its type, dtype and shape.
  """
  if isinstance(x, Resized):
    return x
  if isinstance(x, (str, os.PathLike)):
    return rgb_pixels(load_image(x))
  if isinstance(x, Image.Image):
    if x.width == 0 or x.height == 0:
      raise ImageError(f"PIL image of size {x.size}: the image is empty")
    if x.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when it need not
      x = ImageOps.exif_transpose(x)
    return rgb_pixels(to_rgb(x))
  if not isinstance(x, np.ndarray):
    raise ImageError(f"expected an image: a path, a PIL image or an (H, W, 3) array; got "
                     f"{type(x).__name__}")
  what = f"image array of dtype {x.dtype} and shape {x.shape}"
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ImageError(f"{what}: expected (H, W, 3) RGB (or (H, W) grey, (H, W, 4) RGBA)")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ImageError(f"{what}: the image is empty")
  if x.dtype == np.uint8:
    pass
  elif x.dtype.kind == "f":
    if not np.isfinite(x).all():
      raise ImageError(f"{what}: holds NaN or infinite values")
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 1:
      raise ImageError(f"{what}: float images must lie in [0, 1], this one spans [{lo:g}, "
                       f"{hi:g}]; for 0..255 values pass x.astype(np.uint8)")
    x = x.astype(np.float32) * np.float32(255)
  else:
    raise ImageError(f"{what}: expected uint8 (0..255) or float in [0, 1]; convert it first, "
                     "e.g. (x / x.max() * 255).astype(np.uint8)")
  x = x[..., :3]  # alpha dropped, as load_image does
  return np.broadcast_to(x, x.shape[:2] + (3,)) if x.shape[-1] == 1 else x


def preprocess(img, size: int) -> np.ndarray:
  """An image `as_rgb_array` accepts -> (size, size, 3) float32 in [-1, 1]."""
  return np.asarray(resize_bilinear(as_rgb_array(img), size)) / np.float32(127.5) - np.float32(1)
