"""Generating factors of a phantom patient: sampling, overrides, CSV rows.

A factors dict holds the SCALAR_FACTORS, the severity and side of every
signature (SIGNS) and the labels. Each factor is drawn with a fixed number of
draws in a fixed order, so an example is a pure function of (seed, split,
index) and overriding one factor leaves the others as they were.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np

from input_pipeline import assets
from input_pipeline import labels as labels_lib

VARIANTS = ('chestxray14', 'covid3')
# The usual splits, then the bias-audit splits (appended: a split's index
# seeds its examples).
SPLITS = ('train', 'validation', 'test', 'validation_deconfounded',
          'test_deconfounded', 'test_anticorrelated')
# The audit splits draw the support device with their own confounder strength,
# whatever the data set's: 0 = independent of every finding (deconfounded),
# < 0 = mostly on the negatives of the confounder target (anti-correlated).
AUDIT_SPLIT_STRENGTHS = {'validation_deconfounded': 0.0,
                         'test_deconfounded': 0.0,
                         'test_anticorrelated': -0.8}
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
SIGN_INDEX = {name: index for index, name in enumerate(SIGNS)}
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
# The generating scalar factors by kind (texture_seed, the per-image noise
# and lesion placement, is neither).
BINARY_FACTORS = ('sex', 'view', 'support_device')
CONTINUOUS_FACTORS = ('age', 'body_size', 'inspiration', 'heart_size',
                      'breast_size', 'exposure', 'rotation_degrees', 'shift_x',
                      'shift_y', 'noise_level')
# Factors computed from the others when an image is rendered.
DERIVED_FACTORS = ('thorax_width', 'heart_width', 'cardiothoracic_ratio',
                   'bone_density')


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


def split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  return SPLITS.index(split)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of one example: a pure function of (seed, split, index)."""
  return np.random.default_rng([int(seed), split_id(split), int(index)])


