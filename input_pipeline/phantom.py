"""Procedural phantom chest X-rays with known generating factors.

The project's embedded default data set (the role dSprites plays for
disentanglement research): frontal chest radiographs rendered with numpy from a
seed, with every generating factor known, so training, defect correction,
per-finding AUC, latent interpolation, explainability and bias audits can run
without downloading real data.

An image is the display of a projected attenuation map: soft tissue of the body
outline, minus the air of two lungs whose shape follows the population lung map
of 517 real masks (`input_pipeline.assets.lung_prior`), plus heart, mediastinum,
spine, ribs, clavicles, scapulae, diaphragm domes, and the signatures of the 14
ChestX-ray14 findings (or, in the 'covid3' variant, COVID-19 ground glass and
lobar bacterial pneumonia). Patient factors (sex, age, view AP/PA) change the
anatomy visibly; exposure, tilt, shift and noise are nuisances.

Coordinates: the image is the unit square, x to the right, y down. Radiographic
convention: the patient's right is the image's left. 'Patient' coordinates
undo the patient's small tilt and shift; 'template' coordinates are those of
the lung prior (lungs roughly in x 0.12..0.88, y 0.14..0.70), mapped per
patient by a scale (thorax width and lung height) and an apex height.

Use it without TFDS:

  factors = phantom.sample_factors(np.random.default_rng(0))
  image, lung_mask, all_factors = phantom.render_factors(factors, 256)
  same_patient_ap = phantom.with_factors(factors, view=1)

Preview: python -m input_pipeline.phantom --out DIR --num N --size S [--seed K]
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import os
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from input_pipeline import assets
from input_pipeline import labels as labels_lib

VARIANTS = ('chestxray14', 'covid3')
SPLITS = ('train', 'validation', 'test')
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048
# Every finding is present in at least this fraction of images (the real
# prevalence where higher): Hernia is 0.2 % in ChestX-ray14, too rare to learn
# or to measure an AUC on a 2,000-image validation split.
DEFAULT_PREVALENCE_FLOOR = 0.05
# Severities are drawn in [min_severity, 1]: a floor keeps positives visible.
DEFAULT_MIN_SEVERITY = 0.6
# Probability of the support device (ECG leads and a central line) when the
# confounder is off; `confounder_strength` moves it towards 'iff the target'.
SUPPORT_DEVICE_BASE_RATE = 0.2
CONFOUNDER_TARGETS = {'chestxray14': 'Pneumothorax', 'covid3': 'COVID-19'}

# Signatures the renderer draws: the 14 findings, then COVID-19 ground glass.
GROUND_GLASS = 'Ground_Glass'
SIGNS = labels_lib.FINDINGS + (GROUND_GLASS,)
_SIGN = {name: index for index, name in enumerate(SIGNS)}
# Side of a signature (the patient's side; right = image left).
SIDE_NONE, SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH = 0, 1, 2, 3
# Sides a finding may take, with their probabilities.
_SIDE_CHOICES = {
    'Atelectasis': ((SIDE_RIGHT, SIDE_LEFT), (0.55, 0.45)),
    'Cardiomegaly': ((SIDE_NONE,), (1.0,)),
    'Consolidation': ((SIDE_RIGHT, SIDE_LEFT), (0.6, 0.4)),
    'Edema': ((SIDE_BOTH,), (1.0,)),
    'Effusion': ((SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH), (0.4, 0.3, 0.3)),
    'Emphysema': ((SIDE_BOTH,), (1.0,)),
    'Fibrosis': ((SIDE_BOTH,), (1.0,)),
    'Hernia': ((SIDE_NONE,), (1.0,)),
    'Infiltration': ((SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH), (0.25, 0.2, 0.55)),
    'Mass': ((SIDE_RIGHT, SIDE_LEFT), (0.55, 0.45)),
    'Nodule': ((SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH), (0.4, 0.35, 0.25)),
    'Pleural_Thickening': ((SIDE_RIGHT, SIDE_LEFT, SIDE_BOTH), (0.4, 0.3, 0.3)),
    'Pneumonia': ((SIDE_RIGHT, SIDE_LEFT), (0.55, 0.45)),
    'Pneumothorax': ((SIDE_RIGHT, SIDE_LEFT), (0.55, 0.45)),
    GROUND_GLASS: ((SIDE_BOTH,), (1.0,)),
}

# Scalar factors, in the order of `factors.csv` and of the TFDS features.
SCALAR_FACTORS = (
    'sex', 'age', 'view', 'body_size', 'inspiration', 'heart_size',
    'breast_size', 'exposure', 'rotation_degrees', 'shift_x', 'shift_y',
    'noise_level', 'support_device', 'texture_seed')
# Factors computed from the others when an image is rendered.
DERIVED_FACTORS = ('thorax_width', 'heart_width', 'cardiothoracic_ratio',
                   'bone_density')

# Template lung map geometry (template units: fractions of the prior's grid).
_TEMPLATE_GRID = 128
_MIDLINE_T = 0.49            # centre of the mediastinal gap in the prior
_APEX_T = 0.14               # top of the lungs in the prior
_HILUM_T = ((0.375, 0.43), (0.615, 0.45))       # right, left
_DOME_CENTRE_T = (0.30, 0.68)                   # right, left
_DOME_HALF_WIDTH_T = 0.19
_FISSURE_T = 0.43            # horizontal fissure of the right lung
_AP_MAGNIFICATION = 1.1      # heart magnification of an AP film
_CHUNK_PIXELS = 2 ** 18      # pixels per rendered chunk (memory bound)
_FINE_FACTOR = 4             # template refinement for nearest lookups


# ---------------------------------------------------------------------------
# Statistics and template
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _label_distribution(prevalence_floor: float):
  """Label-set probabilities and the per-finding top-up to reach the floor."""
  stats = assets.chestxray14_stats()
  label_sets = [tuple(combo.split('|')) if combo else ()
                for combo, _ in stats['label_sets']]
  counts = np.asarray([count for _, count in stats['label_sets']], np.float64)
  probabilities = counts / counts.sum()
  multi_hot = np.zeros((len(label_sets), len(labels_lib.FINDINGS)), np.float64)
  for row, label_set in enumerate(label_sets):
    for finding in label_set:
      multi_hot[row, labels_lib.FINDINGS.index(finding)] = 1.0
  prevalence = probabilities @ multi_hot
  # Adding finding f independently with probability q to images without it
  # lifts its prevalence p to p + (1 - p) q = floor; co-occurrence is kept.
  top_up = np.where(prevalence < prevalence_floor,
                    (prevalence_floor - prevalence) / (1.0 - prevalence), 0.0)
  return multi_hot.astype(bool), np.cumsum(probabilities), top_up


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
  middle = int(round(_MIDLINE_T * grid))
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


def _sample_template(tx: np.ndarray, ty: np.ndarray,
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


# ---------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  return SPLITS.index(split)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of one example: a pure function of (seed, split, index)."""
  return np.random.default_rng([int(seed), split_id(split), int(index)])


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')


