"""Random image defects that the model learns to correct (paper Sec. 2.1.2, 3).

Everything here runs on the accelerator inside the jitted train step: pure
functions of (rng, image) for one (H, W, 1) float image in [0, 1], vmapped over
the batch. The model sees the defective image; the losses compare its output
with the clean one.

Flip comes from dm-pix. Rotation and the Gaussian blur are dm-pix's
functions in faster forms (tests check that the values agree): the rotation's
bilinear interpolation as 4 plain gathers, the blur as two banded matrix
products (dm-pix convolves depthwise, which XLA:CPU runs 12-17× slower once
vmapped over per-example sigmas). dm-pix has no histogram equalization or
autocontrast, so those two follow PIL's `ImageOps` (as torchvision's
RandomEqualize / RandomAutocontrast do) in plain JAX.
"""

import dataclasses
import math

import dm_pix
import jax
import jax.numpy as jnp

NUM_LEVELS = 256  # equalize works on 8-bit grey levels, like PIL
# How equalize counts the grey levels (the same counts): 'scatter' = a
# bincount (a scatter-add; the CPU's fastest), 'compare' = compare-and-sum
# against every level (no scatter; for accelerators, where a scatter-add into
# 256 bins serialises on atomic updates).
EQUALIZE_IMPLS = ('scatter', 'compare')


@dataclasses.dataclass(frozen=True)
class DefectConfig:
  """Probabilities and ranges of the defects (from `config.defects`)."""

  rotate_prob: float = 0.0
  max_rotation_degrees: float = 0.0
  flip_prob: float = 0.0
  blur_prob: float = 0.0
  blur_sigma_min: float = 0.5  # pixels at the image size of the config
  blur_sigma_max: float = 1.5
  equalize_prob: float = 0.0
  autocontrast_prob: float = 0.0
  equalize_impl: str = 'scatter'  # one of EQUALIZE_IMPLS

  @classmethod
  def from_config(cls, config) -> 'DefectConfig':
    """Reads `config.defects`; blur sigmas are given at 64 px and scaled."""
    d = config.defects
    scale = config.image_size / 64
    for name in ('rotate_prob', 'flip_prob', 'blur_prob', 'equalize_prob',
                 'autocontrast_prob'):
      if not 0.0 <= d[name] <= 1.0:
        raise ValueError(f'config.defects.{name} must be in [0, 1], got {d[name]}')
    if not 0.0 < d.blur_sigma_min <= d.blur_sigma_max:
      raise ValueError('config.defects.blur_sigma_min/blur_sigma_max must satisfy '
                       f'0 < min <= max, got {d.blur_sigma_min}, {d.blur_sigma_max}')
    if d.max_rotation_degrees < 0:
      raise ValueError('config.defects.max_rotation_degrees must be >= 0, got '
                       f'{d.max_rotation_degrees}')
    if d.equalize_impl not in EQUALIZE_IMPLS:
      raise ValueError(f'config.defects.equalize_impl must be one of '
                       f'{EQUALIZE_IMPLS}, got {d.equalize_impl!r}')
    return cls(
        rotate_prob=d.rotate_prob,
        max_rotation_degrees=d.max_rotation_degrees,
        flip_prob=d.flip_prob,
        blur_prob=d.blur_prob,
        blur_sigma_min=d.blur_sigma_min * scale,
        blur_sigma_max=d.blur_sigma_max * scale,
        equalize_prob=d.equalize_prob,
        autocontrast_prob=d.autocontrast_prob,
        equalize_impl=d.equalize_impl,
    )

  @property
  def blur_kernel_size(self) -> int:
    """Odd kernel covering ±3 sigma of the widest blur."""
    return 2 * math.ceil(3 * self.blur_sigma_max) + 1


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
  """Rotates counter-clockwise about the centre; corners outside become black.

  `dm_pix.rotate(image, angle, mode='constant')`: bilinear between the 4
  pixels around each source point, 0 for a point outside the image. Written
  out as 4 gathers of (H, W, C) pixels: dm-pix's 3-D path interpolates 8
  corners, and its flat N-D gather ran 8× slower at 256 px on XLA:CPU.
  """
  height, width = image.shape[0], image.shape[1]
  angle = jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing='ij')
  centre_row, centre_col = (height - 1) / 2, (width - 1) / 2
  # The inverse rotation: where each output pixel comes from.
  source_rows = cos * (rows - centre_row) + sin * (cols - centre_col) + centre_row
  source_cols = -sin * (rows - centre_row) + cos * (cols - centre_col) + centre_col
  inside = ((source_rows >= 0) & (source_rows <= height - 1) &
            (source_cols >= 0) & (source_cols <= width - 1))
  # The 2×2 block's top-left pixel; on the last row (column) the block ends
  # there and the point gets the full weight of its lower (right) pixel.
  top = jnp.clip(jnp.floor(source_rows), 0, height - 2)
  left = jnp.clip(jnp.floor(source_cols), 0, width - 2)
  down = (source_rows - top)[..., None]
  right = (source_cols - left)[..., None]
  top, left = top.astype(jnp.int32), left.astype(jnp.int32)
  interpolated = ((1 - down) * (1 - right) * image[top, left] +
                  (1 - down) * right * image[top, left + 1] +
                  down * (1 - right) * image[top + 1, left] +
                  down * right * image[top + 1, left + 1])
  return jnp.where(inside[..., None], interpolated, 0.0).astype(image.dtype)