def check_variant(variant: str) -> None:
  """Raises ValueError unless `variant` is one of VARIANTS."""
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
    confounder_strength: in [-1, 1]; 0 = the support device is independent
      of everything, 1 = present exactly when the variant's confounder target
      (CONFOUNDER_TARGETS) is, -1 = exactly when it is not.
    **overrides: factors to set instead of drawing (after drawing all, so the
      other factors do not change), e.g. view=1.

  Returns:
    A dict: the SCALAR_FACTORS, 'sign_severity' (len(SIGNS),) float32,
    'sign_side' (len(SIGNS),) uint8, 'variant', and 'labels' (15 multi-hot
    uint8, chestxray14) or 'label' (int index into COVID3_CLASSES, covid3).
  """
  check_variant(variant)
  if not 0.0 <= prevalence_floor <= 0.5:
    raise ValueError(
        f'prevalence_floor must be in [0, 0.5], got {prevalence_floor}')
  if not 0.0 < min_severity <= 1.0:
    raise ValueError(f'min_severity must be in (0, 1], got {min_severity}')
  if not -1.0 <= confounder_strength <= 1.0:
    raise ValueError(
        f'confounder_strength must be in [-1, 1], got {confounder_strength}')
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
    target_present = bool(present[SIGN_INDEX[CONFOUNDER_TARGETS[variant]]])
  else:
    label = min(int(uniform[11] * len(labels_lib.COVID3_CLASSES)),
                len(labels_lib.COVID3_CLASSES) - 1)
    if label < 2:   # COVID-19: ground glass; bacterial: lobar consolidation
      present[SIGN_INDEX[(GROUND_GLASS, 'Consolidation')[label]]] = True
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
  # A negative strength mirrors a positive one: the device follows the
  # target's absence.
  follows = target_present if confounder_strength >= 0 else not target_present
  strength = abs(confounder_strength)
  device_probability = (base + strength * (1 - base) if follows
                        else base * (1 - strength))
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
  if name not in SIGN_INDEX:
    raise ValueError(f'Unknown finding {name!r}; known: {SIGNS}')
  if not 0.0 <= severity <= 1.0:
    raise ValueError(f'severity must be in [0, 1], got {severity}')
  sign_severity = np.array(factors['sign_severity'], np.float32)
  sign_side = np.array(factors['sign_side'], np.uint8)
  sign_severity[SIGN_INDEX[name]] = severity
  if side is None:
    choices, weights = _SIDE_CHOICES[name]
    side = choices[int(np.argmax(weights))]
  sign_side[SIGN_INDEX[name]] = side if severity > 0 else SIDE_NONE
  return with_factors(factors, sign_severity=sign_severity,
                      sign_side=sign_side)


def sample_factors_with(
    rng: np.random.Generator | int,
    count: int,
    variant: str = 'chestxray14',
    *,
    prevalence_floor: float = DEFAULT_PREVALENCE_FLOOR,
    min_severity: float = DEFAULT_MIN_SEVERITY,
    confounder_strength: float = 0.0,
    **fixed: Any,
) -> list[dict[str, Any]]:
  """Draws `count` patients that share the factor values `fixed`.

  Every other factor varies as in the data set, drawn exactly as by
  sample_factors from the same generator (fixing one changes no other): the
  samples of a disentanglement score that holds one factor at a value, e.g.
  sample_factors_with(rng, 64, view=1). Render them with render_batch.

  Factors that can be fixed:
    binary (BINARY_FACTORS), 0 or 1: sex (1 = female), view (1 = AP),
      support_device (1 = ECG leads and a central line).
    continuous (CONTINUOUS_FACTORS), with the ranges they are drawn in:
      age (years, the ChestX-ray14 distribution), body_size [0.9, 1.1],
      inspiration [-1, 1], heart_size [0.36, 0.44] (cardiothoracic ratio
      before findings), breast_size [0.6, 1], exposure [-1, 1],
      rotation_degrees [-4, 4], shift_x [-0.025, 0.025], shift_y
      [-0.02, 0.02], noise_level [0.008, 0.022].
    a finding ('chestxray14' only): a name of SIGNS, valued its severity in
      [0, 1] (0 = absent; drawn in [min_severity, 1] when present), on its
      most common side; the labels follow (the support device keeps its
      draw: it does not follow a fixed confounder target).
    texture_seed (an int: quantum noise, lung texture, lesion placement).

  Args:
    rng: generator, or an int seed.
    count: number of patients, >= 1.
    variant, prevalence_floor, min_severity, confounder_strength: as in
      sample_factors.
    **fixed: factor name -> value held by every patient.

  Returns:
    A list of `count` factors dicts.
  """
  check_variant(variant)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'count must be a positive int, got {count!r}')
  unknown = set(fixed) - set(SCALAR_FACTORS) - set(SIGNS)
  if unknown:
    raise ValueError(f'Unknown factors {sorted(unknown)}; fixable: '
                     f'{SCALAR_FACTORS + SIGNS}')
  for name in BINARY_FACTORS:
    if name in fixed and fixed[name] not in (0, 1):
      raise ValueError(f'{name} must be 0 or 1, got {fixed[name]!r}')
  findings = {name: fixed.pop(name) for name in list(fixed)
              if name in SIGN_INDEX}
  if findings and variant != 'chestxray14':
    raise ValueError(f'Findings {sorted(findings)} can be fixed in '
                     f"'chestxray14' only; {variant!r} draws its class")
  if not isinstance(rng, np.random.Generator):
    rng = np.random.default_rng(rng)
  patients = []
  for _ in range(count):
    factors = sample_factors(
        rng, variant, prevalence_floor=prevalence_floor,
        min_severity=min_severity, confounder_strength=confounder_strength,
        **fixed)
    for name, severity in findings.items():
      factors = with_finding(factors, name, severity)
    patients.append(factors)
  return patients


def split_confounder_strength(split: str, confounder_strength: float) -> float:
  """The confounder strength of `split` in a data set drawn with
  `confounder_strength`: the audit splits have their own."""
  split_id(split)
  return AUDIT_SPLIT_STRENGTHS.get(split, confounder_strength)


def example_factors(seed: int, split: str, index: int,
                    variant: str = 'chestxray14', **kwargs) -> dict[str, Any]:
  """Factors of example `index` of `split` of the data set drawn with `seed`
  (an audit split with its own confounder strength)."""
  if split in AUDIT_SPLIT_STRENGTHS:
    kwargs['confounder_strength'] = split_confounder_strength(
        split, kwargs.get('confounder_strength', 0.0))
  return sample_factors(example_rng(seed, split, index), variant, **kwargs)


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
