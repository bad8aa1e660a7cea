"""Image decoding with validation, crops and resizes, and the one ImageNet normalization.

Every pipeline hands the model NHWC float32 pixels normalized with the ImageNet statistics
(spec 1.2), with `internvl_jax.preprocess.normalize_images`, the one normalization.
Resizing is bicubic (PIL), as in the reference preprocessing.
"""

import io
import math

import numpy as np
from PIL import Image

from internvl_jax.data import issues
from internvl_jax.preprocess import normalize_images

BICUBIC = Image.Resampling.BICUBIC


def to_rgb(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
  """The image loaded and converted to RGB by PIL's `convert("RGB")`, as the reference opens its
  images, and the reasons to count: `issues.converted_from(mode)`, or () for an RGB image.

  Grayscale is replicated, palette colours looked up, CMYK converted; an alpha channel (RGBA,
  LA, PA, palette transparency) is dropped and the colour values stored under it are kept, not
  composited onto a background.
  """
  if image.mode == "RGB":
    image.load()
    return image, ()
  return image.convert("RGB"), (issues.converted_from(image.mode),)


def decode_rgb(data: bytes, min_side: int,
               draft_size: int | None = None) -> tuple[Image.Image, tuple[str, ...]]:
  """Decodes encoded image bytes with `to_rgb`, or raises `issues.SkipRecord`.

  For JPEG, `draft_size` lets the decoder downscale by a power of two while keeping both sides
  >= draft_size, which makes decoding large photos several times cheaper.
  """
  if not data:
    raise issues.SkipRecord(issues.IMAGE_MISSING, "no image bytes")
  try:
    image = Image.open(io.BytesIO(data))
    if min(image.size) < min_side:
      raise issues.SkipRecord(issues.IMAGE_TOO_SMALL, f"size {image.size}")
    if draft_size is not None:
      image.draft("RGB", (draft_size, draft_size))
    return to_rgb(image)
  except issues.SkipRecord:
    raise
  except Exception as e:  # PIL raises many types for corrupt, truncated and huge images.
    raise issues.SkipRecord(issues.IMAGE_UNDECODABLE, f"{type(e).__name__}: {e}") from e


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: np.random.Generator,
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, ...]:
  """(left, top, right, bottom) of a crop covering `scale` of the area, as torchvision's.

  Ten tries for a box with a random area fraction and log-uniform aspect ratio that fits;
  otherwise the largest centered box whose aspect ratio is clamped into `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def random_resized_crop(image: Image.Image, size: int, scale: tuple[float, float],
                        rng: np.random.Generator) -> Image.Image:
  box = random_resized_crop_box(image.width, image.height, scale, rng)
  return image.resize((size, size), BICUBIC, box=box)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Shorter side to `size` (bicubic), then the central size x size square."""
  width, height = image.size
  if width <= height:
    new_size = (size, int(size * height / width))
  else:
    new_size = (int(size * width / height), size)
  image = image.resize(new_size, BICUBIC)
  left = int(round((new_size[0] - size) / 2))
  top = int(round((new_size[1] - size) / 2))
  return image.crop((left, top, left + size, top + size))


def resize(image: Image.Image, size: int) -> Image.Image:
  """Plain bicubic resize to size x size (retrieval evaluation, chat tiles)."""
  return resize_to(image, size, size)


def resize_to(image: Image.Image, width: int, height: int) -> Image.Image:
  return image.resize((width, height), BICUBIC)


def to_normalized_array(image: Image.Image) -> np.ndarray:
  return normalize_images(np.asarray(image))