def flip(image: jax.Array) -> jax.Array:
  return dm_pix.flip_left_right(image)


def _blur_band(size: int, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """(size, size) matrix of dm-pix's Gaussian taps; rows cut at the borders
  (the zero padding of its 'SAME' convolution)."""
  radius = int(kernel_size / 2)
  offsets = (jnp.arange(size, dtype=jnp.float32)[None, :] -
             jnp.arange(size, dtype=jnp.float32)[:, None])
  taps = jnp.exp(-offsets**2 / (2.0 * sigma**2)) * (jnp.abs(offsets) <= radius)
  window = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  return taps / jnp.sum(jnp.exp(-window**2 / (2.0 * sigma**2)))


def blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """`dm_pix.gaussian_blur(image, sigma, kernel_size)` of an (H, W, C) image."""
  rows = _blur_band(image.shape[0], sigma, kernel_size)
  cols = _blur_band(image.shape[1], sigma, kernel_size)
  return jnp.einsum('ih,hwc,jw->ijc', rows, image, cols,
                    precision=jax.lax.Precision.HIGHEST)


def level_counts(levels: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
  """(pixels at each level, pixels below each level) of integer `levels` in
  [0, NUM_LEVELS), each (NUM_LEVELS,) int32, computed as `impl` says."""
  if impl == 'scatter':
    histogram = jnp.bincount(levels.ravel(), length=NUM_LEVELS)
    return histogram, jnp.cumsum(histogram) - histogram
  if impl == 'compare':
    # Pixels below each of the levels 0..NUM_LEVELS; the histogram follows.
    below = jnp.sum(levels.reshape(-1, 1) < jnp.arange(NUM_LEVELS + 1),
                    axis=0, dtype=jnp.int32)
    return below[1:] - below[:-1], below[:-1]
  raise ValueError(f'equalize impl must be one of {EQUALIZE_IMPLS}, got {impl!r}')


def equalize(image: jax.Array, impl: str = 'scatter') -> jax.Array:
  """Histogram equalization of the 8-bit grey levels (PIL's ImageOps.equalize).

  The look-up table spreads the cumulative histogram evenly over 0..255; as in
  PIL the most frequent top level is left out of the step, and an image with a
  single grey level is returned unchanged. `impl` (EQUALIZE_IMPLS) only
  chooses how the levels are counted.
  """
  levels = jnp.clip(jnp.round(image * (NUM_LEVELS - 1)), 0, NUM_LEVELS - 1)
  levels = levels.astype(jnp.int32)
  histogram, below = level_counts(levels, impl)
  last_nonzero = jnp.max(jnp.where(histogram > 0, jnp.arange(NUM_LEVELS), 0))
  step = (jnp.sum(histogram) - histogram[last_nonzero]) // (NUM_LEVELS - 1)
  safe_step = jnp.maximum(step, 1)
  # Pixels below each level, shifted by half a step to round.
  lut = jnp.clip((below + safe_step // 2) // safe_step, 0, NUM_LEVELS - 1)
  equalized = lut[levels].astype(image.dtype) / (NUM_LEVELS - 1)
  return jnp.where(step > 0, equalized, image)


def autocontrast(image: jax.Array) -> jax.Array:
  """Stretches the image linearly so that its minimum is 0 and its maximum 1."""
  low, high = jnp.min(image), jnp.max(image)
  stretched = (image - low) / jnp.maximum(high - low, 1e-12)
  return jnp.where(high > low, stretched, image)


def sample_defects(rng: jax.Array, config: DefectConfig) -> dict[str, jax.Array]:
  """Draws which defects hit one image, and their strengths."""
  keys = jax.random.split(rng, 7)
  hit = lambda key, p: jax.random.uniform(key) < p
  return {
      'rotate': hit(keys[0], config.rotate_prob),
      'degrees': jax.random.uniform(keys[1], minval=-config.max_rotation_degrees,
                                    maxval=config.max_rotation_degrees),
      'flip': hit(keys[2], config.flip_prob),
      'blur': hit(keys[3], config.blur_prob),
      'sigma': jax.random.uniform(keys[4], minval=config.blur_sigma_min,
                                  maxval=config.blur_sigma_max),
      'equalize': hit(keys[5], config.equalize_prob),
      'autocontrast': hit(keys[6], config.autocontrast_prob),
  }


def apply_defects(image: jax.Array, defects: dict[str, jax.Array],
                  config: DefectConfig) -> jax.Array:
  """Applies the drawn defects in a fixed order: geometry, blur, then levels."""
  if config.rotate_prob > 0:
    image = jnp.where(defects['rotate'], rotate(image, defects['degrees']), image)
  if config.flip_prob > 0:
    image = jnp.where(defects['flip'], flip(image), image)
  if config.blur_prob > 0:
    blurred = blur(image, defects['sigma'], config.blur_kernel_size)
    image = jnp.where(defects['blur'], blurred, image)
  if config.equalize_prob > 0:
    image = jnp.where(defects['equalize'],
                      equalize(image, config.equalize_impl), image)
  if config.autocontrast_prob > 0:
    image = jnp.where(defects['autocontrast'], autocontrast(image), image)
  return image


def random_defects(rng: jax.Array, image: jax.Array,
                   config: DefectConfig) -> jax.Array:
  """One (H, W, 1) image in [0, 1] → the same image with random defects."""
  return apply_defects(image, sample_defects(rng, config), config)


def random_defects_batch(rng: jax.Array, images: jax.Array,
                         config: DefectConfig) -> jax.Array:
  """(B, H, W, 1) images → defective images, an independent draw per image."""
  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(lambda key, image: random_defects(key, image, config))(
      keys, images)


# Streams of randomness folded into the seed, so train and eval never share.
TRAIN_STREAM, EVAL_STREAM = 0, 1


def example_keys(seed: int, stream: int, counter: jax.Array,
                 positions: jax.Array) -> jax.Array:
  """One key per example, from (seed, stream, step or batch, position): the
  draws of an example do not depend on how batches are split over devices."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream),
                            counter)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, positions)


def defective_inputs(images: jax.Array, keys: jax.Array,
                     config: DefectConfig) -> tuple[jax.Array, jax.Array]:
  """(B, H, W, 1) uint8 images and one key per example → (clean, defective)
  float images in [0, 1]; the defects are drawn from each key's fold 0."""
  clean = images.astype(jnp.float32) / 255.0
  defect_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  defective = jax.vmap(lambda key, image: random_defects(key, image, config))(
      defect_keys, clean)
  return clean, defective