def sample_factors(
    rng: np.random.Generator | int,
    variant: str = 'chestxray14',
    *,
    prevalence_floor: float = DEFAULT_PREVALENCE_FLOOR,
    min_severity: float = DEFAULT_MIN_SEVERITY,
    confounder_strength: float = 0.0,
    **overrides: Any,
) -> dict[str, Any]:
  """Draws the generating factors of one patient.

  Sex, view and age follow the real ChestX-ray14 proportions and age
  distribution, independent of the findings. In 'chestxray14', the set of
  findings is a whole real label combination (keeping real co-occurrence),
  then each finding rarer than `prevalence_floor` is added independently to
  lift it to the floor. In 'covid3', the class is uniform.

  Args:
    rng: generator, or an int seed.
    variant: 'chestxray14' (14 findings + No Finding) or 'covid3'.
    prevalence_floor: minimum prevalence of every finding, in [0, 0.5].
    min_severity: lowest severity of a present finding, in (0, 1].
    confounder_strength: in [0, 1]; 0 = the support device is independent of
      everything, 1 = present exactly when the variant's confounder target
      (CONFOUNDER_TARGETS) is.
    **overrides: factors to set instead of drawing (after drawing all, so the
      other factors do not change), e.g. view=1.

  Returns:
    A dict: the SCALAR_FACTORS, 'sign_severity' (len(SIGNS),) float32,
    'sign_side' (len(SIGNS),) uint8, 'variant', and 'labels' (15 multi-hot
    uint8, chestxray14) or 'label' (int index into COVID3_CLASSES, covid3).
  """
  _check_variant(variant)
  if not 0.0 <= prevalence_floor <= 0.5:
    raise ValueError(
        f'prevalence_floor must be in [0, 0.5], got {prevalence_floor}')
  if not 0.0 < min_severity <= 1.0:
    raise ValueError(f'min_severity must be in (0, 1], got {min_severity}')
  if not 0.0 <= confounder_strength <= 1.0:
    raise ValueError(
        f'confounder_strength must be in [0, 1], got {confounder_strength}')
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  stats = assets.chestxray14_stats()
  # A fixed number of draws in a fixed order: each factor keeps its value
  # whatever the others are.
  uniform = rng.random(12)
  normal = rng.standard_normal(2)
  severity_draws = min_severity + (1 - min_severity) * rng.random(len(SIGNS))
  side_draws = rng.random(len(SIGNS))
  top_up_draws = rng.random(len(labels_lib.FINDINGS))
  factors: dict[str, Any] = {'variant': variant}
  factors['sex'] = int(uniform[0] < stats['sex']['F'])
  factors['age'] = float(np.interp(uniform[1], np.linspace(0, 1, 101),
                                   stats['age_quantiles']))
  factors['view'] = int(uniform[2] < stats['view']['AP'])
  factors['body_size'] = float(np.clip(1 + 0.04 * normal[0], 0.9, 1.1))
  # AP films are mostly portable and supine, with a shallower breath.
  factors['inspiration'] = float(np.clip(
      2 * uniform[3] - 1 - 0.4 * factors['view'], -1.0, 1.0))
  factors['heart_size'] = float(0.36 + 0.08 * uniform[4])
  factors['breast_size'] = float(0.6 + 0.4 * uniform[5])
  factors['exposure'] = float(np.clip(0.4 * normal[1], -1.0, 1.0))
  factors['rotation_degrees'] = float(8 * uniform[6] - 4)
  factors['shift_x'] = float(0.05 * uniform[7] - 0.025)
  factors['shift_y'] = float(0.04 * uniform[8] - 0.02)
  factors['noise_level'] = float(0.008 + 0.014 * uniform[9])
  factors['texture_seed'] = int(rng.integers(0, 2 ** 62))

  present = np.zeros(len(SIGNS), bool)
  if variant == 'chestxray14':
    label_sets, cumulative, top_up = _label_distribution(
        float(prevalence_floor))
    row = min(int(np.searchsorted(cumulative, uniform[11], side='right')),
              len(label_sets) - 1)
    present[:len(labels_lib.FINDINGS)] = label_sets[row] | (
        top_up_draws < top_up)
    target_present = bool(present[_SIGN[CONFOUNDER_TARGETS[variant]]])
  else:
    label = min(int(uniform[11] * len(labels_lib.COVID3_CLASSES)),
                len(labels_lib.COVID3_CLASSES) - 1)
    if label < 2:   # COVID-19: ground glass; bacterial: lobar consolidation
      present[_SIGN[(GROUND_GLASS, 'Consolidation')[label]]] = True
    factors['label'] = label
    target_present = (labels_lib.COVID3_CLASSES[label]
                      == CONFOUNDER_TARGETS[variant])
  side_choices, side_cumulative = _side_tables()
  side_index = (side_draws[:, None] >= side_cumulative[:, :-1]).sum(axis=1)
  sides = side_choices[np.arange(len(SIGNS)), side_index]
  factors['sign_severity'] = np.where(present, severity_draws, 0).astype(
      np.float32)
  factors['sign_side'] = np.where(present, sides, SIDE_NONE).astype(np.uint8)
  if variant == 'chestxray14':
    factors['labels'] = labels_from_severity(factors['sign_severity'])

  base = SUPPORT_DEVICE_BASE_RATE
  device_probability = (base + confounder_strength * (1 - base)
                        if target_present else base * (1 - confounder_strength))
  factors['support_device'] = int(uniform[10] < device_probability)
  return with_factors(factors, **overrides) if overrides else factors


@functools.lru_cache(maxsize=1)
def _side_tables():
  """Side choices (SIGNS, 3) and their cumulative probabilities (SIGNS, 3)."""
  choices = np.zeros((len(SIGNS), 3), np.uint8)
  cumulative = np.ones((len(SIGNS), 3))
  for row, name in enumerate(SIGNS):
    options, weights = _SIDE_CHOICES[name]
    choices[row, :len(options)] = options
    cumulative[row, :len(options)] = np.cumsum(weights)
  return choices, cumulative


def labels_from_severity(sign_severity: np.ndarray) -> np.ndarray:
  """15-long multi-hot in labels.LABELS order; No Finding iff no finding."""
  findings = (np.asarray(sign_severity)[:len(labels_lib.FINDINGS)] > 0)
  return np.append(findings, not findings.any()).astype(np.uint8)


def with_factors(factors: dict[str, Any], **changes: Any) -> dict[str, Any]:
  """A copy of `factors` with some changed, e.g. the same patient seen AP."""
  unknown = set(changes) - set(factors) - {'labels', 'label'}
  if unknown:
    raise ValueError(f'Unknown factors {sorted(unknown)}; known: '
                     f'{sorted(factors)}')
  changed = copy.deepcopy(factors)
  changed.update(changes)
  if 'sign_severity' in changes and changed['variant'] == 'chestxray14':
    changed['labels'] = labels_from_severity(changed['sign_severity'])
  return changed


def with_finding(factors: dict[str, Any], name: str, severity: float,
                 side: int | None = None) -> dict[str, Any]:
  """A copy with signature `name` (a finding, or GROUND_GLASS) set.

  severity 0 removes it; side defaults to the finding's most common side.
  Labels follow (chestxray14); in covid3 the caller also sets 'label'.
  """
  if name not in _SIGN:
    raise ValueError(f'Unknown finding {name!r}; known: {SIGNS}')
  if not 0.0 <= severity <= 1.0:
    raise ValueError(f'severity must be in [0, 1], got {severity}')
  sign_severity = np.array(factors['sign_severity'], np.float32)
  sign_side = np.array(factors['sign_side'], np.uint8)
  sign_severity[_SIGN[name]] = severity
  if side is None:
    choices, weights = _SIDE_CHOICES[name]
    side = choices[int(np.argmax(weights))]
  sign_side[_SIGN[name]] = side if severity > 0 else SIDE_NONE
  return with_factors(factors, sign_severity=sign_severity,
                      sign_side=sign_side)


