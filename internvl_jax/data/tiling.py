"""Dynamic tiling of InternVL-Chat 1.1+ (spec 4.4c, `dynamic_preprocess` in the reference).

An image becomes a grid of cols x rows tiles, min_tiles <= cols * rows <= max_tiles, whose aspect
ratio is closest to the image's; tiles are cut row-major and, when there is more than one, a
thumbnail of the whole image is appended last.
"""

import functools

from PIL import Image

from internvl_jax.data import transforms


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
  """(cols, rows) grids in the reference's order: by tile count, stable within a count.

  The reference sorts a Python set of int pairs; the order within one tile count is that set's
  iteration order, which is deterministic for small ints, and decides ties below.
  """
  grids = set((cols, rows)
              for n in range(min_tiles, max_tiles + 1)
              for cols in range(1, n + 1)
              for rows in range(1, n + 1)
              if min_tiles <= cols * rows <= max_tiles)
  return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(width: int, height: int, tile_size: int, min_tiles: int,
                max_tiles: int) -> tuple[int, int]:
  """The grid whose aspect ratio is closest to width / height.

  Tie-break: on an equal distance a later (more tiles) grid replaces the current best only if
  the image area exceeds half the area of that grid at full resolution,
  width * height > 0.5 * tile_size**2 * cols * rows.
  """
  aspect_ratio = width / height
  best_grid, best_diff = (1, 1), float("inf")
  for cols, rows in candidate_grids(min_tiles, max_tiles):
    diff = abs(aspect_ratio - cols / rows)
    if diff < best_diff:
      best_grid, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
      best_grid = (cols, rows)
  return best_grid


def tile_image(image: Image.Image, tile_size: int, min_tiles: int, max_tiles: int,
               use_thumbnail: bool) -> list[Image.Image]:
  """Row-major tiles of tile_size x tile_size, then the thumbnail if there are several."""
  cols, rows = choose_grid(image.width, image.height, tile_size, min_tiles, max_tiles)
  resized = transforms.resize_to(image, cols * tile_size, rows * tile_size)
  tiles = [
      resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
      for r in range(rows)
      for c in range(cols)
  ]
  if use_thumbnail and len(tiles) > 1:
    tiles.append(transforms.resize(image, tile_size))
  return tiles
