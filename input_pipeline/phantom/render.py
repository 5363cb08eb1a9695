"""Vectorised rendering of phantom images, lung masks and structure maps.

An image is the display of a projected attenuation map: soft tissue of the
body outline, minus the air of the lungs, plus the bones, the findings'
signatures and the support device. Images are rendered in chunks of at most
_CHUNK_PIXELS pixels, each image's fields as one row of (n, S, S) arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from input_pipeline.phantom import anatomy
from input_pipeline.phantom import factors as factors_lib
from input_pipeline.phantom import findings
from input_pipeline.phantom import pixels

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048
_CHUNK_PIXELS = 2 ** 18      # pixels per rendered chunk (memory bound)


def check_image_size(image_size: int) -> None:
  """Raises ValueError unless `image_size` is an int in the supported range."""
  if (isinstance(image_size, bool)
      or not isinstance(image_size, (int, np.integer))
      or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
    raise ValueError(f'image_size must be an int in [{MIN_IMAGE_SIZE}, '
                     f'{MAX_IMAGE_SIZE}], got {image_size!r}')


def render_batch(
    factors_list: Sequence[dict[str, Any]],
    image_size: int,
    *,
    with_structures: bool = False,
):
  """Renders images from factors (see factors.sample_factors); vectorised.

  Args:
    factors_list: one factors dict per image.
    image_size: side S of the square images, MIN_IMAGE_SIZE..MAX_IMAGE_SIZE.
    with_structures: also return soft structure maps, float32 (N, S, S) in
      [0, 1]: 'heart', 'thorax' (both hemithoraces, before the diaphragm cut),
      'lung_field', 'finding' (where finding signatures were drawn, weighted),
      'device' (the support device).

  Returns:
    images uint8 (N, S, S), lung_masks uint8 (N, S, S) in {0, 255}
    [, structures dict].
  """
  check_image_size(image_size)
  count = len(factors_list)
  images = np.zeros((count, image_size, image_size), np.uint8)
  masks = np.zeros_like(images)
  structures = {}
  chunk_size = max(1, _CHUNK_PIXELS // (image_size * image_size))
  for start in range(0, count, chunk_size):
    part = list(factors_list[start:start + chunk_size])
    chunk_images, chunk_masks, chunk_structures = _render_chunk(
        _Chunk(part, image_size), with_structures)
    images[start:start + len(part)] = chunk_images
    masks[start:start + len(part)] = chunk_masks
    for name, field in chunk_structures.items():
      structures.setdefault(name, np.zeros(images.shape, np.float32))[
          start:start + len(part)] = field
  return (images, masks, structures) if with_structures else (images, masks)


def render_factors(factors: dict[str, Any], image_size: int):
  """Renders one image from its factors.

  Returns:
    (image uint8 (S, S), lung_mask uint8 (S, S) in {0, 255}, factors plus
    DERIVED_FACTORS).
  """
  images, masks = render_batch([factors], image_size)
  return images[0], masks[0], {**factors, **anatomy.derived_factors(factors)}


def render_examples(seed: int, split: str, indices: Sequence[int],
                    image_size: int, variant: str = 'chestxray14',
                    **sample_kwargs):
  """Examples `indices` of a data set: (images, masks, factors list).

  Each example is a pure function of (seed, split, index, settings), so any
  subset, in any order or batching, gives the same bytes.
  """
  factors_list = [
      factors_lib.example_factors(seed, split, i, variant, **sample_kwargs)
      for i in indices]
  images, masks = render_batch(factors_list, image_size)
  factors_list = [{**f, **anatomy.derived_factors(f)} for f in factors_list]
  return images, masks, factors_list


class _Chunk:
  """Per-image parameters of a chunk of images, as (n, 1, 1) columns."""

  def __init__(self, factors_list, image_size):
    self.n = len(factors_list)
    self.size = image_size
    self.pixel = 1.0 / image_size
    self.factors = factors_list
    self.geometry = [anatomy.geometry(f) for f in factors_list]
    self.params = {key: pixels.column([g[key] for g in self.geometry])
                   for key in self.geometry[0]}
    for key in factors_lib.SCALAR_FACTORS[:-1]:
      self.params[key] = pixels.column([f[key] for f in factors_list])
    self.severity = np.stack([np.asarray(f['sign_severity'], np.float32)
                              for f in factors_list])
    self.side = np.stack([np.asarray(f['sign_side'], np.uint8)
                          for f in factors_list])


class _Sub:
  """The fields of the images of a chunk that carry one signature."""

  def __init__(self, chunk, fields, index, stream):
    self.chunk, self.fields, self.index, self.stream = (
        chunk, fields, index, stream)
    self.pixel = chunk.pixel
    sign = stream < len(factors_lib.SIGNS)   # else the support device
    self.severity = (pixels.column(chunk.severity[index, stream]) if sign
                     else None)
    self.side_codes = chunk.side[index, stream] if sign else None
    self._taken = {}

  def __getattr__(self, name):
    if name.startswith('_') or name in ('chunk', 'fields', 'index'):
      raise AttributeError(name)
    if name not in self._taken:
      self._taken[name] = self.fields[name][self.index]
    return self._taken[name]

  def param(self, name):
    return self.chunk.params[name][self.index]

  def plans(self, planner):
    """Stacks planner(rng, geometry, severity, side, factors) per image."""
    rows = []
    stream = self.stream
    sign = stream < len(factors_lib.SIGNS)   # else the support device
    for i in self.index:
      factors = self.chunk.factors[i]
      rows.append(planner(
          anatomy.detail_rng(factors, stream), self.chunk.geometry[i],
          float(self.chunk.severity[i, stream]) if sign else 0.,
          int(self.chunk.side[i, stream]) if sign else 0,
          factors))
    return {key: np.asarray([row[key] for row in rows], np.float32)
            for key in rows[0]}

  def side_mask(self):
    """1 on the affected side(s) (template frame: right = image left)."""
    codes = pixels.column(self.side_codes)
    right = self.right
    return np.where(
        codes == factors_lib.SIDE_BOTH, True,
        np.where(codes == factors_lib.SIDE_RIGHT, right, ~right)).astype(
            np.float32)


def _noise_fields(chunk: _Chunk):
  """Per-image noise from each texture seed: quantum, texture, low-frequency."""
  size = chunk.size
  quantum = np.empty((chunk.n, size, size), np.float32)
  texture = np.empty_like(quantum)
  coarse = np.empty((chunk.n, 2, 7, 7), np.float32)
  for i, factors in enumerate(chunk.factors):
    rng = anatomy.detail_rng(factors, len(factors_lib.SIGNS) + 1)
    # Uniform white noise (cheaper than normal; smoothing makes it Gaussian).
    quantum[i], texture[i] = rng.random((2, size, size), np.float32)
    coarse[i] = rng.standard_normal((2, 7, 7), np.float32)
  quantum -= 0.5
  quantum *= np.sqrt(12.0)      # unit variance
  texture -= 0.5
  up = pixels.upsample_matrix(size, 7)
  low_frequency = up @ coarse @ up.T          # (n, 2, S, S), smooth, ~N(0, 1)
  return quantum, texture, low_frequency


def _render_chunk(chunk: _Chunk, with_structures: bool):
  size, pixel = chunk.size, chunk.pixel
  p = chunk.params

  # Patient frame: undo the tilt and the shift.
  centres = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  theta = np.deg2rad(p['rotation_degrees'])
  cos_t, sin_t = np.cos(theta), np.sin(theta)
  uu = centres[None, None, :] - p['shift_x']
  vv = centres[None, :, None] - p['shift_y']
  x = 0.5 + cos_t * uu + sin_t * vv
  y = 0.5 - sin_t * uu + cos_t * vv
  del uu, vv
  dx = np.abs(x - 0.5)
  apex_y, sx, sy = p['apex_y'], p['sx'], p['sy']
  quantum, texture, low_frequency = _noise_fields(chunk)

  # --- Lungs (template frame) -------------------------------------------
  upper = 1 - pixels.ramp(y, apex_y, apex_y + 0.35 * sy)
  tx = anatomy.MIDLINE_T + (x - 0.5) / (
      sx * (1 + 0.09 * (p['roundness'] - 0.45) * upper))
  ty = anatomy.APEX_T + (y - apex_y) / sy
  del upper
  signed_distance = anatomy.sample_template(tx, ty, size)
  signed_distance *= 0.5 * (sx + sy)
  thorax = pixels.edge(-signed_distance, pixel)
  right = tx < anatomy.MIDLINE_T
  dome_ty = np.where(right, p['dome_top_right'], p['dome_top_left'])
  dome_centre = np.where(right, anatomy.DOME_CENTRE_T[0],
                         anatomy.DOME_CENTRE_T[1])
  lateral = (tx - dome_centre) / anatomy.DOME_HALF_WIDTH_T
  dome_ty += np.where(right, p['dome_height_right'],
                      p['dome_height_left']) * lateral * lateral
  below_dome = (ty - dome_ty) * sy         # > 0 below the diaphragm
  del dome_ty, dome_centre, lateral
  above_dome = pixels.edge(-below_dome, pixel)

  # Heart: a sheared ellipse (apex down and to the patient's left).
  hy = y - p['heart_y']
  hx = (x - p['heart_x'] - 0.3 * hy) / p['heart_a']
  heart_radius = np.sqrt(hx * hx + (hy / p['heart_b']) ** 2)
  heart = pixels.edge((1 - heart_radius) * p['heart_b'], pixel)
  del hx, hy, heart_radius

  lung_field = thorax * above_dome * (1 - heart)
  lung_depth = np.sqrt(pixels.ramp(-signed_distance, 0.0, 0.07))
  lung_depth *= pixels.ramp(-below_dome, 0.0, 0.035)
  # Lung markings: vessels from the hila, fading to the periphery.
  markings = pixels.smooth_normalised(texture, max(0.6, 0.008 * size))
  distance_hila = np.minimum(
      (x - 0.5 - (anatomy.HILUM_T[0][0] - anatomy.MIDLINE_T) * sx) ** 2,
      (x - 0.5 - (anatomy.HILUM_T[1][0] - anatomy.MIDLINE_T) * sx) ** 2)
  distance_hila += (y - apex_y - (0.44 - anatomy.APEX_T) * sy) ** 2
  vessels = pixels.ramp(markings, 0.8, 2.4) * (
      0.25 + np.exp(-distance_hila / 0.02))
  del markings, distance_hila

  fields = dict(x=x, y=y, tx=tx, ty=ty, right=right, sd=signed_distance,
                thorax=thorax, above_dome=above_dome, lung_field=lung_field,
                below_dome=below_dome, low0=low_frequency[:, 0],
                low1=low_frequency[:, 1], texture=texture, heart=heart)
  air_scale = np.ones_like(x)
  vessel_scale = np.ones_like(x)
  density = np.zeros_like(x)       # extra attenuation: findings, devices
  finding = np.zeros_like(x) if with_structures else None
  device = _draw_findings(chunk, fields, air_scale, vessel_scale, density,
                          finding)
  del fields

  vessel_scale *= vessels
  # Vessels are sub-pixel at low resolution: less contrast per pixel.
  vessel_scale *= -0.26 * min(1.0, max(0.4, size / 192))
  vessel_scale += 1
  air = lung_depth
  air *= air_scale
  air *= vessel_scale
  air *= 1 - 0.93 * heart
  air *= 0.82
  del lung_depth, air_scale, vessel_scale, vessels

  # --- Body soft tissue ----------------------------------------------------
  shoulder_y, apex = p['shoulder_y'], apex_y
  neck, shoulder = p['neck_half_width'], p['shoulder_half_width']
  rise = pixels.ramp(y, shoulder_y, shoulder_y + 0.15)
  rise *= 2 - rise    # the shoulder line slopes down from the neck
  half_width = neck + (shoulder - neck) * rise
  half_width += (p['chest_half_width'] - shoulder) * pixels.ramp(
      y, apex + 0.12, apex + 0.4)
  half_width -= 0.03 * pixels.ramp(y, 0.8, 1.0)
  body_depth = np.clip(1 - (dx / half_width) ** 2, 0, 1)
  np.sqrt(body_depth, out=body_depth)
  del rise
  soft = 1.32 * body_depth
  female = np.nonzero(chunk.params['sex'][:, 0, 0] > 0.5)[0]
  if len(female):
    soft[female] += anatomy.breast_shadows(
        chunk, female, dx[female], y[female]) * pixels.ramp(
            half_width[female] + 0.03 - dx[female], 0.0, 0.03)
  del half_width
  soft += 0.15 * heart * thorax * above_dome
  soft += 0.22 * pixels.ramp(below_dome, 0.0, 0.02) * body_depth
  # Gastric bubble under the left dome.
  left_dome_y = p['gastric_y']
  bubble = 1 - ((x - 0.5 - 0.55 * p['lung_half_width']) / 0.045) ** 2 - (
      (y - left_dome_y) / 0.028) ** 2
  bubble = pixels.ramp(bubble, 0, 0.3) * (y < left_dome_y + 0.012)
  soft -= 0.3 * bubble
  # Trachea and main bronchi (air), faint.
  carina_y = apex_y + 0.22 * sy
  airway = pixels.edge(0.017 - dx, pixel) * (y < carina_y)
  below_carina = y - carina_y
  bronchus = np.abs(dx - 0.8 * below_carina) * 0.78   # main bronchi, 38 deg
  bronchus = pixels.edge(0.013 - bronchus, pixel)
  bronchus *= (below_carina > 0) & (below_carina < 0.07)
  np.maximum(airway, bronchus, out=airway)
  del below_carina, bronchus
  soft -= 0.18 * airway * body_depth
  del bubble, airway

  bones = anatomy.bone_attenuation(chunk, x, y, dx, tx, ty, signed_distance,
                                   below_dome, body_depth)
  attenuation = soft
  attenuation -= air
  attenuation += density
  attenuation += bones
  del soft, air, bones

  # --- Display -------------------------------------------------------------
  exposure = p['exposure']
  gain = 1.08 * 2.0 ** (-0.45 * exposure)
  np.maximum(attenuation, 0, out=attenuation)
  if size >= 128:   # a little scatter blur, as on a real detector
    attenuation = ndimage.gaussian_filter(
        attenuation, (0, 0.003 * size, 0.003 * size), truncate=2.5)
  # Display: 1 - exp(-gain A^1.25) (A^1.25 = A sqrt(sqrt(A)), cheaper).
  intensity = np.sqrt(np.sqrt(attenuation))
  intensity *= attenuation
  intensity *= -gain
  np.exp(intensity, out=intensity)
  np.subtract(1, intensity, out=intensity)
  intensity *= 0.97 - 0.03 * exposure
  intensity += 0.025
  # Quantum noise; its per-pixel std falls as 1 / sqrt(size) so that the noise
  # looks alike at every size when viewed at the same physical size.
  noise = p['noise_level'] * np.float32(np.sqrt(64.0 / size))
  intensity += quantum * (noise * (0.5 + 0.5 * intensity))
  images = np.round(np.clip(intensity, 0, 1) * 255).astype(np.uint8)
  masks = np.where(lung_field >= 0.5, 255, 0).astype(np.uint8)
  structures = {}
  if with_structures:
    structures = dict(heart=heart, thorax=thorax, lung_field=lung_field,
                      finding=np.clip(finding, 0, 1),
                      device=np.clip(device, 0, 1))
  return images, masks, structures


def _draw_findings(chunk, fields, air_scale, vessel_scale, density, finding):
  """Adds each present signature to the attenuation fields, in place.

  Returns the support-device map (the confounder).
  """
  for name, draw in findings.SIGNATURES.items():
    index = np.nonzero(chunk.severity[:, factors_lib.SIGN_INDEX[name]] > 0)[0]
    if not len(index):
      continue
    sub = _Sub(chunk, fields, index, factors_lib.SIGN_INDEX[name])
    opacity, extra_density, region, vessel_factor = draw(sub)
    if opacity is not None:
      air_scale[index] *= 1 - opacity
    if extra_density is not None:
      density[index] += extra_density
    if vessel_factor is not None:
      vessel_scale[index] *= vessel_factor
    if finding is not None and region is not None:
      finding[index] = np.maximum(finding[index], region)
  device = np.zeros_like(density)
  carriers = np.nonzero(chunk.params['support_device'][:, 0, 0] > 0.5)[0]
  if len(carriers):
    sub = _Sub(chunk, fields, carriers, len(factors_lib.SIGNS))
    device[carriers] = findings.support_device(sub)
    density += device
  return device