def example_factors(seed: int, split: str, index: int,
                    variant: str = 'chestxray14', **kwargs) -> dict[str, Any]:
  """Factors of example `index` of `split` of the data set drawn with `seed`."""
  return sample_factors(example_rng(seed, split, index), variant, **kwargs)


def bone_density(age: float) -> float:
  """Relative bone mineral density: child 0.85, peak 1.0 at 25-35, 0.6 at 90."""
  if age < 25:
    return 0.85 + 0.15 * age / 25
  return 1.0 - 0.4 * min(max(age - 35, 0.0), 55.0) / 55.0


# ---------------------------------------------------------------------------
# Geometry of one patient (python scalars)
# ---------------------------------------------------------------------------


def _geometry(factors: dict[str, Any]) -> dict[str, float]:
  """Per-patient shape parameters, from the factors alone."""
  _, template_width, _ = _lung_template()
  severity = np.asarray(factors['sign_severity'], np.float32)
  side = np.asarray(factors['sign_side'])
  def sev(name):
    return float(severity[_SIGN[name]])
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
  atelectasis_side = side[_SIGN['Atelectasis']]
  for name, top, own_sides in (('right', 0.675, (SIDE_RIGHT, SIDE_BOTH)),
                               ('left', 0.70, (SIDE_LEFT, SIDE_BOTH))):
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
  left_dome_y = _template_to_y(g, g['dome_top_left'])
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


def _template_to_y(g: dict[str, float], ty: float) -> float:
  return g['apex_y'] + (ty - _APEX_T) * g['sy']


def _template_to_x(g: dict[str, float], tx: float) -> float:
  return 0.5 + (tx - _MIDLINE_T) * g['sx']


def derived_factors(factors: dict[str, Any]) -> dict[str, float]:
  """Factors that follow from the others (as rendered): widths, CTR, bones."""
  g = _geometry(factors)
  return {name: float(g[name]) for name in DERIVED_FACTORS}


# ---------------------------------------------------------------------------
# Per-image random details (lesion placement), from the texture seed
# ---------------------------------------------------------------------------


def _detail_rng(factors: dict[str, Any], stream: int) -> np.random.Generator:
  # One stream per signature: adding a finding moves nothing else.
  return np.random.default_rng([int(factors['texture_seed']), 1 + stream])


def _lesion_centres(rng, g, side_code, count, margin, max_ty=None):
  """`count` lesion centres (patient coords) in the visible lungs, away from
  the heart by `margin` and above the domes."""
  _, _, candidates = _lung_template()
  if max_ty is None:
    max_ty = min(0.64, g['dome_top_right'] - 0.03, g['dome_top_left'] - 0.03)
  if side_code == SIDE_RIGHT:
    candidates = candidates[candidates[:, 0] < _MIDLINE_T]
  elif side_code == SIDE_LEFT:
    candidates = candidates[candidates[:, 0] >= _MIDLINE_T]
  candidates = candidates[candidates[:, 1] < max_ty]
  picks = candidates[rng.integers(len(candidates), size=48)]
  px = _template_to_x(g, picks[:, 0])
  py = _template_to_y(g, picks[:, 1])
  heart = (((px - g['heart_x'] - 0.3 * (py - g['heart_y']))
            / (g['heart_a'] + margin)) ** 2
           + ((py - g['heart_y']) / (g['heart_b'] + margin)) ** 2)
  ok = heart > 1.0
  if ok.sum() >= count:
    px, py = px[ok], py[ok]
  return px[:count], py[:count]


# ---------------------------------------------------------------------------
# Pixel helpers
# ---------------------------------------------------------------------------


def _ramp(value, start, stop):
  """0 at `start`, 1 at `stop`, linear in between (either order)."""
  out = np.subtract(value, start, dtype=np.float32)
  out *= np.float32(1.0 / (stop - start)) if np.isscalar(stop) and np.isscalar(
      start) else 1.0 / (stop - start)
  return np.clip(out, 0.0, 1.0, out=out)


def _edge(signed, pixel):
  """Anti-aliased inside indicator of `signed` > 0 (a distance, image units)."""
  return _ramp(signed, -0.5 * pixel, 0.5 * pixel)


def _upsample_matrix(size: int, coarse: int) -> np.ndarray:
  """(size, coarse) linear interpolation from a coarse grid to pixels."""
  positions = (np.arange(size) + 0.5) / size * (coarse - 1)
  low = np.clip(np.floor(positions).astype(int), 0, coarse - 2)
  weight = positions - low
  matrix = np.zeros((size, coarse), np.float32)
  matrix[np.arange(size), low] = 1 - weight
  matrix[np.arange(size), low + 1] = weight
  return matrix


def _column(values) -> np.ndarray:
  return np.asarray(values, np.float32).reshape(-1, 1, 1)


