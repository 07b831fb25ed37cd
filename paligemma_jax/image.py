"""Image loading and big_vision's eval preprocessing.

Any file PIL opens becomes 8-bit RGB (EXIF orientation applied, alpha dropped,
16-bit scaled down), then is resized to the model's square with bilinear
interpolation, half-pixel centres and no antialias (tf.image.resize semantics),
then mapped to [-1, 1] by x / 127.5 - 1.
"""
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 32_000 * 32_000  # refuse decompression bombs beyond this


class ImageError(ValueError):
  """A file that cannot be used as an image; the message names the file."""


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB. Alpha is dropped (not composited), as big_vision decodes."""
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


def load_image(path: str) -> Image.Image:
  """Opens and decodes an image file to RGB, EXIF-rotated. Raises ImageError on bad input."""
  try:
    with Image.open(path) as img:
      if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"{path}: image of {img.width}x{img.height} pixels is too large")
      if img.width == 0 or img.height == 0:
        raise ImageError(f"{path}: image has zero size")
      img = ImageOps.exif_transpose(img)
      img.load()
      return to_rgb(img)
  except FileNotFoundError:
    raise ImageError(f"{path}: no such image file") from None
  except IsADirectoryError:
    raise ImageError(f"{path}: is a directory, not an image file") from None
  except UnidentifiedImageError:
    raise ImageError(f"{path}: not an image file PIL can read") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f"{path}: could not decode image ({e})") from e


def _resize_weights(n_in: int, n_out: int):
  """Bilinear, half-pixel centres, no antialias: source indices and weights for one axis."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.clip(src, 0, n_in - 1)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  w = (src - lo).astype(np.float32)
  return lo, hi, w


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
  """(H, W, C) float32 -> (size, size, C), as jax.image.resize(..., 'bilinear', antialias=False)."""
  x = x.astype(np.float32)
  # a + w (b - a) rather than (1 - w) a + w b: exact where a == b, so 255 stays 255.
  lo, hi, w = _resize_weights(x.shape[0], size)
  x = x[lo] + w[:, None, None] * (x[hi] - x[lo])
  lo, hi, w = _resize_weights(x.shape[1], size)
  return x[:, lo] + w[None, :, None] * (x[:, hi] - x[:, lo])


def preprocess(img, size: int) -> np.ndarray:
  """PIL image or (H, W, 3) uint8 array -> (size, size, 3) float32 in [-1, 1]."""
  if isinstance(img, Image.Image):
    img = np.asarray(to_rgb(img))
  img = np.asarray(img)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ImageError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
  return resize_bilinear(img, size) / 127.5 - 1.0
