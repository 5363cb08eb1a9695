"""Tests of the phantom renderer, its TFDS builder and its preview command."""

import csv
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics
from sklearn import pipeline
from sklearn import preprocessing
import tensorflow_datasets as tfds

from input_pipeline import assets
from input_pipeline import cxr_phantom
from input_pipeline import labels as labels_lib
from input_pipeline import phantom

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FINDINGS = labels_lib.FINDINGS


def _clean(factors, **changes):
  """The same patient with no finding, no device, no tilt or shift."""
  return phantom.with_factors(
      factors, sign_severity=np.zeros(len(phantom.SIGNS), np.float32),
      sign_side=np.zeros(len(phantom.SIGNS), np.uint8), support_device=0,
      rotation_degrees=0.0, shift_x=0.0, shift_y=0.0, **changes)


def _patients(count, seed=0, **changes):
  return [_clean(phantom.sample_factors(np.random.default_rng([seed, i])),
                 **changes) for i in range(count)]


def _widths(heart, thorax, size):
  """Heart width (widest row of the soft mask) and thorax width (widest row
  extent), in image units."""
  heart_width = heart.sum(axis=-1).max(axis=-1) / size
  columns = np.arange(size)
  inside = thorax >= 0.5
  left = np.where(inside, columns, size).min(axis=-1)
  right = np.where(inside, columns, -1).max(axis=-1)
  thorax_width = (right - left + 1).max(axis=-1) / size
  return heart_width, thorax_width


# --- Determinism -------------------------------------------------------------


def test_same_seed_same_bytes_in_any_order_and_other_seed_differs():
  images, masks, factors = phantom.render_examples(0, 'train', range(6), 64)
  again, again_masks, _ = phantom.render_examples(0, 'train', range(6), 64)
  assert images.dtype == np.uint8 and images.shape == (6, 64, 64)
  assert images.tobytes() == again.tobytes()
  assert masks.tobytes() == again_masks.tobytes()
  # An example depends on (seed, split, index) only, not on its batch.
  subset, _, _ = phantom.render_examples(0, 'train', [4, 1], 64)
  np.testing.assert_array_equal(subset, images[[4, 1]])
  other_seed, _, _ = phantom.render_examples(1, 'train', range(6), 64)
  other_split, _, _ = phantom.render_examples(0, 'test', range(6), 64)
  for other in (other_seed, other_split):
    assert all(np.abs(a.astype(int) - b).mean() > 2
               for a, b in zip(images, other))
  assert factors[0]['age'] != phantom.example_factors(1, 'train', 0)['age']


# sha256 of the bytes the renderer gives for fixed seeds (images, lung masks,
# factors.csv rows, structure maps quantised to 8 bits): any change to the
# pixels or factors fails here. A deliberate change to the renderer updates
# these constants (print them with _golden_digests()).
_GOLDEN_EXAMPLES = {
    # (variant, image size, number of examples, confounder strength)
    ('chestxray14', 32, 16, 0.0):
        '96e6c7b34551655d902fb559050ee1b8db250a7688b2e0e44a82bffbcfc8b225',
    ('chestxray14', 64, 24, 0.5):
        '2199ddff8db5ca3d890ed1cdfaa7e83df987d8bf0f06f543c99f9ecaeea85353',
    ('chestxray14', 128, 8, 0.0):
        '4ed2f27042727c252cd1aef233645837499f2708ae7671f1931a1409d8271ca5',
    ('chestxray14', 256, 3, 0.8):
        '159c4c23a9b008061e35df67349d9f0a91baa46e7ee424532990b8da6c4a871b',
    ('covid3', 64, 16, 0.8):
        'd3d35f760434784bd7ef6d0afddb7a083a5c48d11c1848d3bd2b9902278d8236',
    ('covid3', 128, 6, 0.0):
        'e3e11e3ed946672a2e0eba08d6d1755ad565fe95075cb0a546f9356ae91554a0',
}
_GOLDEN_SIGNS = {
    64: 'd87a62fd63346fae0b53af6caa09853a3e8ee39ad246335ba99cdf7ae868fa27',
    128: '0a61bd7f21bee7c49c2f2bb7a8ae61918c7c8b78ee46cf528b2e1e9de0cbddb3',
}


def _sha256(*parts):
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(
        part).tobytes())
  return digest.hexdigest()


