"""Derives the population lung-probability map from 517 real lung masks.

Reads the V7 Labs lung masks (assorted sizes; PNG data, some named .jpg) from
their zip,
resizes each whole mask to a common square grid (as the model resizes whole
images), averages them and smooths lightly. Writes an 8-bit PNG, P(lung) × 255:
the basis of the lung-weighted loss (the paper's Fig. 2a) and of the phantom's
lung template.

  .venv/bin/python -m scripts.derive_lung_prior \
      --masks_zip tests/data/lung_masks/semantic_masks_v7labs_lungs.zip \
      --prior_png input_pipeline/assets/lung_prior.png
"""

import io
import zipfile

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from scipy import ndimage

_MASKS_ZIP = flags.DEFINE_string(
    'masks_zip', None,
    'Zip of binary lung masks (the V7 Labs set: '
    'tests/data/lung_masks/semantic_masks_v7labs_lungs.zip).')
_PRIOR_PNG = flags.DEFINE_string(
    'prior_png', 'input_pipeline/assets/lung_prior.png', 'Output PNG.')
_PRIOR_GRID = flags.DEFINE_integer(
    'prior_grid', 128, 'Side of the square output map.')
_PRIOR_SMOOTH_SIGMA = flags.DEFINE_float(
    'prior_smooth_sigma', 1.0,
    'Gaussian smoothing of the mean map, in grid pixels.')

_MASK_SUFFIXES = ('.png', '.jpg', '.jpeg')


def read_masks(masks_zip: str, grid: int) -> np.ndarray:
  """Returns the masks of the zip as float32 (N, grid, grid) in [0, 1]."""
  masks = []
  with zipfile.ZipFile(masks_zip) as archive:
    for name in sorted(archive.namelist()):
      if not name.lower().endswith(_MASK_SUFFIXES):
        continue
      with Image.open(io.BytesIO(archive.read(name))) as mask_image:
        mask_image = mask_image.convert('L').resize(
            (grid, grid), Image.Resampling.BILINEAR)
        # Back to binary after the (anti-aliasing) resize.
        masks.append((np.asarray(mask_image, np.float32) >= 128).astype(
            np.float32))
  if not masks:
    raise ValueError(f'No PNG/JPEG masks in {masks_zip}')
  return np.stack(masks)


def lung_prior_map(masks_zip: str, grid: int = 128,
                   smooth_sigma: float = 1.0) -> tuple[np.ndarray, int]:
  """(P(lung) x 255 as uint8 (grid, grid), number of masks averaged)."""
  masks = read_masks(masks_zip, grid)
  lung_probability = ndimage.gaussian_filter(masks.mean(axis=0), smooth_sigma)
  lung_probability = np.clip(lung_probability, 0.0, 1.0)
  return np.round(lung_probability * 255).astype(np.uint8), len(masks)


def main(argv):
  del argv
  prior, count = lung_prior_map(_MASKS_ZIP.value, _PRIOR_GRID.value,
                                _PRIOR_SMOOTH_SIGMA.value)
  Image.fromarray(prior).save(_PRIOR_PNG.value, optimize=True)
  print(f'{count} masks -> {_PRIOR_PNG.value} (max P(lung) '
        f'{prior.max() / 255:.3f}, mean {prior.mean() / 255:.3f})')


if __name__ == '__main__':
  flags.mark_flags_as_required(['masks_zip'])
  app.run(main)
