"""The confounder mechanics on synthetic latents with a known confounder."""

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics

from pumamednet_jax import confounder as confounder_lib

NUM_LATENTS = 16
TARGET_LATENT = 0
# The confounder's latents, when it is concentrated in a few.
CONFOUNDER_LATENTS = (3, 7)


def _latents(count, seed, *, spread=False, with_target=0.8):
  """(latents, target, confounder): the confounder follows the target with
  probability `with_target` (is its opposite when -1) and lives in
  CONFOUNDER_LATENTS, or (spread) a little in each of 12 latents mixed with
  their noise."""
  rng = np.random.default_rng(seed)
  target = rng.random(count) < 0.3
  follows = rng.random(count) < with_target
  confounder = np.where(follows, target, rng.random(count) < 0.3)
  if with_target == -1:
    confounder = ~target
  latents = rng.standard_normal((count, NUM_LATENTS)).astype(np.float32)
  latents[:, TARGET_LATENT] += 2.5 * target
  if spread:
    weights = np.zeros(NUM_LATENTS)
    weights[4:] = 0.8
    latents += np.outer(confounder, weights).astype(np.float32)
  else:
    for column, weight in zip(CONFOUNDER_LATENTS, (3.0, 1.5)):
      latents[:, column] += weight * confounder
  return latents, target.astype(int), confounder.astype(int)


def test_ranking_finds_the_confounder_latents_in_order():
  latents, target, confounder = _latents(3000, 0, with_target=0.0)
  order, scores = confounder_lib.rank_latents(latents, confounder)
  assert tuple(order[:2]) == CONFOUNDER_LATENTS
  assert scores[3] > scores[7] > 0.5
  others = np.delete(scores, CONFOUNDER_LATENTS)
  assert others.max() < 0.1
  np.testing.assert_array_equal(
      confounder_lib.latent_signs(latents, confounder)[list(
          CONFOUNDER_LATENTS)], [1.0, 1.0])
  _, target_scores = confounder_lib.rank_latents(-latents, target)
  assert np.argmax(target_scores) == TARGET_LATENT   # whatever the sign


def test_ignoring_the_ranked_latents_removes_a_concentrated_confounder():
  fit, _, fit_confounder = _latents(3000, 1, with_target=0.0)
  test, _, test_confounder = _latents(2000, 2, with_target=0.0)
  before = confounder_lib.probe_auc(fit, fit_confounder, test,
                                    test_confounder)
  order, _ = confounder_lib.rank_latents(fit, fit_confounder)
  means = fit.mean(axis=0)
  ignored = [confounder_lib.ignore(x, order[:2], means) for x in (fit, test)]
  after = confounder_lib.probe_auc(ignored[0], fit_confounder, ignored[1],
                                   test_confounder)
  assert before > 0.95
  assert abs(after - 0.5) < 0.05
  np.testing.assert_array_equal(ignored[1][:, order[:2]],
                                np.broadcast_to(means[order[:2]], (2000, 2)))
  np.testing.assert_array_equal(np.delete(ignored[1], order[:2], axis=1),
                                np.delete(test, order[:2], axis=1))


def test_a_spread_confounder_survives_ignoring_but_not_erasure():
  fit, fit_target, fit_confounder = _latents(4000, 3, spread=True,
                                             with_target=0.0)
  test, test_target, test_confounder = _latents(3000, 4, spread=True,
                                                with_target=0.0)
  order, _ = confounder_lib.rank_latents(fit, fit_confounder)
  ignored = [confounder_lib.ignore(x, order[:3], fit.mean(axis=0))
             for x in (fit, test)]
  assert confounder_lib.probe_auc(ignored[0], fit_confounder, ignored[1],
                                  test_confounder) > 0.85
  eraser = confounder_lib.fit_eraser(fit, fit_confounder)
  erased_fit, erased_test = eraser(fit), eraser(test)
  # Both classes have the same mean where the eraser was fitted.
  means = [erased_fit[fit_confounder == c].mean(axis=0) for c in (0, 1)]
  np.testing.assert_allclose(means[0], means[1], atol=1e-4)
  assert abs(confounder_lib.probe_auc(
      erased_fit, fit_confounder, erased_test, test_confounder) - 0.5) < 0.05
  # The target, on another direction, is still read as well.
  def target_auc(train_latents, test_latents):
    head = linear_model.LogisticRegression().fit(train_latents, fit_target)
    return metrics.roc_auc_score(test_target,
                                 head.predict_proba(test_latents)[:, 1])
  assert target_auc(erased_fit, erased_test) > target_auc(fit, test) - 0.02
  assert target_auc(erased_fit, erased_test) > 0.9