def _rows_bytes(factors_list):
  rows = [phantom.factor_row(f, str(i)) for i, f in enumerate(factors_list)]
  return json.dumps(rows, sort_keys=True).encode()


def _golden_examples(variant, size, count, confounder_strength):
  images, masks, factors = phantom.render_examples(
      11, 'train', range(count), size, variant,
      confounder_strength=confounder_strength)
  return _sha256(images, masks, _rows_bytes(factors))


def _golden_signs(size):
  """Every signature on its own patient, each side in turn, plus the device."""
  sides = (phantom.SIDE_RIGHT, phantom.SIDE_LEFT, phantom.SIDE_BOTH)
  patients = [
      phantom.with_factors(
          phantom.with_finding(phantom.example_factors(11, 'validation', i),
                               name, 0.9, sides[i % 3]),
          support_device=i % 2)
      for i, name in enumerate(phantom.SIGNS)]
  images, masks, structures = phantom.render_batch(patients, size,
                                                   with_structures=True)
  maps = [np.round(structures[k] * 255).astype(np.uint8)
          for k in sorted(structures)]
  derived = [phantom.derived_factors(p) for p in patients]
  return _sha256(images, masks, *maps, _rows_bytes(
      [{**p, **d} for p, d in zip(patients, derived)]))


def _golden_digests():
  return ({key: _golden_examples(*key) for key in _GOLDEN_EXAMPLES},
          {size: _golden_signs(size) for size in _GOLDEN_SIGNS})


@pytest.mark.parametrize('key', list(_GOLDEN_EXAMPLES))
def test_examples_are_the_recorded_bytes(key):
  assert _golden_examples(*key) == _GOLDEN_EXAMPLES[key]


@pytest.mark.parametrize('size', list(_GOLDEN_SIGNS))
def test_every_signature_and_the_device_are_the_recorded_bytes(size):
  assert _golden_signs(size) == _GOLDEN_SIGNS[size]


def test_overriding_a_factor_keeps_the_others():
  factors = phantom.sample_factors(7)
  as_ap = phantom.sample_factors(7, view=1)
  assert as_ap['view'] == 1
  for key in phantom.SCALAR_FACTORS:
    if key != 'view':
      assert as_ap[key] == factors[key], key
  np.testing.assert_array_equal(as_ap['sign_severity'],
                                factors['sign_severity'])
  with pytest.raises(ValueError, match='Unknown factors'):
    phantom.with_factors(factors, colour=1)


# --- Finding signatures --------------------------------------------------------


