"""Attributes of examples, and independent judges of them in images.

An attribute is a yes/no property of an example, read from its data set's
features: `health` (No Finding), `sex` (female), `age` (above the training
median), `view` (AP), and each finding. A judge is a scikit-learn model that
reads an attribute from the pixels of an image, fitted on unedited images and
their true features, never on the explained model's edits and never with the
explained model's classifier: logistic regression for the attributes and
ridge regression for the heart's size (the phantom's cardiothoracic ratio).
The judges see images as the explained model's decoder draws them (they are
fitted on its reconstructions of held-out images, with the same blur as its
edits), so they judge what an edit shows, not how sharp it is.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from sklearn import linear_model
from sklearn import metrics
from sklearn import pipeline
from sklearn import preprocessing

from input_pipeline import labels as labels_lib

HEALTH, SEX, AGE, VIEW = 'health', 'sex', 'age', 'view'
METADATA_ATTRIBUTES = (HEALTH, AGE, SEX, VIEW)
ATTRIBUTES = METADATA_ATTRIBUTES + labels_lib.FINDINGS
# What group 1 of each metadata attribute is (group 0 is the rest).
MEANINGS = {HEALTH: 'No Finding (vs any finding)', SEX: 'female (vs male)',
            AGE: 'above the median age (vs below)', VIEW: 'AP (vs PA)'}
# The judges' continuous target: the heart's width over the thorax's.
HEART_SIZE = 'heart_size'
HEART_SIZE_FEATURE = 'cardiothoracic_ratio'
# The attributes every faithfulness measure is judged on.
JUDGED = (HEALTH, AGE, SEX, VIEW, 'Cardiomegaly')
# Features read with the images (those a data set has).
FEATURES = ('labels', 'sex', 'view', 'age', HEART_SIZE_FEATURE)
# Side of the images the judges read (block means of larger images).
JUDGE_IMAGE_SIZE = 32
# Inverse L2 strength of the logistic judges, and the ridge judge's choices
# (picked by efficient leave-one-out cross-validation).
JUDGE_C = 0.1
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
# Share of the judges' images held out to measure them.
HELDOUT_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Examples:
  """Images of a split with their features (all arrays share axis 0)."""
  images: np.ndarray  # (N, S, S) uint8
  features: dict[str, np.ndarray]
  age_median: float | None


def load_examples(builder, split: str, count: int,
                  age_median: float | None) -> Examples:
  """The first `count` examples of `split` (0: all), in stored order."""
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {builder.info.full_name} '
                     f'(splits: {", ".join(builder.info.splits.keys())})')
  wanted = [name for name in FEATURES if name in builder.info.features]
  ds = builder.as_dataset(split=split, shuffle_files=False)
  if count:
    ds = ds.take(count)
  ds = ds.map(lambda ex: {k: ex[k] for k in ('image', *wanted)}).batch(512)
  parts = list(tfds.as_numpy(ds))
  if not parts:
    raise ValueError(f'split {split!r} of {builder.info.full_name} is empty')
  joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  images = joined.pop('image')[..., 0]
  return Examples(images, joined, age_median)


def available(examples: Examples) -> tuple[str, ...]:
  """The attributes that `examples` have features for."""
  names = []
  for name in ATTRIBUTES:
    feature = {HEALTH: 'labels', AGE: 'age'}.get(
        name, name if name in METADATA_ATTRIBUTES else 'labels')
    if feature in examples.features and (
        name != AGE or examples.age_median is not None):
      names.append(name)
  return tuple(names)


def check_attributes(names, examples: Examples) -> None:
  """Raises ValueError naming the valid attributes unless all of `names` are."""
  valid = available(examples)
  unknown = [name for name in names if name not in valid]
  if unknown:
    raise ValueError(f'unknown attribute(s) {", ".join(map(repr, unknown))}; '
                     f'valid: {", ".join(valid)}')


def values(name: str, examples: Examples) -> np.ndarray:
  """(N,) bool: which examples are in group 1 of attribute `name`."""
  check_attributes([name], examples)
  features = examples.features
  if name == HEALTH:
    return features['labels'][:, labels_lib.LABELS.index(
        labels_lib.NO_FINDING)] > 0
  if name == AGE:
    return features['age'] > examples.age_median
  if name in (SEX, VIEW):
    return features[name] == 1
  return features['labels'][:, labels_lib.LABELS.index(name)] > 0


def entailed(name: str) -> tuple[str, ...]:
  """Attributes that change with `name` by definition, not by entanglement:
  health with every finding."""
  if name == HEALTH:
    return labels_lib.FINDINGS
  if name in labels_lib.FINDINGS:
    return (HEALTH,)
  return ()


def _pixels(images: np.ndarray) -> np.ndarray:
  """(N, S, S) images in [0, 1] → (N, F) block means at JUDGE_IMAGE_SIZE."""
  images = np.asarray(images, np.float32)
  size = images.shape[-1]
  factor = max(1, size // JUDGE_IMAGE_SIZE)
  side = size // factor
  blocks = images[:, :side * factor, :side * factor].reshape(
      len(images), side, factor, side, factor)
  return blocks.mean(axis=(2, 4)).reshape(len(images), -1)


def _linear(estimator) -> pipeline.Pipeline:
  return pipeline.make_pipeline(preprocessing.StandardScaler(), estimator)


@dataclasses.dataclass
class Judges:
  """Fitted judges: an attribute's probability, or the heart's size."""
  models: dict[str, pipeline.Pipeline]
  heldout: dict[str, dict[str, float]]  # {'heldout_auc' | 'heldout_r2': x}

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.models)

  def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """(N, S, S) images in [0, 1] → {name: (N,)} probability (attributes)
    or cardiothoracic ratio (heart_size)."""
    pixels = _pixels(images)
    return {name: (model.predict(pixels) if name == HEART_SIZE
                   else model.predict_proba(pixels)[:, 1])
            for name, model in self.models.items()}


def fit_judges(images: np.ndarray, examples: Examples, attributes,
               seed: int = 0) -> Judges:
  """Judges of `attributes` (and the heart's size, where the data has it),
  fitted on (1 − HELDOUT_FRACTION) of `images` (in [0, 1], unedited) with
  the true features of `examples`, measured on the rest."""
  order = np.random.default_rng(seed).permutation(len(images))
  cut = int(round(len(images) * (1 - HELDOUT_FRACTION)))
  fit, held = order[:cut], order[cut:]
  pixels = _pixels(images)
  judges = Judges({}, {})
  for name in attributes:
    target = values(name, examples).astype(int)
    if len(np.unique(target[fit])) < 2:
      raise ValueError(f'judge of {name!r}: its {len(fit)} fitting images '
                       'hold one group only; use more judge examples')
    model = _linear(linear_model.LogisticRegression(
        C=JUDGE_C, max_iter=3000)).fit(pixels[fit], target[fit])
    judges.models[name] = model
    judges.heldout[name] = {'heldout_auc': _auc(
        target[held], model.predict_proba(pixels[held])[:, 1])}
  if HEART_SIZE_FEATURE in examples.features:
    target = examples.features[HEART_SIZE_FEATURE].astype(np.float64)
    model = _linear(linear_model.RidgeCV(alphas=RIDGE_ALPHAS)).fit(
        pixels[fit], target[fit])
    judges.models[HEART_SIZE] = model
    judges.heldout[HEART_SIZE] = {'heldout_r2': float(metrics.r2_score(
        target[held], model.predict(pixels[held])))}
  return judges


def _auc(target: np.ndarray, score: np.ndarray) -> float:
  if len(np.unique(target)) < 2:
    return float('nan')
  return float(metrics.roc_auc_score(target, score))