def test_erasure_removes_a_confounded_shortcut_from_a_refitted_head():
  # Training data where the confounder follows the target; an eraser fitted
  # on deconfounded data; the head read on anti-correlated data.
  train, train_target, _ = _latents(4000, 5, spread=True, with_target=0.9)
  fit, _, fit_confounder = _latents(3000, 6, spread=True, with_target=0.0)
  test, test_target, _ = _latents(3000, 7, spread=True, with_target=-1)
  eraser = confounder_lib.fit_eraser(fit, fit_confounder)
  def anti_auc(transform):
    head = linear_model.LogisticRegression().fit(transform(train),
                                                 train_target)
    return metrics.roc_auc_score(test_target,
                                 head.predict_proba(transform(test))[:, 1])
  shortcut, erased = anti_auc(lambda x: x), anti_auc(eraser)
  assert erased > shortcut + 0.1, (shortcut, erased)


def test_erasure_leaves_a_confounder_that_only_a_nonlinear_probe_reads():
  # The confounder widens two latents without moving their mean: invisible
  # to a linear probe and to the eraser, plain to gradient-boosted trees.
  rng = np.random.default_rng(9)
  def widened(count):
    confounder = (rng.random(count) < 0.5).astype(int)
    latents = rng.standard_normal((count, NUM_LATENTS)).astype(np.float32)
    latents[:, list(CONFOUNDER_LATENTS)] *= np.where(confounder, 3.0, 1.0)[:, None]
    return latents, confounder
  (fit, fit_confounder), (test, test_confounder) = widened(3000), widened(2000)
  eraser = confounder_lib.fit_eraser(fit, fit_confounder)
  for latents in ((fit, test), (eraser(fit), eraser(test))):
    assert abs(confounder_lib.probe_auc(
        latents[0], fit_confounder, latents[1], test_confounder) - 0.5) < 0.05
    assert confounder_lib.nonlinear_probe_auc(
        latents[0], fit_confounder, latents[1], test_confounder) > 0.8


def test_randomise_draws_each_latent_from_its_marginal():
  latents, _, confounder = _latents(3000, 8, with_target=0.0)
  pool = latents[:1000]
  randomised = confounder_lib.randomise(latents, CONFOUNDER_LATENTS, pool,
                                        np.random.default_rng(0))
  for column in CONFOUNDER_LATENTS:
    assert set(randomised[:, column]) <= set(pool[:, column])
    assert abs(metrics.roc_auc_score(confounder, randomised[:, column])
               - 0.5) < 0.05
  np.testing.assert_array_equal(
      np.delete(randomised, CONFOUNDER_LATENTS, axis=1),
      np.delete(latents, CONFOUNDER_LATENTS, axis=1))


def test_auc_interval_holds_the_auc_and_narrows_with_more_data():
  rng = np.random.default_rng(9)
  def interval(count, seed=0):
    targets = rng.random(count) < 0.2
    scores = targets + rng.standard_normal(count)
    auc, low, high = confounder_lib.auc_interval(targets, scores, seed=seed)
    assert auc == pytest.approx(metrics.roc_auc_score(targets, scores))
    assert low < auc < high
    return high - low
  assert interval(4000) < 0.6 * interval(400)
  targets = np.arange(10) % 2
  assert confounder_lib.auc_interval(targets, targets + 0.5) == (1.0, 1.0,
                                                                 1.0)
  with pytest.raises(ValueError, match='targets needs both values'):
    confounder_lib.auc_interval(np.zeros(5), np.arange(5))