def test_cardiothoracic_ratio_above_half_exactly_with_cardiomegaly():
  patients = _patients(80, seed=1)
  patients = [phantom.with_finding(p, 'Cardiomegaly', s)
              for p, s in zip(patients, np.linspace(0, 1, 80) * (
                  np.arange(80) % 2))]
  patients = [phantom.with_factors(p, view=i % 4 // 2)
              for i, p in enumerate(patients)]
  _, _, structures = phantom.render_batch(patients, 128, with_structures=True)
  heart, thorax = _widths(structures['heart'], structures['thorax'], 128)
  measured = heart / thorax
  has_cardiomegaly = np.array(
      [p['labels'][FINDINGS.index('Cardiomegaly')] for p in patients], bool)
  assert 20 < has_cardiomegaly.sum() < 60
  np.testing.assert_array_equal(measured > 0.5, has_cardiomegaly)
  stored = np.array([phantom.derived_factors(p)['cardiothoracic_ratio']
                     for p in patients])
  np.testing.assert_allclose(measured, stored, atol=0.03)


def test_ap_heart_is_larger_than_pa_at_equal_other_factors():
  patients = _patients(20, seed=2)
  pa = [phantom.with_factors(p, view=0) for p in patients]
  ap = [phantom.with_factors(p, view=1) for p in patients]
  _, _, pa_structures = phantom.render_batch(pa, 128, with_structures=True)
  _, _, ap_structures = phantom.render_batch(ap, 128, with_structures=True)
  pa_heart, _ = _widths(pa_structures['heart'], pa_structures['thorax'], 128)
  ap_heart, _ = _widths(ap_structures['heart'], ap_structures['thorax'], 128)
  assert np.all(ap_heart > pa_heart)
  assert np.all(ap_structures['heart'].sum(axis=(1, 2))
                > 1.1 * pa_structures['heart'].sum(axis=(1, 2)))


def _with_and_without(name, side, count=24, size=64, seed=3):
  patients = _patients(count, seed=seed)
  with_finding = [phantom.with_finding(p, name, 0.5, side) for p in patients]
  clean, masks = phantom.render_batch(patients, size)
  sick, _, structures = phantom.render_batch(with_finding, size,
                                             with_structures=True)
  return clean.astype(np.float32), sick.astype(np.float32), masks > 0, (
      structures)


@pytest.mark.parametrize('name', ['Effusion', 'Consolidation'])
def test_effusion_and_consolidation_make_their_lung_region_more_opaque(name):
  # Patient's right = image left. Effusion: the lower third of that lung;
  # consolidation: that whole lung.
  clean, sick, masks, _ = _with_and_without(name, phantom.SIDE_RIGHT)
  size = clean.shape[-1]
  region = masks.copy()
  region[:, :, size // 2:] = False
  if name == 'Effusion':
    rows = np.nonzero(region.any(axis=(0, 2)))[0]
    region[:, :rows.min() + 2 * (rows.max() - rows.min()) // 3] = False
  other_side = masks.copy()
  other_side[:, :, :size // 2] = False
  def region_mean(images, where):
    return np.array([image[m].mean() for image, m in zip(images, where)])
  gain = region_mean(sick, region) - region_mean(clean, region)
  assert np.all(gain > 8), gain
  # The other lung is not affected.
  other_gain = region_mean(sick, other_side) - region_mean(clean, other_side)
  assert np.all(np.abs(other_gain) < 2), other_gain


DARKER = ('Emphysema', 'Pneumothorax')


@pytest.mark.parametrize('name', FINDINGS + (phantom.GROUND_GLASS,))
def test_each_finding_leaves_a_visible_signature_at_64px(name):
  clean, sick, _, structures = _with_and_without(name, None, count=12)
  region = structures['finding'] > 0.3
  assert np.all(region.sum(axis=(1, 2)) >= 5), name     # a few pixels at least
  change = np.array([(s - c)[r].mean() for s, c, r in zip(sick, clean,
                                                          region)])
  if name == 'Hernia':
    # A sac that is dense below its air-fluid level and dark above it.
    size = clean.shape[-1]
    rows = np.arange(size)[None, :, None]
    centre = np.array([np.nonzero(r.any(axis=1))[0].mean() for r in region])
    lower = region & (rows > centre[:, None, None] + 1)
    upper = region & (rows < centre[:, None, None] - 1)
    assert np.all([(s - c)[m].mean() > 5 for s, c, m in zip(sick, clean,
                                                            lower)])
    assert np.all([(s - c)[m].mean() < -20 for s, c, m in zip(sick, clean,
                                                              upper)])
  elif name in DARKER:
    assert np.all(change < -10), change
  else:
    assert np.all(change > 10), change


def test_nodule_is_small_and_mass_is_large():
  _, _, _, nodules = _with_and_without('Nodule', phantom.SIDE_RIGHT, 10)
  _, _, _, masses = _with_and_without('Mass', phantom.SIDE_RIGHT, 10)
  # Areas at 64 px: a nodule is 3-4 px across (~7-13 px, up to 3 nodules),
  # a mass 7-12 px across.
  nodule_area = (nodules['finding'] > 0.5).sum(axis=(1, 2))
  mass_area = (masses['finding'] > 0.5).sum(axis=(1, 2))
  assert np.all((nodule_area >= 5) & (nodule_area <= 45)), nodule_area
  assert np.all(mass_area >= 40), mass_area
  assert np.median(mass_area) > 4 * np.median(nodule_area)


def test_lung_mask_covers_the_dark_lungs_and_follows_the_prior():
  factors = [phantom.example_factors(0, 'validation', i) for i in range(64)]
  images, masks = phantom.render_batch(factors, 64)
  lung = masks > 0
  assert set(np.unique(masks)) == {0, 255}
  area = lung.mean(axis=(1, 2))
  assert np.all((area > 0.12) & (area < 0.45)), area
  # Inside the mask it is darker than in the rest of the central body.
  body = np.zeros_like(lung)
  body[:, 8:56, 12:52] = True
  for image, inside, central in zip(images, lung, body):
    assert image[inside].mean() + 15 < image[central & ~inside].mean()
  # The average mask overlaps the population prior.
  prior = assets.lung_prior(64) >= 0.5
  mean_mask = lung.mean(axis=0) >= 0.5
  iou = (prior & mean_mask).sum() / (prior | mean_mask).sum()
  assert iou > 0.6, iou


# --- Factors and labels ----------------------------------------------------------


def test_prevalence_floor_and_no_finding():
  factors = [phantom.example_factors(0, 'train', i) for i in range(3000)]
  labels = np.stack([f['labels'] for f in factors])
  prevalence = labels[:, :len(FINDINGS)].mean(axis=0)
  assert np.all(prevalence > 0.035), dict(zip(FINDINGS, prevalence))
  # Common findings keep their real prevalence (Infiltration 17.7 %).
  assert 0.15 < prevalence[FINDINGS.index('Infiltration')] < 0.21
  np.testing.assert_array_equal(labels[:, -1],
                                labels[:, :-1].max(axis=1) == 0)
  no_floor = [phantom.example_factors(0, 'train', i, prevalence_floor=0.0)
              for i in range(3000)]
  hernia = np.mean([f['labels'][FINDINGS.index('Hernia')] for f in no_floor])
  assert hernia < 0.01
  # Severity is set exactly for the present findings, above its floor.
  severity = np.stack([f['sign_severity'][:len(FINDINGS)] for f in factors])
  np.testing.assert_array_equal(severity > 0, labels[:, :-1] > 0)
  assert severity[severity > 0].min() >= phantom.DEFAULT_MIN_SEVERITY


def test_confounder_strength_ties_the_support_device_to_its_target():
  target = FINDINGS.index(phantom.CONFOUNDER_TARGETS['chestxray14'])
  def rates(strength):
    factors = [phantom.example_factors(0, 'train', i,
                                       confounder_strength=strength)
               for i in range(2500)]
    device = np.array([f['support_device'] for f in factors])
    has_target = np.array([f['labels'][target] for f in factors], bool)
    return device[has_target].mean(), device[~has_target].mean()
  with_target, without = rates(0.0)
  assert abs(with_target - without) < 0.12
  assert 0.12 < without < 0.28
  with_target, without = rates(1.0)
  assert with_target == 1.0 and without == 0.0


def _device_rates(split, strength, count=2500):
  """P(device | confounder target) and P(device | not) in `split`."""
  target = FINDINGS.index(phantom.CONFOUNDER_TARGETS['chestxray14'])
  factors = [phantom.example_factors(0, split, i,
                                     confounder_strength=strength)
             for i in range(count)]
  device = np.array([f['support_device'] for f in factors])
  has_target = np.array([f['labels'][target] for f in factors], bool)
  return device[has_target].mean(), device[~has_target].mean()


@pytest.mark.parametrize('strength', [0.0, 1.0])
def test_audit_splits_have_their_own_confounder_whatever_the_strength(
    strength):
  for split in ('validation_deconfounded', 'test_deconfounded'):
    with_target, without = _device_rates(split, strength)
    assert abs(with_target - without) < 0.12, split
    assert 0.12 < without < 0.28, split
  with_target, without = _device_rates('test_anticorrelated', strength)
  assert with_target < 0.1 and without > 0.75
  # The usual splits keep the data set's strength.
  with_target, without = _device_rates('test', strength)
  assert (with_target - without > 0.9) == (strength == 1.0)


def test_negative_strength_mirrors_the_positive_one():
  positive = phantom.sample_factors(9, confounder_strength=0.8)
  negative = phantom.sample_factors(9, confounder_strength=-0.8)
  for key in phantom.SCALAR_FACTORS:
    if key != 'support_device':
      assert negative[key] == positive[key], key
  with_target, without = _device_rates('train', -1.0, count=1500)
  assert with_target == 0.0 and without == 1.0
  with pytest.raises(ValueError, match='confounder_strength'):
    phantom.sample_factors(9, confounder_strength=-1.5)


def test_factor_kinds_partition_the_scalar_factors():
  kinds = (phantom.BINARY_FACTORS + phantom.CONTINUOUS_FACTORS
           + ('texture_seed',))
  assert sorted(kinds) == sorted(phantom.SCALAR_FACTORS)
  factors = [phantom.example_factors(0, 'train', i) for i in range(200)]
  for name in phantom.BINARY_FACTORS:
    assert {f[name] for f in factors} == {0, 1}, name
  for name in phantom.CONTINUOUS_FACTORS:
    assert len({f[name] for f in factors}) > 150, name


@pytest.mark.parametrize('name, value', [
    ('view', 1), ('sex', 0), ('support_device', 1), ('age', 71.5),
    ('exposure', -0.5), ('rotation_degrees', 3.0)])
def test_sample_factors_with_holds_one_factor_and_draws_the_rest(name, value):
  patients = phantom.sample_factors_with(3, 40, **{name: value})
  rng = np.random.default_rng(3)
  free = [phantom.sample_factors(rng) for _ in range(40)]
  assert len(patients) == 40
  assert all(p[name] == value for p in patients)
  assert len({f[name] for f in free}) > 1
  for patient, drawn in zip(patients, free):
    for key in phantom.SCALAR_FACTORS:
      if key != name:
        assert patient[key] == drawn[key], key
    np.testing.assert_array_equal(patient['sign_severity'],
                                  drawn['sign_severity'])
    np.testing.assert_array_equal(patient['labels'], drawn['labels'])


def test_sample_factors_with_a_finding_sets_its_severity_and_labels():
  patients = phantom.sample_factors_with(
      np.random.default_rng(5), 16, Cardiomegaly=0.8, view=0)
  index = FINDINGS.index('Cardiomegaly')
  assert all(p['sign_severity'][index] == np.float32(0.8) for p in patients)
  assert all(p['labels'][index] == 1 and p['labels'][-1] == 0
             for p in patients)
  ratios = [phantom.derived_factors(p)['cardiothoracic_ratio']
            for p in patients]
  assert min(ratios) > 0.5
  absent = phantom.sample_factors_with(5, 16, Cardiomegaly=0.0)
  assert all(p['sign_severity'][index] == 0 and p['labels'][index] == 0
             for p in absent)
  images, masks = phantom.render_batch(patients, 32)
  assert images.shape == masks.shape == (16, 32, 32)


@pytest.mark.parametrize('kwargs, message', [
    (dict(colour=1), 'Unknown factors'),
    (dict(sex=2), 'sex must be 0 or 1'),
    (dict(variant='covid3', Nodule=0.7), "'chestxray14' only"),
    (dict(variant='chexpert'), 'variant'),
    (dict(count=0), 'count'),
])
def test_sample_factors_with_rejects_bad_arguments(kwargs, message):
  kwargs = {'count': 4, **kwargs}
  with pytest.raises(ValueError, match=message):
    phantom.sample_factors_with(0, **kwargs)


def test_covid3_variant_classes_and_signatures():
  factors = [phantom.example_factors(0, 'train', i, 'covid3')
             for i in range(300)]
  classes = np.array([f['label'] for f in factors])
  assert set(classes) == {0, 1, 2}
  assert np.all(np.bincount(classes) > 70)
  assert 'labels' not in factors[0]
  ground_glass = phantom.SIGNS.index(phantom.GROUND_GLASS)
  consolidation = phantom.SIGNS.index('Consolidation')
  expected_signs = {0: {ground_glass}, 1: {consolidation}, 2: set()}
  for f, c in zip(factors, classes):
    assert set(np.nonzero(f['sign_severity'])[0]) == expected_signs[c]
  covid = [phantom.with_factors(_clean(f), sign_severity=f['sign_severity'],
                                sign_side=f['sign_side'])
           for f, c in zip(factors, classes) if c == 0][:10]
  normal = [_clean(f) for f in covid]
  sick, masks = phantom.render_batch(covid, 64)
  clean, _ = phantom.render_batch(normal, 64)
  # Bilateral: both lungs are more opaque.
  for half in (slice(0, 32), slice(32, 64)):
    lung = masks[:, :, half] > 0
    gain = [(s[:, half][m].mean() - c[:, half][m].mean())
            for s, c, m in zip(sick.astype(float), clean, lung)]
    assert np.all(np.array(gain) > 5), gain


# --- Factors are visible in the pixels ---------------------------------------------


def test_linear_probe_on_pixels_separates_sex_and_view():
  count, size = 3000, 32
  factors = [phantom.example_factors(5, 'train', i) for i in range(count)]
  images, _ = phantom.render_batch(factors, size)
  pixels = images.reshape(count, -1).astype(np.float32) / 255
  train, test = slice(0, 2200), slice(2200, count)
  for name in ('sex', 'view'):
    target = np.array([f[name] for f in factors])
    probe = pipeline.make_pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(C=0.05, max_iter=300))
    probe.fit(pixels[train], target[train])
    auc = metrics.roc_auc_score(target[test],
                                probe.predict_proba(pixels[test])[:, 1])
    assert auc >= 0.9, (name, auc)


# --- TFDS builder ----------------------------------------------------------------


def test_builder_prepares_deterministic_examples_with_the_contract(tmp_path):
  settings = dict(image_size=64, num_train=60, num_validation=20, num_test=20,
                  seed=3)
  builder = cxr_phantom.builder(data_dir=str(tmp_path / 'a'), **settings)
  builder.download_and_prepare()
  info = builder.info
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      'train': 60, 'validation': 20, 'test': 20,
      'validation_deconfounded': 20, 'test_deconfounded': 20,
      'test_anticorrelated': 20}
  features = info.features
  assert features['image'].shape == (64, 64, 1)
  assert features['lung_mask'].shape == (64, 64, 1)
  assert features['labels'].shape == (15,)
  assert features['labels'].dtype == np.uint8
  assert features['view'].names == list(labels_lib.VIEWS)
  assert features['sex'].names == list(labels_lib.SEXES)
  for name in ('exposure', 'rotation_degrees', 'cardiothoracic_ratio',
               'heart_width', 'thorax_width', 'support_device', 'severity',
               'finding_severity', 'age', 'id'):
    assert name in features, name

  train = list(tfds.as_numpy(builder.as_dataset(split='train')))
  by_index = {int(e['id'].decode().rsplit('-', 1)[1]): e for e in train}
  assert sorted(by_index) == list(range(60))
  images, masks, factors = phantom.render_examples(3, 'train', range(60), 64)
  for index, example in by_index.items():
    np.testing.assert_array_equal(example['image'][..., 0], images[index])
    np.testing.assert_array_equal(example['lung_mask'][..., 0], masks[index])
    np.testing.assert_array_equal(example['labels'], factors[index]['labels'])
    assert example['view'] == factors[index]['view']
    assert example['sex'] == factors[index]['sex']
    assert example['age'] == np.float32(factors[index]['age'])
    assert example['labels'][-1] == (example['labels'][:-1].max() == 0)
  ages = np.array([f['age'] for f in factors], np.float32)
  assert info.metadata['age_median'] == pytest.approx(float(np.median(ages)))

  anticorrelated = list(tfds.as_numpy(builder.as_dataset(
      split='test_anticorrelated')))
  _, _, factors = phantom.render_examples(3, 'test_anticorrelated', range(20),
                                          64)
  for example in anticorrelated:
    index = int(example['id'].decode().rsplit('-', 1)[1])
    assert example['support_device'] == factors[index]['support_device']
    np.testing.assert_array_equal(example['labels'], factors[index]['labels'])

  # Same settings elsewhere: the same bytes on disk.
  again = cxr_phantom.builder(data_dir=str(tmp_path / 'b'), **settings)
  again.download_and_prepare()
  records = sorted(p.name for p in pathlib.Path(builder.data_dir).glob(
      '*.tfrecord*'))
  assert records
  for name in records:
    assert (pathlib.Path(builder.data_dir, name).read_bytes()
            == pathlib.Path(again.data_dir, name).read_bytes()), name
  # Loading a prepared set restores its metadata.
  reloaded = cxr_phantom.builder(data_dir=str(tmp_path / 'a'), **settings)
  assert reloaded.info.metadata['age_median'] == info.metadata['age_median']


def test_covid3_builder_has_a_class_label(tmp_path):
  builder = cxr_phantom.builder(data_dir=str(tmp_path), image_size=64,
                                variant='covid3', num_train=12,
                                num_validation=4, num_test=4,
                                confounder_strength=0.5)
  builder.download_and_prepare()
  assert builder.info.features['label'].names == list(
      labels_lib.COVID3_CLASSES)
  assert 'labels' not in builder.info.features
  example = next(iter(tfds.as_numpy(builder.as_dataset(split='test'))))
  assert example['image'].shape == (64, 64, 1)
  assert 0 <= example['label'] < 3
  assert 'age_median' in builder.info.metadata


def test_builder_config_names_encode_the_settings():
  base = dict(data_dir=None, image_size=64, num_train=10, num_validation=5,
              num_test=5)
  names = {
      cxr_phantom.builder(**base).builder_config.name,
      cxr_phantom.builder(**base, seed=1).builder_config.name,
      cxr_phantom.builder(**base, confounder_strength=0.5).builder_config.name,
      cxr_phantom.builder(**base, variant='covid3').builder_config.name,
      cxr_phantom.builder(**{**base, 'image_size': 128}).builder_config.name,
  }
  assert len(names) == 5
  default = cxr_phantom.builder(data_dir=None, image_size=64,
                                num_train=20_000, num_validation=2_000,
                                num_test=2_000)
  assert default.builder_config.name in {
      c.name for c in cxr_phantom.CxrPhantom.BUILDER_CONFIGS}


@pytest.mark.parametrize('bad, argument', [
    (dict(image_size=16), 'image_size'),
    (dict(image_size=64.0), 'image_size'),
    (dict(variant='chexpert'), 'variant'),
    (dict(num_train=0), 'num_train'),
    (dict(num_test=-1), 'num_test'),
    (dict(seed=-3), 'seed'),
    (dict(confounder_strength=1.5), 'confounder_strength'),
])
def test_builder_rejects_bad_arguments_by_name(bad, argument):
  settings = dict(data_dir=None, image_size=64, num_train=10,
                  num_validation=5, num_test=5)
  with pytest.raises(ValueError, match=argument):
    cxr_phantom.builder(**{**settings, **bad})


# --- Preview command ---------------------------------------------------------------


def _run_preview(*args):
  return subprocess.run(
      [sys.executable, '-m', 'input_pipeline.phantom', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)})


def test_preview_writes_images_masks_factors_and_sheet(tmp_path):
  out = tmp_path / 'preview'
  result = _run_preview('--out', str(out), '--num', '3', '--size', '48',
                        '--seed', '2')
  assert result.returncode == 0, result.stderr
  images = sorted(out.glob('train_*[0-9].png'))
  assert len(images) == 3
  assert len(list(out.glob('*_mask.png'))) == 3
  assert (out / 'sheet.png').exists()
  with open(out / 'factors.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3
  for column in ('id', 'sex', 'age', 'view', 'exposure', 'support_device',
                 'cardiothoracic_ratio') + labels_lib.LABELS:
    assert column in rows[0], column
  expected = phantom.example_factors(2, 'train', 1)
  assert rows[1]['view'] == labels_lib.VIEWS[expected['view']]
  assert float(rows[1]['age']) == pytest.approx(expected['age'], abs=0.01)


@pytest.mark.parametrize('args, message', [
    (['--size', '16'], '--size'),
    (['--size', '4096'], '--size'),
    (['--num', '0'], '--num'),
    (['--num', '-2'], '--num'),
])
def test_preview_rejects_bad_arguments(tmp_path, args, message):
  result = _run_preview('--out', str(tmp_path), *args)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not list(tmp_path.glob('*.png'))


def test_preview_rejects_an_unwritable_directory(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  result = _run_preview('--out', str(blocker / 'out'), '--num', '2')
  assert result.returncode != 0
  assert 'not a writable directory' in result.stderr
  assert str(blocker) in result.stderr
  assert 'Traceback' not in result.stderr


# --- Committed statistics ------------------------------------------------------------


def test_committed_stats_are_what_the_script_derives(real_data_dir):
  from scripts import derive_chestxray14_stats   # pylint: disable=g-import-not-at-top
  derived = derive_chestxray14_stats.chestxray14_stats(
      str(real_data_dir / 'chestxray14' / 'Data_Entry_2017_v2020.csv.gz'))
  with open(REPO_ROOT / 'input_pipeline' / 'assets' /
            'chestxray14_stats.json') as f:
    committed = json.load(f)
  assert derived == committed
  assert assets.chestxray14_stats() == committed
  assert committed['prevalence']['Hernia'] < 0.005
