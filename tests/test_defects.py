"""On-device defects: each transform does what it says, and the random draw
is a pure function of the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from pumamednet_jax import defects


def smooth_image(seed=0, size=64):
  """A smooth random image in [0, 1] (so blur and rotation act visibly)."""
  noise = jax.random.uniform(jax.random.key(seed), (size, size, 1))
  return defects.blur(noise, 2.0, 13) * 0.8 + 0.1


def test_rotation_by_zero_is_the_identity():
  image = smooth_image()
  np.testing.assert_array_equal(defects.rotate(image, 0.0), image)


def test_rotation_by_90_degrees_matches_rot90():
  image = smooth_image()
  rotated = defects.rotate(image, 90.0)
  # The border may fall a rounding error outside the image and turn black.
  np.testing.assert_allclose(rotated[1:-1, 1:-1],
                             jnp.rot90(image, 1, axes=(0, 1))[1:-1, 1:-1],
                             atol=1e-5)


def test_two_flips_are_the_identity():
  image = smooth_image()
  flipped = defects.flip(image)
  assert not np.array_equal(flipped, image)
  np.testing.assert_array_equal(defects.flip(flipped), image)
  np.testing.assert_array_equal(flipped[:, ::-1], image)


def test_equalize_gives_a_near_uniform_histogram():
  image = jax.random.uniform(jax.random.key(2), (128, 128, 1)) ** 3  # dark
  equalized = defects.equalize(image)
  before, _ = np.histogram(np.asarray(image), bins=8, range=(0, 1))
  after, _ = np.histogram(np.asarray(equalized), bins=8, range=(0, 1))
  expected = image.size / 8
  assert np.max(np.abs(before - expected)) > 0.5 * expected
  assert np.max(np.abs(after - expected)) < 0.15 * expected


def test_equalize_leaves_a_flat_image_alone():
  flat = jnp.full((16, 16, 1), 0.4)
  np.testing.assert_array_equal(defects.equalize(flat), flat)


def test_autocontrast_stretches_to_the_unit_range():
  image = smooth_image() * 0.3 + 0.35
  stretched = defects.autocontrast(image)
  assert float(stretched.min()) == 0.0
  np.testing.assert_allclose(float(stretched.max()), 1.0, atol=1e-6)
  # Linear: the order of the pixels is kept.
  order = np.argsort(np.asarray(image).ravel())
  assert np.all(np.diff(np.asarray(stretched).ravel()[order]) >= -1e-7)


def high_frequency_energy(image):
  spectrum = np.abs(np.fft.fft2(np.asarray(image)[..., 0])) ** 2
  frequencies = np.abs(np.fft.fftfreq(image.shape[0]))
  high = (frequencies[:, None] > 0.25) | (frequencies[None, :] > 0.25)
  return spectrum[high].sum()


def test_blur_lowers_high_frequency_energy():
  noise = jax.random.uniform(jax.random.key(1), (64, 64, 1))
  blurred = defects.blur(noise, 1.5, 11)
  assert high_frequency_energy(blurred) < 0.1 * high_frequency_energy(noise)


def test_random_defects_are_a_pure_function_of_the_key():
  config = defects.DefectConfig.from_config(default.get_config())
  images = jnp.stack([smooth_image(s) for s in range(8)])
  draw = jax.jit(lambda key: defects.random_defects_batch(key, images, config))
  first, again, other = draw(jax.random.key(0)), draw(jax.random.key(0)), draw(
      jax.random.key(1))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  # With every probability in the default config, some images change.
  changed = np.abs(np.asarray(first) - np.asarray(images)).max(axis=(1, 2, 3))
  assert np.sum(changed > 0.01) >= 2


def test_no_defects_when_every_probability_is_zero():
  config = defects.DefectConfig()
  images = jnp.stack([smooth_image(s) for s in range(4)])
  np.testing.assert_array_equal(
      defects.random_defects_batch(jax.random.key(0), images, config), images)


def test_blur_sigmas_scale_with_the_image_size():
  config = default.get_config()
  config.image_size = 256
  scaled = defects.DefectConfig.from_config(config)
  assert scaled.blur_sigma_max == 4 * config.defects.blur_sigma_max
  assert scaled.blur_kernel_size % 2 == 1


def test_rotation_and_blur_equal_dm_pix():
  """Our faster formulations compute dm-pix's functions."""
  import dm_pix  # pylint: disable=g-import-not-at-top
  image = jax.random.uniform(jax.random.key(5), (48, 40, 1))
  for degrees in (-13.0, 7.5):
    np.testing.assert_allclose(
        defects.rotate(image, degrees),
        dm_pix.rotate(image, np.deg2rad(degrees), mode='constant', cval=0.0),
        atol=1e-5)
  two_channels = jax.random.uniform(jax.random.key(6), (32, 24, 2))
  np.testing.assert_allclose(
      defects.rotate(two_channels, 11.0),
      dm_pix.rotate(two_channels, np.deg2rad(11.0), mode='constant', cval=0.0),
      atol=1e-5)
  for sigma in (0.6, 1.4):
    np.testing.assert_allclose(defects.blur(image, sigma, 11),
                               dm_pix.gaussian_blur(image, sigma, 11), atol=1e-6)


def test_equalize_counts_alike_by_scatter_and_by_compare():
  """Both ways of counting give the same levels, hence the same image."""
  size = 64
  images = [
      smooth_image(7, size),
      jax.random.uniform(jax.random.key(8), (size, size, 1)),
      jnp.full((size, size, 1), 0.3),  # one level: left unchanged
      jnp.zeros((size, size, 1)).at[:5].set(1.0),  # two levels
      jnp.round(jax.random.uniform(jax.random.key(9), (size, size, 1)) * 3) / 3,
  ]
  for image in images:
    levels = jnp.round(image * 255).astype(jnp.int32)
    scatter = defects.level_counts(levels, 'scatter')
    compare = defects.level_counts(levels, 'compare')
    for a, b in zip(scatter, compare):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(defects.equalize(image, 'compare'),
                                  defects.equalize(image, 'scatter'))
  # Vmapped, as in the train step.
  batch = jnp.stack(images)
  np.testing.assert_array_equal(
      jax.vmap(lambda x: defects.equalize(x, 'compare'))(batch),
      jax.vmap(lambda x: defects.equalize(x, 'scatter'))(batch))


def test_defect_config_reads_and_checks_the_equalize_impl():
  config = default.get_config()
  assert defects.DefectConfig.from_config(config).equalize_impl == 'scatter'
  config.defects.equalize_impl = 'compare'
  assert defects.DefectConfig.from_config(config).equalize_impl == 'compare'
  config.defects.equalize_impl = 'sort'
  with pytest.raises(ValueError, match='config.defects.equalize_impl'):
    defects.DefectConfig.from_config(config)
