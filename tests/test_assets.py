"""Tests of the committed assets (input_pipeline.assets)."""

import pathlib

import numpy as np
from PIL import Image
import pytest

from input_pipeline import assets

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('size', [32, 64, 128, 256, 512])
def test_lung_prior_is_a_probability_map_of_two_lungs(size):
  prior = assets.lung_prior(size)
  assert prior.shape == (size, size)
  assert prior.dtype == np.float32
  assert 0.0 <= prior.min() and prior.max() <= 1.0
  assert prior.max() > 0.75
  # Two lungs: high in each half at mid-height, low on the midline between
  # them and in the corners.
  row = prior[int(0.45 * size)]
  right_lung, left_lung = row[: size // 2].max(), row[size // 2:].max()
  midline = row[int(0.47 * size):int(0.53 * size)].min()
  assert right_lung > 0.6 and left_lung > 0.6
  assert midline < 0.45 * min(right_lung, left_lung)
  assert prior[: size // 16, : size // 16].max() < 0.05
  # About a third of the image is lung, whatever the size.
  assert prior.mean() == pytest.approx(0.309, abs=0.01)


def test_lung_prior_returns_a_fresh_copy():
  first = assets.lung_prior(64)
  first[:] = 0
  assert assets.lung_prior(64).max() > 0.75


@pytest.mark.parametrize('size', [0, -4, 64.0, '64'])
def test_lung_prior_rejects_bad_sizes(size):
  with pytest.raises(ValueError, match='image_size'):
    assets.lung_prior(size)


def test_committed_prior_is_what_the_script_derives_from_the_real_masks(
    real_data_dir):
  from scripts import derive_lung_prior   # pylint: disable=g-import-not-at-top
  derived, count = derive_lung_prior.lung_prior_map(
      str(real_data_dir / 'lung_masks' / 'semantic_masks_v7labs_lungs.zip'))
  assert count == 517
  committed_path = REPO_ROOT / 'input_pipeline' / 'assets' / 'lung_prior.png'
  with Image.open(committed_path) as committed:
    assert committed.mode == 'L' and committed.size == (128, 128)
    np.testing.assert_array_equal(derived, np.asarray(committed))
