"""Bootstrap intervals, thresholds and calibration (pumamednet_jax.stats)."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn import metrics as sk_metrics

from pumamednet_jax import stats


def binormal(rng, num_pos, num_neg, separation):
  """Scores N(separation, 1) for positives, N(0, 1) for negatives; the true
  AUC is Φ(separation / √2)."""
  targets = np.r_[np.ones(num_pos), np.zeros(num_neg)].astype(np.float32)
  scores = rng.normal(size=num_pos + num_neg) + separation * targets
  return scores.astype(np.float32), targets


def test_weighted_auc_equals_sklearn_with_ties_and_weights():
  rng = np.random.default_rng(0)
  scores = np.round(rng.normal(size=300), 1).astype(np.float32)  # many ties
  targets = (rng.random(300) < 0.3).astype(np.float32)
  known = rng.random(300) < 0.9
  weights = rng.integers(0, 4, size=(5, 300)).astype(np.float32)
  got = stats.auc_statistic(scores, targets, known)(weights)
  for row, value in zip(weights, got):
    expected = sk_metrics.roc_auc_score(targets[known], scores[known],
                                        sample_weight=row[known])
    assert value == pytest.approx(expected, abs=1e-9)


def test_resamples_are_seeded_and_keep_every_class():
  rng = np.random.default_rng(1)
  targets = np.zeros(40)
  targets[:2] = 1  # two positives out of 40
  events = np.stack([targets > 0.5, targets < 0.5], axis=1)
  resampling = stats.Resampling(40, events=events, num_resamples=300, seed=3)
  first = np.concatenate(list(stats.resample_weights(resampling)))
  again = np.concatenate(list(stats.resample_weights(resampling)))
  np.testing.assert_array_equal(first, again)
  assert first.shape == (300, 40)
  np.testing.assert_array_equal(first.sum(axis=1), 40)
  assert np.all(first[:, :2].sum(axis=1) > 0)
  # Stratified: the two classes keep their sizes.
  np.testing.assert_array_equal(first[:, :2].sum(axis=1), 2)
  other = stats.Resampling(40, events=events, num_resamples=300, seed=4)
  assert not np.array_equal(
      first, np.concatenate(list(stats.resample_weights(other))))
  del rng


def test_95_percent_intervals_cover_the_true_auc():
  separation, trials, covered = 1.0, 200, 0
  true_auc = scipy_stats.norm.cdf(separation / np.sqrt(2))
  for trial in range(trials):
    rng = np.random.default_rng(trial)
    scores, targets = binormal(rng, 60, 140, separation)
    events = np.stack([targets > 0.5, targets < 0.5], axis=1)
    replicates = stats.bootstrap(
        {'auc': stats.auc_statistic(scores, targets)},
        stats.Resampling(len(scores), events=events, num_resamples=500,
                         seed=trial))['auc']
    low, high = stats.interval(replicates)
    covered += low <= true_auc <= high
  assert 0.91 <= covered / trials <= 0.99


def test_patient_level_interval_is_wider_with_repeated_patients():
  # 80 patients with 5 images each; a patient's images share most of their
  # score, so they are far from independent.
  rng = np.random.default_rng(5)
  patients = np.repeat(np.arange(80), 5)
  patient_targets = (np.arange(80) % 2).astype(np.float32)
  targets = patient_targets[patients]
  scores = (0.8 * targets + rng.normal(size=80)[patients] +
            0.2 * rng.normal(size=400)).astype(np.float32)
  events = np.stack([targets > 0.5, targets < 0.5], axis=1)
  statistic = {'auc': stats.auc_statistic(scores, targets)}
  by_image = stats.bootstrap(statistic, stats.Resampling(
      400, events=events, num_resamples=1000, seed=0))['auc']
  by_patient = stats.bootstrap(statistic, stats.Resampling(
      400, groups=patients, events=events, num_resamples=1000, seed=0))['auc']
  image_low, image_high = stats.interval(by_image)
  patient_low, patient_high = stats.interval(by_patient)
  assert patient_high - patient_low > 1.5 * (image_high - image_low)


def test_resampling_by_patient_keeps_a_patients_images_together():
  patients = np.array([7, 7, 7, 3, 3, 9])
  weights = np.concatenate(list(stats.resample_weights(
      stats.Resampling(6, groups=patients, num_resamples=50, seed=0))))
  np.testing.assert_array_equal(weights[:, 0], weights[:, 1])
  np.testing.assert_array_equal(weights[:, 0], weights[:, 2])
  np.testing.assert_array_equal(weights[:, 3], weights[:, 4])
  # Three patients drawn per resample.
  np.testing.assert_array_equal(
      weights[:, 0] + weights[:, 3] + weights[:, 5], 3)


def test_weighted_mean_matches_repeating_the_examples():
  values = np.array([1.0, 2.0, 4.0, 8.0], np.float32)
  known = np.array([True, True, False, True])
  weights = np.array([[2, 0, 5, 1], [1, 1, 1, 1]], np.float32)
  got = stats.mean_statistic(values, known)(weights)
  np.testing.assert_allclose(got, [(2 + 8) / 3, (1 + 2 + 8) / 3])


def test_youden_threshold_and_operating_point():
  scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
  targets = np.array([0, 0, 1, 0, 1, 1])
  threshold = stats.youden_threshold(scores, targets)
  assert threshold == pytest.approx(0.3) or threshold == pytest.approx(0.7)
  sensitivity, specificity = stats.operating_point(scores, targets, 0.3)
  assert (sensitivity, specificity) == (1.0, pytest.approx(2 / 3))


def test_expected_calibration_error():
  rng = np.random.default_rng(0)
  probs = rng.random(200_000)
  calibrated = (rng.random(200_000) < probs).astype(np.float32)
  assert stats.expected_calibration_error(probs, calibrated) < 0.01
  # Always 0.9, always wrong: |0 − 0.9| in the one occupied bin.
  assert stats.expected_calibration_error(
      np.full(10, 0.9), np.zeros(10)) == pytest.approx(0.9)


def test_separable_auc_lower_bound_is_exact_for_one_pair_and_tightens():
  # One pair ordered right: P = AUC ≥ 0.05.
  assert stats.separable_auc_lower_bound(1, 500) == pytest.approx(0.05)
  # k pairs all right with probability AUC^k: at the bound it is 5%.
  bound = stats.separable_auc_lower_bound(1000, 40)
  assert bound ** 40 == pytest.approx(0.05)
  assert (stats.separable_auc_lower_bound(10, 10) <
          stats.separable_auc_lower_bound(100, 1000) < 1.0)
  with pytest.raises(ValueError, match='need a positive and a negative'):
    stats.separable_auc_lower_bound(0, 10)