def _segment_distance(x, y, ax, ay, bx, by):
  """Distance to segments (a, b); endpoints broadcast against x, y."""
  dx, dy = bx - ax, by - ay
  t = ((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-12)
  np.clip(t, 0, 1, out=t)
  return np.sqrt((x - ax - t * dx) ** 2 + (y - ay - t * dy) ** 2)


def _smooth_normalised(white, sigma_pixels):
  field = ndimage.gaussian_filter(white, (0, sigma_pixels, sigma_pixels),
                                  mode='wrap', truncate=3.0)
  return field / (field.std(axis=(1, 2), keepdims=True) + 1e-6)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def check_image_size(image_size: int) -> None:
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
  """Renders images from factors (see sample_factors); vectorised.

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
  return images[0], masks[0], {**factors, **derived_factors(factors)}


def render(rng: np.random.Generator | int, image_size: int = 64,
           variant: str = 'chestxray14', **sample_kwargs):
  """Samples factors with `rng` (or an int seed) and renders them."""
  return render_factors(sample_factors(rng, variant, **sample_kwargs),
                        image_size)


def render_examples(seed: int, split: str, indices: Sequence[int],
                    image_size: int, variant: str = 'chestxray14',
                    **sample_kwargs):
  """Examples `indices` of a data set: (images, masks, factors list).

  Each example is a pure function of (seed, split, index, settings), so any
  subset, in any order or batching, gives the same bytes.
  """
  factors_list = [example_factors(seed, split, i, variant, **sample_kwargs)
                  for i in indices]
  images, masks = render_batch(factors_list, image_size)
  factors_list = [{**f, **derived_factors(f)} for f in factors_list]
  return images, masks, factors_list


class _Chunk:
  """Per-image parameters of a chunk of images, as (n, 1, 1) columns."""

  def __init__(self, factors_list, image_size):
    self.n = len(factors_list)
    self.size = image_size
    self.pixel = 1.0 / image_size
    self.factors = factors_list
    self.geometry = [_geometry(f) for f in factors_list]
    self.params = {key: _column([g[key] for g in self.geometry])
                   for key in self.geometry[0]}
    for key in SCALAR_FACTORS[:-1]:
      self.params[key] = _column([f[key] for f in factors_list])
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
    self.severity = _column(chunk.severity[index, stream]) if stream < len(
        SIGNS) else None
    self.side_codes = (chunk.side[index, stream] if stream < len(SIGNS)
                       else None)
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
    for i in self.index:
      factors = self.chunk.factors[i]
      stream = self.stream
      rows.append(planner(
          _detail_rng(factors, stream), self.chunk.geometry[i],
          float(self.chunk.severity[i, stream]) if stream < len(SIGNS) else 0.,
          int(self.chunk.side[i, stream]) if stream < len(SIGNS) else 0,
          factors))
    return {key: np.asarray([row[key] for row in rows], np.float32)
            for key in rows[0]}

  def side_mask(self):
    """1 on the affected side(s) (template frame: right = image left)."""
    codes = _column(self.side_codes)
    right = self.right
    return np.where(codes == SIDE_BOTH, True,
                    np.where(codes == SIDE_RIGHT, right, ~right)).astype(
                        np.float32)


def _noise_fields(chunk: _Chunk):
  """Per-image noise from each texture seed: quantum, texture, low-frequency."""
  size = chunk.size
  quantum = np.empty((chunk.n, size, size), np.float32)
  texture = np.empty_like(quantum)
  coarse = np.empty((chunk.n, 2, 7, 7), np.float32)
  for i, factors in enumerate(chunk.factors):
    rng = _detail_rng(factors, len(SIGNS) + 1)
    # Uniform white noise (cheaper than normal; smoothing makes it Gaussian).
    quantum[i], texture[i] = rng.random((2, size, size), np.float32)
    coarse[i] = rng.standard_normal((2, 7, 7), np.float32)
  quantum -= 0.5
  quantum *= np.sqrt(12.0)      # unit variance
  texture -= 0.5
  up = _upsample_matrix(size, 7)
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
  upper = 1 - _ramp(y, apex_y, apex_y + 0.35 * sy)
  tx = _MIDLINE_T + (x - 0.5) / (sx * (1 + 0.09 * (p['roundness'] - 0.45)
                                       * upper))
  ty = _APEX_T + (y - apex_y) / sy
  del upper
  signed_distance = _sample_template(tx, ty, size)
  signed_distance *= 0.5 * (sx + sy)
  thorax = _edge(-signed_distance, pixel)
  right = tx < _MIDLINE_T
  dome_ty = np.where(right, p['dome_top_right'], p['dome_top_left'])
  lateral = (tx - np.where(right, _DOME_CENTRE_T[0], _DOME_CENTRE_T[1])) / (
      _DOME_HALF_WIDTH_T)
  dome_ty += np.where(right, p['dome_height_right'],
                      p['dome_height_left']) * lateral * lateral
  below_dome = (ty - dome_ty) * sy         # > 0 below the diaphragm
  del dome_ty, lateral
  above_dome = _edge(-below_dome, pixel)

  # Heart: a sheared ellipse (apex down and to the patient's left).
  hy = y - p['heart_y']
  hx = (x - p['heart_x'] - 0.3 * hy) / p['heart_a']
  heart_radius = np.sqrt(hx * hx + (hy / p['heart_b']) ** 2)
  heart = _edge((1 - heart_radius) * p['heart_b'], pixel)
  del hx, hy, heart_radius

  lung_field = thorax * above_dome * (1 - heart)
  lung_depth = np.sqrt(_ramp(-signed_distance, 0.0, 0.07))
  lung_depth *= _ramp(-below_dome, 0.0, 0.035)
  # Lung markings: vessels from the hila, fading to the periphery.
  markings = _smooth_normalised(texture, max(0.6, 0.008 * size))
  distance_hila = np.minimum(
      (x - 0.5 - (_HILUM_T[0][0] - _MIDLINE_T) * sx) ** 2,
      (x - 0.5 - (_HILUM_T[1][0] - _MIDLINE_T) * sx) ** 2)
  distance_hila += (y - apex_y - (0.44 - _APEX_T) * sy) ** 2
  vessels = _ramp(markings, 0.8, 2.4) * (0.25 + np.exp(-distance_hila / 0.02))
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
  rise = _ramp(y, shoulder_y, shoulder_y + 0.15)
  rise *= 2 - rise    # the shoulder line slopes down from the neck
  half_width = neck + (shoulder - neck) * rise
  half_width += (p['chest_half_width'] - shoulder) * _ramp(
      y, apex + 0.12, apex + 0.4)
  half_width -= 0.03 * _ramp(y, 0.8, 1.0)
  body_depth = np.clip(1 - (dx / half_width) ** 2, 0, 1)
  np.sqrt(body_depth, out=body_depth)
  del rise
  soft = 1.32 * body_depth
  female = np.nonzero(chunk.params['sex'][:, 0, 0] > 0.5)[0]
  if len(female):
    soft[female] += _breasts(chunk, female, dx[female], y[female]) * _ramp(
        half_width[female] + 0.03 - dx[female], 0.0, 0.03)
  del half_width
  soft += 0.15 * heart * thorax * above_dome
  soft += 0.22 * _ramp(below_dome, 0.0, 0.02) * body_depth
  # Gastric bubble under the left dome.
  left_dome_y = p['gastric_y']
  bubble = 1 - ((x - 0.5 - 0.55 * p['lung_half_width']) / 0.045) ** 2 - (
      (y - left_dome_y) / 0.028) ** 2
  bubble = _ramp(bubble, 0, 0.3) * (y < left_dome_y + 0.012)
  soft -= 0.3 * bubble
  # Trachea and main bronchi (air), faint.
  carina_y = apex_y + 0.22 * sy
  airway = _edge(0.017 - dx, pixel) * (y < carina_y)
  below_carina = y - carina_y
  bronchus = np.abs(dx - 0.8 * below_carina) * 0.78   # main bronchi, 38 deg
  bronchus = _edge(0.013 - bronchus, pixel)
  bronchus *= (below_carina > 0) & (below_carina < 0.07)
  np.maximum(airway, bronchus, out=airway)
  del below_carina, bronchus
  soft -= 0.18 * airway * body_depth
  del bubble, airway

  bones = _bones(chunk, x, y, dx, tx, ty, signed_distance, below_dome,
                 body_depth)
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


def _breasts(chunk, index, dx, y):
  """Breast soft-tissue shadows over the lower lateral lung fields."""
  p = {key: value[index] for key, value in chunk.params.items()}
  size = p['breast_size']
  lung_half = p['lung_half_width']
  radius = (0.13 + 0.07 * size) * lung_half / 0.33
  centre_x = 0.62 * lung_half + 0.03
  centre_y = p['breast_y'] + 0.03 * size
  r2 = ((dx - centre_x) ** 2 + (y - centre_y) ** 2) / (radius * radius)
  profile = np.sqrt(np.clip(1 - r2, 0, 1))
  profile *= _ramp(y, centre_y - 0.95 * radius, centre_y - 0.1 * radius)
  return (0.5 * size) * profile


def _bones(chunk, x, y, dx, tx, ty, signed_distance, below_dome, body_depth):
  """Attenuation of ribs, clavicles, scapulae, humeral heads and spine."""
  p = chunk.params
  pixel = chunk.pixel
  apex_y, sx, sy = p['apex_y'], p['sx'], p['sy']
  ap = p['view'] > 0.5
  lung_half = p['lung_half_width']

  # Posterior ribs: arcs rising from the spine, then falling along the
  # lateral chest wall, spacing widening downwards; flatter in children.
  lateral = np.abs(tx - _MIDLINE_T) * (1 / 0.38)
  curve = lateral * (1.25 * lateral - 0.5)
  curve *= p['rib_slope']
  level = ty - curve
  level -= 0.085
  level *= 1 / 0.62
  np.maximum(level, 0, out=level)
  phase = level * (10.8 - 1.8 * level)    # rib spacing widens downwards
  rib = _ramp(np.cos(2 * np.pi * phase), -0.1, 0.7)
  cage = _ramp(-signed_distance, -0.03, -0.005)
  cage *= _ramp(-below_dome, -0.1, -0.02)
  cage *= _ramp(phase, 0.3, 0.6)
  ribs = rib * cage
  ribs *= 0.08 + 0.04 * lateral
  # Anterior ribs: fainter, falling medially; lateral half only.
  phase = 6.5 * np.clip((ty + 0.2 * (1 - lateral) - 0.3) * (1 / 0.6), 0, 1.05)
  rib = _ramp(np.cos(2 * np.pi * phase), 0.2, 0.9)
  rib *= cage
  rib *= _ramp(lateral, 0.3, 0.6)
  ribs += 0.08 * rib
  del rib, phase, cage, level, curve, lateral

  # Clavicles: sloping up laterally on PA; higher and flatter on AP.
  reach = lung_half + 0.08
  medial_y = apex_y + np.where(ap, 0.03, 0.085)
  lateral_y = apex_y + np.where(ap, -0.005, -0.01)
  along = np.clip((dx - 0.03) / reach, 0, 1)
  clavicle_y = medial_y + (lateral_y - medial_y) * along
  clavicle_y -= 0.02 * np.sin(np.pi * along)
  clavicle = _edge(0.016 + 0.004 * (1 - along) - np.abs(y - clavicle_y), pixel)
  clavicle *= _ramp(dx, 0.025, 0.04)
  clavicle *= _ramp(reach + 0.03 - dx, 0, 0.02)
  del along, clavicle_y

  # Scapulae: lateral to the lungs on PA (shoulders rolled forward), over the
  # upper lateral lung fields on AP.
  scapula_x = np.where(ap, lung_half - 0.05, lung_half + 0.06)
  scapula_y = apex_y + 0.16
  su = (dx - scapula_x) * 0.978 + (y - scapula_y) * 0.208
  sv = (y - scapula_y) * 0.978 - (dx - scapula_x) * 0.208
  scapula_r = np.sqrt((su * (1 / 0.075)) ** 2 + (sv * (1 / 0.15)) ** 2)
  scapula = _edge((1 - scapula_r) * 0.075, pixel)
  scapula *= 0.55 + 0.45 * _ramp(scapula_r, 0.7, 0.97)   # cortical rim
  del su, sv, scapula_r

  # Humeral heads at the shoulders.
  head_distance = np.sqrt((dx - p['humerus_x']) ** 2
                          + (y - p['humerus_y']) ** 2)
  head = np.sqrt(np.clip(1 - (head_distance * (1 / 0.06)) ** 2, 0, 1))
  del head_distance

  # Spine: vertebral bodies with darker disc spaces and brighter pedicles.
  spine_half = 0.03 * sx / 0.86
  spine = _edge(spine_half - dx, pixel)
  discs = _ramp(np.cos(2 * np.pi * (y - apex_y) / (0.05 * sy)), 0.6, 1.0)
  spine *= 1 - 0.4 * discs
  spine *= 0.6 + 0.4 * _ramp(dx, 0.45 * spine_half, 0.8 * spine_half)
  spine *= body_depth

  bones = 0.42 * clavicle
  bones += ribs
  bones += 0.09 * scapula
  bones += 0.3 * head
  bones += 0.13 * spine
  bones *= p['bone_density']
  return bones


def _draw_findings(chunk, fields, air_scale, vessel_scale, density, finding):
  """Adds each present signature to the attenuation fields, in place.

  Returns the support-device map (the confounder).
  """
  for name, draw in _SIGNATURES.items():
    index = np.nonzero(chunk.severity[:, _SIGN[name]] > 0)[0]
    if not len(index):
      continue
    sub = _Sub(chunk, fields, index, _SIGN[name])
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
    sub = _Sub(chunk, fields, carriers, len(SIGNS))
    device[carriers] = _support_device(sub)
    density += device
  return device


def _bronchograms(sub, hilum_x, hilum_y, aims):
  """Dark air bronchograms: branches from the hilum at angles (n, K)."""
  ddx = sub.x - _column(hilum_x)
  ddy = sub.y - _column(hilum_y)
  width = max(0.007, 0.7 * sub.pixel)
  branches = np.zeros_like(sub.x)
  for k in range(aims.shape[1]):
    cos_a, sin_a = _column(np.cos(aims[:, k])), _column(np.sin(aims[:, k]))
    along = ddx * cos_a + ddy * sin_a
    across = ddx * sin_a - ddy * cos_a
    line = np.exp(-(across * (1 / width)) ** 2) * _ramp(along, 0.04, 0.07)
    np.maximum(branches, line, out=branches)
  return branches


def _hilum(g, code):
  hx_t, hy_t = _HILUM_T[0 if code == SIDE_RIGHT else 1]
  return _template_to_x(g, hx_t), _template_to_y(g, hy_t)


def _sign_cardiomegaly(sub):
  # Drawn by the heart's size (see _geometry); its region is the heart.
  return None, None, sub.heart, None


def _sign_emphysema(sub):
  s = sub.severity
  # Hyperlucent lungs with sparse markings; flat, low domes (geometry).
  return -0.4 * s * sub.lung_field, None, 0.5 * sub.lung_field, 1 - 0.7 * s


def _sign_effusion(sub):
  s = sub.severity
  codes = _column(sub.side_codes)
  right = sub.right
  hemithorax = np.where(codes == SIDE_BOTH, True,
                        np.where(codes == SIDE_RIGHT, right, ~right))
  hemithorax = hemithorax * _ramp(-sub.sd, -0.02, 0.0)
  lateral = np.clip(np.abs(sub.tx - _MIDLINE_T) * (1 / 0.38), 0, 1)
  costophrenic = np.where(right, sub.param('dome_top_right'),
                          sub.param('dome_top_left')) + 0.07
  # Meniscus: the fluid surface climbs the lateral chest wall.
  height = 0.13 + 0.2 * s
  surface = costophrenic - height * (0.45 + 0.55 * lateral * lateral)
  fluid = _ramp(sub.ty - surface, 0.0, 0.035) * hemithorax
  fluid *= _ramp(-sub.below_dome, -0.08, -0.02)
  return 0.97 * fluid, 0.25 * fluid, fluid, None


def _sign_pneumothorax(sub):
  s = sub.severity
  codes = _column(sub.side_codes)
  right = sub.right
  # The lung collapses towards its medial base: a rim of air with no lung
  # markings opens along the lateral wall and the apex.
  collapse = 0.18 + 0.22 * s
  anchor_x = np.where(right, 0.43, 0.56)
  anchor_y = 0.6
  collapsed_sd = _sample_template(
      anchor_x + (sub.tx - anchor_x) / (1 - collapse),
      anchor_y + (sub.ty - anchor_y) / (1 - collapse), sub.chunk.size)
  collapsed_sd *= (1 - collapse) * 0.8
  side = np.where(codes == SIDE_RIGHT, right, ~right).astype(np.float32)
  lung = sub.lung_field * side
  gap = lung * _edge(collapsed_sd, sub.pixel)
  line = np.exp(-(collapsed_sd * (1 / max(0.006, 0.6 * sub.pixel))) ** 2)
  line *= lung
  # Pure air in the rim (thicker air column), denser collapsed lung.
  opacity = -0.45 * gap + 0.3 * (lung - gap)
  return opacity, 0.4 * line, gap, 1 - gap


def _lobe_region(sub, lobes):
  ty, tx, edge = sub.ty, sub.tx, 0.5 * sub.pixel
  lobe = _column(lobes)
  upper_right = _ramp(_FISSURE_T - ty, -edge, edge)          # sharp fissure
  middle_right = (_ramp(ty - _FISSURE_T, -edge, edge)
                  * _ramp(0.6 - ty, 0.0, 0.04) * _ramp(tx, 0.2, 0.28))
  upper_left = _ramp(0.5 - ty, 0.0, 0.05)
  lower = _ramp(ty - 0.5, 0.0, 0.06)
  region = np.where(lobe == 0, upper_right,
                    np.where(lobe == 1, middle_right,
                             np.where(lobe == 2, upper_left, lower)))
  return region * sub.lung_field * sub.side_mask()


# Lobes: 0 right upper, 1 right middle, 2 left upper, 3 lower (either side).
_LOBE_CENTRES_T = {0: (0.3, 0.3), 1: (0.33, 0.52), 2: (0.68, 0.32),
                   3: (None, 0.62)}


def _plan_lobar(rng, g, severity, side, factors):
  del severity
  # Right: upper or middle lobe; left: upper lobe. covid3's bacterial
  # pneumonia may also take a lower lobe.
  choices = [0, 1] if side == SIDE_RIGHT else [2]
  if factors['variant'] == 'covid3':
    choices.append(3)
  lobe = choices[int(rng.integers(len(choices)))]
  hx, hy = _hilum(g, side)
  tx_c, ty_c = _LOBE_CENTRES_T[lobe]
  if tx_c is None:
    tx_c = 0.3 if side == SIDE_RIGHT else 0.68
  aim = np.arctan2(_template_to_y(g, ty_c) - hy, _template_to_x(g, tx_c) - hx)
  return dict(lobe=lobe, hilum_x=hx, hilum_y=hy,
              aims=aim + rng.uniform(-0.5, 0.5, size=3))


def _sign_consolidation(sub):
  s = sub.severity
  plan = sub.plans(_plan_lobar)
  region = _lobe_region(sub, plan['lobe'])
  opacity = (0.72 + 0.25 * s) * region
  opacity *= 0.88 + 0.12 * np.tanh(sub.low0)
  bronchi = _bronchograms(sub, plan['hilum_x'], plan['hilum_y'], plan['aims'])
  opacity *= 1 - 0.35 * bronchi
  return opacity, 0.06 * opacity, region, None


def _plan_pneumonia(rng, g, severity, side, factors):
  del factors
  cx, cy = _lesion_centres(rng, g, side, 1, 0.0)
  cy = np.maximum(cy, _template_to_y(g, 0.42))    # middle / lower zone
  radius = 0.095 + 0.05 * severity
  angles = rng.uniform(0, 2 * np.pi, size=2)
  hx, hy = _hilum(g, side)
  aim = np.arctan2(cy[0] - hy, cx[0] - hx)
  return dict(
      cx=[cx[0], *(cx[0] + 0.9 * radius * np.cos(angles))],
      cy=[cy[0], *(cy[0] + 0.9 * radius * np.sin(angles))],
      radius=[radius, *(radius * rng.uniform(0.4, 0.6, size=2))],
      weight=[1.0, 0.8, 0.8], hilum_x=hx, hilum_y=hy,
      aims=aim + rng.uniform(-0.45, 0.45, size=3))


def _blobs(sub, plan, softness=2.0):
  """Sum of soft round patches from plan 'cx', 'cy', 'radius', 'weight'."""
  total = np.zeros_like(sub.x)
  for k in range(plan['cx'].shape[1]):
    r2 = ((sub.x - _column(plan['cx'][:, k])) ** 2
          + (sub.y - _column(plan['cy'][:, k])) ** 2)
    r2 *= _column(1 / plan['radius'][:, k] ** 2)
    total += _column(plan['weight'][:, k]) * np.exp(-r2 ** (softness / 2))
  return total


def _sign_pneumonia(sub):
  s = sub.severity
  plan = sub.plans(_plan_pneumonia)
  patch = _blobs(sub, plan)
  patch *= 1.3 * (1 + 0.3 * np.tanh(sub.low1))
  np.clip(patch, 0, 1, out=patch)
  patch *= sub.lung_field
  opacity = (0.68 + 0.27 * s) * patch
  bronchi = _bronchograms(sub, plan['hilum_x'], plan['hilum_y'], plan['aims'])
  opacity *= 1 - 0.3 * bronchi
  return opacity, 0.05 * opacity, patch, None


_MAX_PATCHES = 8


def _plan_infiltration(rng, g, severity, side, factors):
  del severity, factors
  count = int(rng.integers(4, _MAX_PATCHES + 1))
  cx, cy = _lesion_centres(rng, g, side, count, -0.02)
  count = len(cx)
  pad = _MAX_PATCHES - count
  return dict(cx=np.pad(cx, (0, pad)), cy=np.pad(cy, (0, pad)),
              radius=np.pad(rng.uniform(0.05, 0.08, size=count), (0, pad),
                            constant_values=1.0),
              weight=np.pad(rng.uniform(0.7, 1.0, size=count), (0, pad)))


def _sign_infiltration(sub):
  s = sub.severity
  patchy = np.clip(_blobs(sub, sub.plans(_plan_infiltration)), 0, 1)
  patchy *= 0.75 + 0.25 * np.tanh(sub.low0)
  patchy *= sub.lung_field
  return (0.58 + 0.3 * s) * patchy, 0.05 * patchy, patchy, None


def _plan_atelectasis(rng, g, severity, side, factors):
  del factors
  hx_t, _ = _HILUM_T[0 if side == SIDE_RIGHT else 1]
  outward = -1 if side == SIDE_RIGHT else 1
  bands = {key: [] for key in ('ax', 'ay', 'bx', 'by', 'weight')}
  count = int(rng.integers(1, 3))
  for k in range(2):
    # Plate-like band in the lower zone, roughly horizontal.
    cx = _template_to_x(g, hx_t + outward * rng.uniform(0.04, 0.12))
    cy = _template_to_y(g, rng.uniform(0.5, 0.56) - 0.07 * k)
    half_length = rng.uniform(0.08, 0.12)
    tilt = rng.uniform(-0.25, 0.25)
    bands['ax'].append(cx - half_length)
    bands['ay'].append(cy - half_length * tilt)
    bands['bx'].append(cx + half_length)
    bands['by'].append(cy + half_length * tilt)
    bands['weight'].append(1.0 if k < count else 0.0)
  bands['thickness'] = 0.011 + 0.006 * severity   # half-thickness
  return bands


def _sign_atelectasis(sub):
  s = sub.severity
  plan = sub.plans(_plan_atelectasis)
  bands = np.zeros_like(sub.x)
  thickness = _column(plan['thickness'])
  for k in range(plan['ax'].shape[1]):
    distance = _segment_distance(
        sub.x, sub.y, *(_column(plan[key][:, k])
                        for key in ('ax', 'ay', 'bx', 'by')))
    band = _ramp(thickness - distance, -sub.pixel, sub.pixel)
    np.maximum(bands, band * _column(plan['weight'][:, k]), out=bands)
  lungs = sub.lung_field * sub.side_mask()
  bands *= lungs
  # Basal wedge of collapsed lung above the raised dome (volume loss).
  wedge = _ramp(-sub.below_dome, -0.045, -0.005) * lungs
  opacity = np.clip(0.9 * bands + (0.35 + 0.3 * s) * wedge, 0, 1)
  return opacity, 0.25 * bands, np.maximum(bands, wedge), None


def _sign_edema(sub):
  s = sub.severity
  haze = np.zeros_like(sub.x)
  for hx_t, hy_t in _HILUM_T:   # bilateral perihilar "bat wing" haze
    np.maximum(haze, np.exp(-(((sub.tx - hx_t) * (1 / 0.17)) ** 2
                              + ((sub.ty - hy_t) * (1 / 0.15)) ** 2)),
               out=haze)
  haze *= 0.85 + 0.15 * np.tanh(sub.low0)
  haze *= sub.lung_field
  return (0.35 + 0.4 * s) * haze, 0.05 * haze, haze, 1 + 0.5 * haze


def _sign_fibrosis(sub):
  s = sub.severity
  # Reticular net: the zero crossings of smooth noise; peripheral and basal,
  # with volume loss (geometry).
  reticulum = _smooth_normalised(sub.texture, max(0.7, 0.007 * sub.chunk.size))
  net = np.exp(-(reticulum * (1 / 0.3)) ** 2)
  periphery = 1 - _ramp(-sub.sd, 0.03, 0.14)
  weight = (0.35 + 0.65 * periphery) * (0.3 + 0.7 * _ramp(sub.ty, 0.3, 0.6))
  weight *= sub.lung_field
  opacity = ((0.25 + 0.25 * s) * net + (0.22 + 0.18 * s)) * weight
  return opacity, 0.1 * net * weight, weight, None


def _sign_pleural_thickening(sub):
  s = sub.severity
  thickness = (0.028 + 0.024 * s) * (1 + 0.25 * np.tanh(sub.low1))
  # A rind inside the lateral chest wall and over the apex.
  where = np.maximum(_ramp(np.abs(sub.tx - _MIDLINE_T), 0.22, 0.3),
                     _ramp(0.3 - sub.ty, 0.0, 0.06))
  rind = _edge(thickness + sub.sd, sub.pixel)
  rind *= where
  rind *= sub.thorax
  rind *= sub.side_mask()
  rind *= _ramp(-sub.below_dome, -0.01, 0.0)
  return 0.97 * rind, 0.4 * rind, rind, None


def _round_lesion_planner(counts, count_weights, radius_fn):
  def plan(rng, g, severity, side, factors):
    del factors
    count = int(rng.choice(counts, p=count_weights))
    maximum = max(counts)
    if side == SIDE_BOTH:
      count = max(count, 2)
      sides = [SIDE_RIGHT, SIDE_LEFT] + [SIDE_RIGHT + int(rng.integers(2))
                                         for _ in range(maximum)]
    else:
      sides = [side] * maximum
    radius = radius_fn(severity)
    rows = dict(cx=[], cy=[], radius=[], weight=[], phase2=[], phase3=[])
    for k in range(maximum):
      cx, cy = _lesion_centres(rng, g, sides[k], 1, radius)
      rows['cx'].append(cx[0])
      rows['cy'].append(cy[0])
      rows['radius'].append(radius * rng.uniform(0.9, 1.1))
      rows['weight'].append(1.0 if k < count else 0.0)
      rows['phase2'].append(rng.uniform(0, 2 * np.pi))
      rows['phase3'].append(rng.uniform(0, 2 * np.pi))
    return rows
  return plan


def _round_lesions(sub, plan, lobulation):
  lesion = np.zeros_like(sub.x)
  for k in range(plan['cx'].shape[1]):
    ddx = sub.x - _column(plan['cx'][:, k])
    ddy = sub.y - _column(plan['cy'][:, k])
    distance = np.sqrt(ddx * ddx + ddy * ddy) + 1e-6
    local = _column(plan['radius'][:, k])
    if lobulation:
      cos_t, sin_t = ddx / distance, ddy / distance
      cos2, sin2 = cos_t * cos_t - sin_t * sin_t, 2 * sin_t * cos_t
      cos3 = 4 * cos_t ** 3 - 3 * cos_t
      sin3 = 3 * sin_t - 4 * sin_t ** 3
      p2, p3 = plan['phase2'][:, k], plan['phase3'][:, k]
      wobble = (0.6 * (cos2 * _column(np.cos(p2)) - sin2 * _column(np.sin(p2)))
                + cos3 * _column(np.cos(p3)) - sin3 * _column(np.sin(p3)))
      local = local * (1 + lobulation * wobble)
    sphere = np.sqrt(np.clip(1 - (distance / local) ** 2, 0, 1))
    sphere *= 0.6
    sphere += 0.4 * _edge(local - distance, sub.pixel)
    np.maximum(lesion, sphere * _column(plan['weight'][:, k]), out=lesion)
  lesion *= sub.thorax
  lesion *= sub.above_dome
  return lesion


# Nodule: ~4.3-4.7 px across at 64 px (radius 0.034..0.037 of the image
# side); mass: 11-13 px.
_plan_nodules = _round_lesion_planner((1, 2, 3), (0.4, 0.4, 0.2),
                                      lambda s: 0.031 + 0.006 * s)
_plan_mass = _round_lesion_planner((1,), (1.0,), lambda s: 0.07 + 0.035 * s)


def _sign_nodule(sub):
  lesion = _round_lesions(sub, sub.plans(_plan_nodules), 0.0)
  return 0.95 * lesion, (0.6 + 0.25 * sub.severity) * lesion, lesion, None


def _sign_mass(sub):
  lesion = _round_lesions(sub, sub.plans(_plan_mass), 0.06)
  return 0.97 * lesion, (0.6 + 0.2 * sub.severity) * lesion, lesion, None


def _sign_hernia(sub):
  s = sub.severity
  # Retrocardiac sac with a gas cap over an air-fluid level.
  radius = 0.085 + 0.04 * s
  cx = 0.53
  cy = sub.param('gastric_y') - 0.125
  distance = np.sqrt((sub.x - cx) ** 2 + (sub.y - cy) ** 2)
  sac = np.sqrt(np.clip(1 - (distance / radius) ** 2, 0, 1))
  sac *= 0.6
  sac += 0.4 * _edge(radius - distance, sub.pixel)
  gas = sac * _edge(cy - sub.y, sub.pixel)     # gas above the fluid level
  return 0.95 * sac * sub.lung_field, 0.5 * sac - 1.0 * gas, sac, None


def _sign_ground_glass(sub):
  s = sub.severity
  # Bilateral, peripheral, basal, patchy haze; vessels stay visible.
  ggo = 1 - _ramp(-sub.sd, 0.04, 0.13)
  ggo *= 0.35 + 0.65 * _ramp(sub.ty, 0.25, 0.55)
  ggo *= 0.45 + 0.55 * _ramp(np.tanh(sub.low0) + 0.6 * np.tanh(sub.low1),
                             -0.6, 0.4)
  ggo *= sub.lung_field
  return (0.3 + 0.35 * s) * ggo, None, ggo, None


def _plan_device(rng, g, severity, side, factors):
  del severity, side, factors
  apex, half = g['apex_y'], g['lung_half_width']
  jitter = rng.uniform(-0.02, 0.02, size=(3, 2))
  ex = np.array([0.5 - 0.75 * half, 0.5 + 0.75 * half, 0.5 + 0.85 * half])
  ey = np.array([apex + 0.06, apex + 0.06, apex + 0.5])
  ex, ey = ex + jitter[:, 0], ey + jitter[:, 1]
  return dict(ex=ex, ey=ey, lx=ex + 0.12 * np.sign(ex - 0.5), ly=ey - 0.2,
              apex=apex)


def _support_device(sub):
  """ECG electrodes with leads and a right-sided central line (very dense)."""
  plan = sub.plans(_plan_device)
  x, y, pixel = sub.x, sub.y, sub.pixel
  width = max(0.006, 0.55 * pixel)
  device = np.zeros_like(x)
  for k in range(3):
    ex, ey = _column(plan['ex'][:, k]), _column(plan['ey'][:, k])
    distance = np.sqrt((x - ex) ** 2 + (y - ey) ** 2)
    np.maximum(device, 0.6 * _edge(0.02 - distance, pixel), out=device)
    np.maximum(device, _edge(width - np.abs(distance - 0.02), pixel),
               out=device)
    lead = _segment_distance(x, y, ex, ey, _column(plan['lx'][:, k]),
                             _column(plan['ly'][:, k]))
    np.maximum(device, 0.8 * _edge(width - lead, pixel), out=device)
  # Central line: from the right neck base down to the cavoatrial junction.
  apex = _column(plan['apex'])
  points = ((0.28, -0.06), (0.41, 0.04), (0.455, 0.14), (0.465, 0.27))
  for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
    distance = _segment_distance(x, y, ax, apex + ay, bx, apex + by)
    np.maximum(device, _edge(width - distance, pixel), out=device)
  return 0.9 * device


_SIGNATURES = {
    'Cardiomegaly': _sign_cardiomegaly,
    'Emphysema': _sign_emphysema,
    'Fibrosis': _sign_fibrosis,
    'Edema': _sign_edema,
    GROUND_GLASS: _sign_ground_glass,
    'Infiltration': _sign_infiltration,
    'Pneumonia': _sign_pneumonia,
    'Consolidation': _sign_consolidation,
    'Atelectasis': _sign_atelectasis,
    'Effusion': _sign_effusion,
    'Pleural_Thickening': _sign_pleural_thickening,
    'Pneumothorax': _sign_pneumothorax,
    'Nodule': _sign_nodule,
    'Mass': _sign_mass,
    'Hernia': _sign_hernia,
}


# ---------------------------------------------------------------------------
# Preview command
# ---------------------------------------------------------------------------


def factor_row(factors: dict[str, Any], name: str) -> dict[str, Any]:
  """One `factors.csv` row: id, sex, age, view, labels, the other factors."""
  row: dict[str, Any] = {
      'id': name,
      'sex': labels_lib.SEXES[factors['sex']],
      'age': round(float(factors['age']), 2),
      'view': labels_lib.VIEWS[factors['view']],
  }
  if factors['variant'] == 'chestxray14':
    row.update({label: int(value) for label, value in
                zip(labels_lib.LABELS, factors['labels'])})
  else:
    row['label'] = labels_lib.COVID3_CLASSES[factors['label']]
  for key in SCALAR_FACTORS[3:] + DERIVED_FACTORS:
    if key in factors:
      value = factors[key]
      row[key] = round(float(value), 5) if isinstance(value, float) else value
  for sign, severity, side in zip(SIGNS, factors['sign_severity'],
                                  factors['sign_side']):
    if factors['variant'] == 'covid3' or sign != GROUND_GLASS:
      row[f'severity_{sign}'] = round(float(severity), 4)
      row[f'side_{sign}'] = int(side)
  return row


def contact_sheet(images: np.ndarray, columns: int | None = None,
                  gap: int = 2) -> np.ndarray:
  """Tiles (N, S, S) uint8 images into one grid image (uint8)."""
  count, size = images.shape[0], images.shape[1]
  columns = columns or int(np.ceil(np.sqrt(count)))
  rows = int(np.ceil(count / columns))
  sheet = np.full((rows * (size + gap) - gap, columns * (size + gap) - gap),
                  255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    sheet[r * (size + gap):r * (size + gap) + size,
          c * (size + gap):c * (size + gap) + size] = image
  return sheet


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m input_pipeline.phantom',
      description='Writes phantom chest X-rays, their lung masks, '
                  'factors.csv and a contact sheet sheet.png.')
  parser.add_argument('--out', required=True, help='Output directory.')
  parser.add_argument('--num', type=int, default=16, help='Number of images.')
  parser.add_argument('--size', type=int, default=256,
                      help=f'Image side in pixels ({MIN_IMAGE_SIZE}..'
                           f'{MAX_IMAGE_SIZE}).')
  parser.add_argument('--seed', type=int, default=0, help='Data set seed.')
  parser.add_argument('--variant', default='chestxray14', choices=VARIANTS)
  parser.add_argument('--confounder_strength', type=float, default=0.0)
  parser.add_argument('--split', default='train', choices=SPLITS)
  args = parser.parse_args(argv)
  if args.num <= 0:
    parser.error(f'--num must be a positive number of images, got {args.num}')
  if not MIN_IMAGE_SIZE <= args.size <= MAX_IMAGE_SIZE:
    parser.error(f'--size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] '
                 f'pixels, got {args.size}')
  if not 0.0 <= args.confounder_strength <= 1.0:
    parser.error('--confounder_strength must be in [0, 1], got '
                 f'{args.confounder_strength}')
  try:
    os.makedirs(args.out, exist_ok=True)
    probe = os.path.join(args.out, '.write_test')
    with open(probe, 'w'):
      pass
    os.remove(probe)
  except OSError as error:
    parser.error(f'--out {args.out!r} is not a writable directory: '
                 f'{error.strerror or error}')
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse_args(argv)
  images, masks, factors_list = render_examples(
      args.seed, args.split, range(args.num), args.size, args.variant,
      confounder_strength=args.confounder_strength)
  rows = []
  for i, (image, mask, factors) in enumerate(zip(images, masks, factors_list)):
    name = f'{args.split}_{i:05d}'
    Image.fromarray(image).save(os.path.join(args.out, f'{name}.png'))
    Image.fromarray(mask).save(os.path.join(args.out, f'{name}_mask.png'))
    rows.append(factor_row(factors, name))
  with open(os.path.join(args.out, 'factors.csv'), 'w', newline='') as out:
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  Image.fromarray(contact_sheet(images)).save(
      os.path.join(args.out, 'sheet.png'), optimize=True)
  print(f'Wrote {args.num} images of {args.size} px, masks, factors.csv and '
        f'sheet.png to {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
