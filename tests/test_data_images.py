"""Image decoding checks, crops, normalization and dynamic tiling (spec 1.2, 3.5, 4.4c)."""

import io

import numpy as np
import pytest
from PIL import Image

from internvl_jax import preprocess
from internvl_jax.data import issues
from internvl_jax.data import tiling
from internvl_jax.data import transforms


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def rgb(width: int, height: int) -> Image.Image:
  return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))


def test_normalize_uses_imagenet_statistics():
  pixels = np.array([[[0, 128, 255]]], np.uint8)
  expected = (pixels / 255.0 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
  out = preprocess.normalize_images(pixels)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("data, reason", [
    (b"", issues.IMAGE_MISSING),
    (b"not an image at all", issues.IMAGE_UNDECODABLE),
    (encode(rgb(40, 30), "JPEG")[:200], issues.IMAGE_UNDECODABLE),
    (encode(rgb(1, 1)), issues.IMAGE_TOO_SMALL),
    (encode(rgb(1, 50)), issues.IMAGE_TOO_SMALL),
    (encode(rgb(1, 50).convert("L")), issues.IMAGE_TOO_SMALL),
])
def test_decode_rgb_skips_bad_images_by_reason(data, reason):
  with pytest.raises(issues.SkipRecord) as error:
    transforms.decode_rgb(data, min_side=2)
  assert error.value.reason == reason


@pytest.mark.parametrize("mode, fmt", [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
    ("CMYK", "JPEG"), ("L", "JPEG"), ("I;16", "PNG"), ("F", "TIFF"),
])
def test_decode_rgb_converts_every_mode_as_pil_convert_rgb(mode, fmt):
  stored = encode(rgb(20, 16).convert(mode), fmt)
  image, reasons = transforms.decode_rgb(stored, min_side=2)
  assert image.mode == "RGB" and image.size == (20, 16)
  np.testing.assert_array_equal(np.asarray(image),
                                np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")))
  assert reasons == (issues.converted_from(mode),)


def test_decode_rgb_drops_alpha_keeping_the_stored_colours():
  pixels = np.zeros((4, 4, 4), np.uint8)
  pixels[..., :3] = (200, 100, 50)  # fully transparent, yet these colours are what is kept
  image, reasons = transforms.decode_rgb(encode(Image.fromarray(pixels, "RGBA")), min_side=2)
  assert (np.asarray(image) == (200, 100, 50)).all()
  assert reasons == (issues.CONVERSION_REASONS["RGBA"],)


def test_decode_rgb_leaves_rgb_uncounted_and_buckets_rare_modes_as_other():
  assert transforms.decode_rgb(encode(rgb(8, 8)), min_side=2)[1] == ()
  assert issues.converted_from("LAB") == issues.CONVERSION_REASONS[issues.OTHER_MODE]
  assert len(set(issues.CONVERSION_REASONS.values())) == len(issues.CONVERSION_REASONS)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_rgb_draft_keeps_requested_size(mode):
  image, _ = transforms.decode_rgb(encode(rgb(400, 300).convert(mode), "JPEG"), min_side=2,
                                   draft_size=64)
  assert image.mode == "RGB" and min(image.size) >= 64 and image.size[0] < 400


def test_counts_of_a_retired_reason_are_dropped_on_restore():
  counts = issues.dict_to_counts({"image_not_rgb": 3, issues.IMAGE_MISSING: 2})
  assert issues.counts_to_dict(counts) == {issues.IMAGE_MISSING: 2}


def test_random_resized_crop_box_respects_scale_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = transforms.random_resized_crop_box(300, 200, (0.3, 0.6), rng)
    assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
    area = (right - left) * (bottom - top) / (300 * 200)
    assert 0.25 <= area <= 0.65  # rounding of sides moves the area a little


def test_eval_resizes():
  image = rgb(60, 30)
  assert transforms.resize_center_crop(image, 16).size == (16, 16)
  assert transforms.resize(image, 16).size == (16, 16)


@pytest.mark.parametrize("size, max_tiles, expected", [
    ((448, 448), 6, (1, 1)),  # ties with 2x2, but 448^2 <= 0.5 * 448^2 * 4
    ((1000, 1000), 6, (2, 2)),  # tie with 2x2 and 1e6 > 0.5 * 448^2 * 4: the later grid wins
    ((1000, 1000), 12, (3, 3)),  # 1e6 > 0.5 * 448^2 * 9 as well
    ((896, 448), 8, (2, 1)),  # ties with 4x2, area too small to take it
    ((1800, 900), 8, (4, 2)),  # ... large enough here
    ((448, 1344), 6, (1, 3)),
    ((1000, 480), 6, (2, 1)),  # ratio 2.08 closest to 2
])
def test_choose_grid_follows_tie_break_rule(size, max_tiles, expected):
  assert tiling.choose_grid(*size, tile_size=448, min_tiles=1, max_tiles=max_tiles) == expected


def test_candidate_grids_are_sorted_by_tile_count_within_bounds():
  grids = tiling.candidate_grids(2, 6)
  counts = [c * r for c, r in grids]
  assert counts == sorted(counts) and min(counts) == 2 and max(counts) == 6
  assert (1, 1) not in grids and (2, 3) in grids and (3, 2) in grids


def test_tile_image_is_row_major_with_thumbnail_last():
  quadrants = np.zeros((64, 64, 3), np.uint8)
  quadrants[:32, 32:] = 255  # top right white
  quadrants[32:, :32, 0] = 255  # bottom left red
  tiles = tiling.tile_image(Image.fromarray(quadrants), 32, 1, 4, use_thumbnail=True)
  assert len(tiles) == 5 and all(t.size == (32, 32) for t in tiles)
  means = [np.asarray(t).reshape(-1, 3).mean(0).round() for t in tiles[:4]]
  np.testing.assert_array_equal(means, [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 0, 0]])
  assert tiling.tile_image(Image.fromarray(quadrants), 64, 1, 4, use_thumbnail=True)[0].size == (64, 64)
  assert len(tiling.tile_image(Image.fromarray(quadrants), 64, 1, 4, use_thumbnail=True)) == 1
