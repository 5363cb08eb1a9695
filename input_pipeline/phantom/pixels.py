"""Float32 pixel helpers of the phantom renderer.

Fields are (n, S, S) arrays, one image per row; per-image parameters are
(n, 1, 1) columns that broadcast against them.
"""

import numpy as np
from scipy import ndimage


def ramp(value, start, stop):
  """0 at `start`, 1 at `stop`, linear in between (either order)."""
  out = np.subtract(value, start, dtype=np.float32)
  out *= np.float32(1.0 / (stop - start)) if np.isscalar(stop) and np.isscalar(
      start) else 1.0 / (stop - start)
  return np.clip(out, 0.0, 1.0, out=out)


def edge(signed, pixel):
  """Anti-aliased inside indicator of `signed` > 0 (a distance, image units)."""
  return ramp(signed, -0.5 * pixel, 0.5 * pixel)


def upsample_matrix(size: int, coarse: int) -> np.ndarray:
  """(size, coarse) linear interpolation from a coarse grid to pixels."""
  positions = (np.arange(size) + 0.5) / size * (coarse - 1)
  low = np.clip(np.floor(positions).astype(int), 0, coarse - 2)
  weight = positions - low
  matrix = np.zeros((size, coarse), np.float32)
  matrix[np.arange(size), low] = 1 - weight
  matrix[np.arange(size), low + 1] = weight
  return matrix


def column(values) -> np.ndarray:
  """Per-image values as an (n, 1, 1) float32 column."""
  return np.asarray(values, np.float32).reshape(-1, 1, 1)


def segment_distance(x, y, ax, ay, bx, by):
  """Distance to segments (a, b); endpoints broadcast against x, y."""
  dx, dy = bx - ax, by - ay
  t = ((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12)
  np.clip(t, 0, 1, out=t)
  return np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2)


def smooth_normalised(white, sigma_pixels):
  """Periodic Gaussian smoothing of (n, S, S) noise, to unit std per image."""
  field = ndimage.gaussian_filter(white, (0, sigma_pixels, sigma_pixels),
                                  mode='wrap', truncate=3.0)
  return field / (field.std(axis=(1, 2), keepdims=True) + 1e-6)
