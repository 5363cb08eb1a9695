"""Small committed assets derived from real data (see scripts/derive_*.py).

`lung_prior.png` is the population lung-probability map, P(lung) × 255 on a
128 × 128 grid, averaged over 517 real lung masks by
scripts/derive_lung_prior.py. It shapes the lung-weighted loss and the
phantom's lungs.

`chestxray14_stats.json` holds the label and patient statistics of
ChestX-ray14 (scripts/derive_chestxray14_stats.py) that the phantom samples.
"""

import functools
import importlib.resources
import json
from typing import Any

import numpy as np
from PIL import Image

_LUNG_PRIOR_FILE = 'lung_prior.png'
_CHESTXRAY14_STATS_FILE = 'chestxray14_stats.json'


@functools.lru_cache(maxsize=1)
def _native_lung_prior() -> np.ndarray:
  resource = importlib.resources.files(__name__).joinpath(_LUNG_PRIOR_FILE)
  with resource.open('rb') as prior_file, Image.open(prior_file) as prior:
    return np.asarray(prior.convert('L'), np.float32) / 255.0


def lung_prior(image_size: int) -> np.ndarray:
  """Population lung-probability map resized to (image_size, image_size).

  Args:
    image_size: side of the square map, in pixels (>= 1).

  Returns:
    float32 array (image_size, image_size) with values in [0, 1]; a fresh copy
    the caller may modify.
  """
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f'image_size must be a positive int, got {image_size!r}')
  native = _native_lung_prior()
  if image_size == native.shape[0]:
    return native.copy()
  resized = Image.fromarray(native, mode='F').resize(
      (int(image_size), int(image_size)), Image.Resampling.BILINEAR,
      reducing_gap=None)
  return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def chestxray14_stats() -> dict[str, Any]:
  """Label and patient statistics of ChestX-ray14: label-set counts, sex and
  view proportions, age quantiles."""
  resource = importlib.resources.files(__name__).joinpath(
      _CHESTXRAY14_STATS_FILE)
  with resource.open('r') as stats_file:
    return json.load(stats_file)
