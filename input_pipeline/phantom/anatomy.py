"""Anatomy of a phantom patient: lung template, geometry and bones.

Template coordinates are those of the lung prior (lungs roughly in x
0.12..0.88, y 0.14..0.70), mapped per patient by a scale (thorax width and
lung height) and an apex height. `geometry` computes a patient's shape from
its factors alone; lesion placement draws from the patient's texture seed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from scipy import ndimage

from input_pipeline import assets
from input_pipeline.phantom import factors as factors_lib
from input_pipeline.phantom import pixels

# Template lung map geometry (template units: fractions of the prior's grid).
_TEMPLATE_GRID = 128
MIDLINE_T = 0.49             # centre of the mediastinal gap in the prior
APEX_T = 0.14                # top of the lungs in the prior
HILUM_T = ((0.375, 0.43), (0.615, 0.45))       # right, left
DOME_CENTRE_T = (0.30, 0.68)                   # right, left
DOME_HALF_WIDTH_T = 0.19
FISSURE_T = 0.43             # horizontal fissure of the right lung
_AP_MAGNIFICATION = 1.1      # heart magnification of an AP film
_FINE_FACTOR = 4             # template refinement for nearest lookups


@functools.lru_cache(maxsize=1)
def _lung_template():
  """Signed distance (template units, < 0 inside) to the population lungs.

  The prior is thresholded at P(lung) = 0.5; its blurry average base is
  replaced by the widest low row, extended down, so that each patient's
  diaphragm domes (not the average) bound the lungs below.
  """
  prior = assets.lung_prior(_TEMPLATE_GRID)
  grid = _TEMPLATE_GRID
  inside = prior >= 0.5
  middle = int(round(MIDLINE_T * grid))
  filled = np.zeros_like(inside)
  for half in (slice(0, middle), slice(middle, grid)):
    lung = inside[:, half]
    rows = np.nonzero(lung.any(axis=1))[0]
    for row in rows:   # fill each row between its extremes (no holes)
      columns = np.nonzero(lung[row])[0]
      filled[row, half][columns.min():columns.max() + 1] = True
  widths = np.array([np.ptp(np.nonzero(r)[0]) + 1 if r.any() else 0
                     for r in filled])
  widths[int(0.70 * grid):] = 0
  widest_row = int(np.argmax(widths))
  filled[widest_row:] = filled[widest_row]
  inside_distance = ndimage.distance_transform_edt(filled)
  outside_distance = ndimage.distance_transform_edt(~filled)
  # Pixel centres: the boundary lies half a pixel outside the last inside one.
  signed_distance = (outside_distance - inside_distance
                     + 0.5 * (filled.astype(np.float64) * 2 - 1))
  signed_distance = (signed_distance / grid).astype(np.float32)
  columns = np.nonzero(filled[widest_row])[0]
  max_width = (columns.max() - columns.min() + 1) / grid
  # Candidate lesion centres: well inside the lungs, above the lowest domes.
  rows, cols = np.nonzero(signed_distance < -0.045)
  centres = np.stack([(cols + 0.5) / grid, (rows + 0.5) / grid], axis=1)
  centres = centres[centres[:, 1] < 0.66].astype(np.float32)
  return signed_distance, float(max_width), centres


@functools.lru_cache(maxsize=1)
def _fine_template() -> np.ndarray:
  """The template signed distance on a 4x finer grid, for nearest lookups."""
  table = _lung_template()[0]
  fine = ndimage.zoom(table, _FINE_FACTOR, order=1, mode='nearest',
                      grid_mode=True)
  return fine.astype(np.float32)


def sample_template(tx: np.ndarray, ty: np.ndarray,
                    image_size: int) -> np.ndarray:
  """Template signed distance (template units) at template coordinates.

  Nearest lookup on a 4x finer grid (error < 1/1024 of the template side)
  below 256 px, bilinear on the native grid above.
  """
  if image_size < 256:
    table = _fine_template()
    grid = table.shape[0]
    column = np.multiply(tx, grid, dtype=np.float32)
    np.clip(column, 0, grid - 1, out=column)
    row = np.multiply(ty, grid, dtype=np.float32)
    np.clip(row, 0, grid - 1, out=row)
    index = row.astype(np.int32)
    index *= grid
    index += column.astype(np.int32)
    return table.ravel()[index]
  table = _lung_template()[0]
  grid = table.shape[0]
  fx = np.clip(tx * grid - 0.5, 0.0, grid - 1.001)
  fy = np.clip(ty * grid - 0.5, 0.0, grid - 1.001)
  x0 = fx.astype(np.int32)
  y0 = fy.astype(np.int32)
  wx = fx - x0
  wy = fy - y0
  index = y0 * grid + x0
  flat = table.ravel()
  top = flat[index] * (1 - wx) + flat[index + 1] * wx
  bottom = flat[index + grid] * (1 - wx) + flat[index + grid + 1] * wx
  return (top * (1 - wy) + bottom * wy).astype(np.float32)


def bone_density(age: float) -> float:
  """Relative bone mineral density: child 0.85, peak 1.0 at 25-35, 0.6 at 90."""
  if age < 25:
    return 0.85 + 0.15 * age / 25
  return 1.0 - 0.4 * min(max(age - 35, 0.0), 55.0) / 55.0


def geometry(factors: dict[str, Any]) -> dict[str, float]:
  """Per-patient shape parameters, from the factors alone."""
  _, template_width, _ = _lung_template()
  severity = np.asarray(factors['sign_severity'], np.float32)
  side = np.asarray(factors['sign_side'])
  def sev(name):
    return float(severity[factors_lib.SIGN_INDEX[name]])
  female = factors['sex'] == 1
  ap = factors['view'] == 1
  age = float(factors['age'])
  body_size = float(factors['body_size'])
  emphysema, fibrosis = sev('Emphysema'), sev('Fibrosis')
  g: dict[str, float] = {}
  g['bone_density'] = bone_density(age)
  # Older thoraces are rounder (barrel-shaped); children's ribs are flatter.
  g['roundness'] = float(np.clip((age - 20) / 55, 0, 1))
  g['rib_slope'] = 0.21 * (0.5 + 0.5 * min(age / 18, 1.0))
  g['sx'] = (0.92 * body_size * (0.93 if female else 1.0)
             * (1 + 0.05 * emphysema) * (1 - 0.04 * fibrosis))
  g['sy'] = (1.04 * np.sqrt(body_size) * (1 + 0.05 * factors['inspiration'])
             * (1 + 0.06 * emphysema) * (1 - 0.06 * fibrosis))
  g['apex_y'] = 0.112 - 0.008 * ap
  # Domes (template units): the right one higher; emphysema flattens and
  # lowers them; fibrosis and atelectasis (volume loss) raise them.
  atelectasis = sev('Atelectasis')
  atelectasis_side = side[factors_lib.SIGN_INDEX['Atelectasis']]
  for name, top, own_sides in (
      ('right', 0.675, (factors_lib.SIDE_RIGHT, factors_lib.SIDE_BOTH)),
      ('left', 0.70, (factors_lib.SIDE_LEFT, factors_lib.SIDE_BOTH))):
    raise_by = 0.035 * fibrosis
    if atelectasis and atelectasis_side in own_sides:
      raise_by += 0.045 + 0.05 * atelectasis
    g[f'dome_top_{name}'] = top + 0.05 * emphysema - raise_by
    g[f'dome_height_{name}'] = 0.075 * (1 - 0.9 * emphysema)
  g['lung_half_width'] = 0.5 * g['sx'] * template_width
  g['thorax_width'] = g['sx'] * template_width
  ctr = float(factors['heart_size'])
  cardiomegaly = sev('Cardiomegaly')
  if cardiomegaly:
    ctr += 0.16 + 0.12 * cardiomegaly
  ctr *= _AP_MAGNIFICATION if ap else 1.0
  g['cardiothoracic_ratio'] = ctr
  g['heart_width'] = ctr * g['thorax_width']
  g['heart_a'] = 0.5 * g['heart_width']
  g['heart_b'] = (0.12 + 0.5 * g['heart_a']) * (
      _AP_MAGNIFICATION if ap else 1.0)
  g['heart_x'] = 0.5 + 0.22 * g['heart_a']
  left_dome_y = template_to_y(g, g['dome_top_left'])
  # The heart sits on the diaphragm: its lower half is hidden below it.
  g['heart_y'] = left_dome_y - 0.05
  g['gastric_y'] = left_dome_y + 0.045
  g['breast_y'] = left_dome_y - 0.1
  # Shoulders, chest wall, neck (half-widths, patient units).
  g['shoulder_half_width'] = (g['lung_half_width'] * 1.2 + 0.1) * (
      0.92 if female else 1.0)
  g['chest_half_width'] = g['lung_half_width'] + 0.045 + 0.1 * (body_size - 1)
  g['neck_half_width'] = 0.075 if female else 0.088
  g['shoulder_y'] = g['apex_y'] - 0.065
  g['humerus_x'] = g['shoulder_half_width'] - 0.075
  g['humerus_y'] = g['shoulder_y'] + 0.13
  return g


def template_to_y(g: dict[str, float], ty: float) -> float:
  """Patient y of template row `ty`, for the patient of geometry `g`."""
  return g['apex_y'] + (ty - APEX_T) * g['sy']


def template_to_x(g: dict[str, float], tx: float) -> float:
  """Patient x of template column `tx`, for the patient of geometry `g`."""
  return 0.5 + (tx - MIDLINE_T) * g['sx']


def derived_factors(factors: dict[str, Any]) -> dict[str, float]:
  """Factors that follow from the others (as rendered): widths, CTR, bones."""
  g = geometry(factors)
  return {name: float(g[name]) for name in factors_lib.DERIVED_FACTORS}


def detail_rng(factors: dict[str, Any], stream: int) -> np.random.Generator:
  """Generator of a patient's random details, one stream per signature
  (adding a finding moves nothing else)."""
  return np.random.default_rng([int(factors['texture_seed']), 1 + stream])


def lesion_centres(rng, g, side_code, count, margin, max_ty=None):
  """`count` lesion centres (patient coords) in the visible lungs, away from
  the heart by `margin` and above the domes."""
  _, _, candidates = _lung_template()
  if max_ty is None:
    max_ty = min(0.64, g['dome_top_right'] - 0.03, g['dome_top_left'] - 0.03)
  if side_code == factors_lib.SIDE_RIGHT:
    candidates = candidates[candidates[:, 0] < MIDLINE_T]
  elif side_code == factors_lib.SIDE_LEFT:
    candidates = candidates[candidates[:, 0] >= MIDLINE_T]
  candidates = candidates[candidates[:, 1] < max_ty]
  picks = candidates[rng.integers(len(candidates), size=48)]
  px = template_to_x(g, picks[:, 0])
  py = template_to_y(g, picks[:, 1])
  heart = (((px - g['heart_x'] - 0.3 * (py - g['heart_y']))
            / (g['heart_a'] + margin)) ** 2
           + ((py - g['heart_y']) / (g['heart_b'] + margin)) ** 2)
  ok = heart > 1.0
  if ok.sum() >= count:
    px, py = px[ok], py[ok]
  return px[:count], py[:count]


def breast_shadows(chunk, index, dx, y):
  """Breast soft-tissue shadows over the lower lateral lung fields, for the
  images `index` of a render chunk."""
  p = {key: value[index] for key, value in chunk.params.items()}
  size = p['breast_size']
  lung_half = p['lung_half_width']
  radius = (0.13 + 0.07 * size) * lung_half / 0.33
  centre_x = 0.62 * lung_half + 0.03
  centre_y = p['breast_y'] + 0.03 * size
  r2 = ((dx - centre_x) ** 2 + (y - centre_y) ** 2) / (radius * radius)
  profile = np.sqrt(np.clip(1 - r2, 0, 1))
  profile *= pixels.ramp(y, centre_y - 0.95 * radius, centre_y - 0.1 * radius)
  return (0.5 * size) * profile


def bone_attenuation(chunk, x, y, dx, tx, ty, signed_distance, below_dome,
                     body_depth):
  """Attenuation of ribs, clavicles, scapulae, humeral heads and spine, for
  the images of a render chunk."""
  p = chunk.params
  pixel = chunk.pixel
  apex_y, sx, sy = p['apex_y'], p['sx'], p['sy']
  ap = p['view'] > 0.5
  lung_half = p['lung_half_width']

  # Posterior ribs: arcs rising from the spine, then falling along the
  # lateral chest wall, spacing widening downwards; flatter in children.
  lateral = np.abs(tx - MIDLINE_T) * (1 / 0.38)
  curve = lateral * (1.25 * lateral - 0.5)
  curve *= p['rib_slope']
  level = ty - curve
  level -= 0.085
  level *= 1 / 0.62
  np.maximum(level, 0, out=level)
  phase = level * (10.8 - 1.8 * level)    # rib spacing widens downwards
  rib = pixels.ramp(np.cos(2 * np.pi * phase), -0.1, 0.7)
  cage = pixels.ramp(-signed_distance, -0.03, -0.005)
  cage *= pixels.ramp(-below_dome, -0.1, -0.02)
  cage *= pixels.ramp(phase, 0.3, 0.6)
  ribs = rib * cage
  ribs *= 0.08 + 0.04 * lateral
  # Anterior ribs: fainter, falling medially; lateral half only.
  phase = 6.5 * np.clip((ty + 0.2 * (1 - lateral) - 0.3) * (1 / 0.6), 0, 1.05)
  rib = pixels.ramp(np.cos(2 * np.pi * phase), 0.2, 0.9)
  rib *= cage
  rib *= pixels.ramp(lateral, 0.3, 0.6)
  ribs += 0.08 * rib
  del rib, phase, cage, level, curve, lateral

  # Clavicles: sloping up laterally on PA; higher and flatter on AP.
  reach = lung_half + 0.08
  medial_y = apex_y + np.where(ap, 0.03, 0.085)
  lateral_y = apex_y + np.where(ap, -0.005, -0.01)
  along = np.clip((dx - 0.03) / reach, 0, 1)
  clavicle_y = medial_y + (lateral_y - medial_y) * along
  clavicle_y -= 0.02 * np.sin(np.pi * along)
  clavicle = pixels.edge(
      0.016 + 0.004 * (1 - along) - np.abs(y - clavicle_y), pixel)
  clavicle *= pixels.ramp(dx, 0.025, 0.04)
  clavicle *= pixels.ramp(reach + 0.03 - dx, 0, 0.02)
  del along, clavicle_y

  # Scapulae: lateral to the lungs on PA (shoulders rolled forward), over the
  # upper lateral lung fields on AP.
  scapula_x = np.where(ap, lung_half - 0.05, lung_half + 0.06)
  scapula_y = apex_y + 0.16
  su = (dx - scapula_x) * 0.978 + (y - scapula_y) * 0.208
  sv = (y - scapula_y) * 0.978 - (dx - scapula_x) * 0.208
  scapula_r = np.sqrt((su * (1 / 0.075)) ** 2 + (sv * (1 / 0.15)) ** 2)
  scapula = pixels.edge((1 - scapula_r) * 0.075, pixel)
  scapula *= 0.55 + 0.45 * pixels.ramp(scapula_r, 0.7, 0.97)   # cortical rim
  del su, sv, scapula_r

  # Humeral heads at the shoulders.
  head_distance = np.sqrt((dx - p['humerus_x']) ** 2
                          + (y - p['humerus_y']) ** 2)
  head = np.sqrt(np.clip(1 - (head_distance * (1 / 0.06)) ** 2, 0, 1))
  del head_distance

  # Spine: vertebral bodies with darker disc spaces and brighter pedicles.
  spine_half = 0.03 * sx / 0.86
  spine = pixels.edge(spine_half - dx, pixel)
  discs = pixels.ramp(np.cos(2 * np.pi * (y - apex_y) / (0.05 * sy)), 0.6, 1.0)
  spine *= 1 - 0.4 * discs
  spine *= 0.6 + 0.4 * pixels.ramp(dx, 0.45 * spine_half, 0.8 * spine_half)
  spine *= body_depth

  bones = 0.42 * clavicle
  bones += ribs
  bones += 0.09 * scapula
  bones += 0.3 * head
  bones += 0.13 * spine
  bones *= p['bone_density']
  return bones
