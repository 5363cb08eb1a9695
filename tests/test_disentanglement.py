"""Disentanglement metrics: properties in the manner of disentanglement_lib's tests."""

import numpy as np
import pytest

from pumamednet_jax import disentanglement as dis

NUM = 3000
# Two binary factors and three continuous ones.
CATEGORICAL = np.array([True, True, False, False, False])


def draw_factors(rng: np.random.Generator, count: int) -> np.ndarray:
  return np.stack([rng.integers(0, 2, count), rng.integers(0, 2, count),
                   rng.random(count), rng.random(count), rng.random(count)],
                  axis=1).astype(np.float64)


def scores(represent, seed=0):
  """All metrics of the code `represent(factors)` on fresh synthetic factors."""
  rng = np.random.default_rng(seed)
  train, test = draw_factors(rng, NUM), draw_factors(rng, NUM)
  codes_train, codes_test = represent(train), represent(test)
  binned = dis.discretize_factors(train, CATEGORICAL)
  mig, per_factor, _ = dis.mig(codes_train, binned)
  dci = dis.dci(codes_train, train, codes_test, test, CATEGORICAL)
  sap, _ = dis.sap(codes_train, train, codes_test, test, CATEGORICAL)

  def fixed_factor_codes(fixed, rng):
    batches = np.stack([draw_factors(rng, dis.FACTOR_VAE_BATCH)
                        for _ in fixed])
    for batch, factor in zip(batches, fixed):
      batch[:, factor] = batch[0, factor]
    return np.stack([represent(batch) for batch in batches])

  factor_vae = dis.factor_vae_score(
      fixed_factor_codes, train.shape[1], codes_train.var(axis=0, ddof=1), rng,
      num_train_votes=300, num_eval_votes=150)
  values = {'mig': mig, 'dci_disentanglement': dci['disentanglement'],
            'dci_completeness': dci['completeness'],
            'dci_informativeness': dci['informativeness'], 'sap': sap,
            'factor_vae': factor_vae['eval_accuracy']}
  for name, value in values.items():
    assert 0.0 <= value <= 1.0, (name, value)
  assert per_factor.shape == (train.shape[1],)
  return values


def test_identity_code_scores_high_on_every_metric():
  values = scores(lambda factors: factors.copy())
  for name, value in values.items():
    assert value >= 0.9, (name, value)


def test_random_code_scores_low():
  rng = np.random.default_rng(7)
  values = scores(lambda factors: rng.normal(size=(len(factors), 10)))
  assert values['mig'] <= 0.2
  assert values['sap'] <= 0.2
  assert values['dci_informativeness'] < 0.7


def test_duplicated_latent_gives_low_mig():
  values = scores(lambda factors: np.hstack([factors, factors]))
  assert values['mig'] <= 0.1
  assert values['sap'] <= 0.1
  # Each factor is in two latents: complete no more, but still disentangled.
  assert values['dci_disentanglement'] >= 0.9
  assert values['dci_completeness'] < 0.8


def test_mixing_two_factors_lowers_dci_disentanglement():
  def mixed(factors):
    code = factors.copy()
    code[:, 2], code[:, 3] = factors[:, 2] + factors[:, 3], factors[:, 2] - factors[:, 3]
    return code
  identity = scores(lambda factors: factors.copy())
  assert scores(mixed)['dci_disentanglement'] < identity[
      'dci_disentanglement'] - 0.1


def test_collapsed_latents_are_pruned_and_never_vote():
  rng = np.random.default_rng(3)
  factors = draw_factors(rng, 500)
  code = np.hstack([factors, 0.01 * rng.normal(size=(500, 3))])
  result = dis.dci(code, factors, code, factors, CATEGORICAL)
  assert np.all(result['importance'][5:] == 0)
  assert result['importance'][:5].sum() > 0
  variance = code.var(axis=0, ddof=1)
  votes = dis.factor_vae_votes(
      lambda fixed, rng: np.stack([code[:64]] * len(fixed)), 5, variance, 20, rng)
  assert votes[:, 5:].sum() == 0 and votes.sum() == 20


@pytest.mark.parametrize('importance, disentanglement, completeness', [
    (np.diag([5.0] * 5), 1.0, 1.0),
    (np.vstack([np.diag([5.0] * 5)] * 2), 1.0, 1 - np.log(2) / np.log(10)),
    (np.hstack([np.diag([5.0] * 5)] * 2), 1 - np.log(2) / np.log(10), 1.0),
    (np.zeros((4, 4)), 0.0, 0.0),
])
def test_dci_of_known_importance_matrices(importance, disentanglement,
                                          completeness):
  assert dis.dci_disentanglement(importance) == pytest.approx(
      disentanglement, abs=1e-6)
  assert dis.dci_completeness(importance) == pytest.approx(completeness,
                                                           abs=1e-6)


def test_factor_bins_are_equal_frequency_with_atoms_apart():
  rng = np.random.default_rng(0)
  uniform = rng.random(10_000)
  counts = np.bincount(dis.discretize_factor(uniform, 10))
  assert len(counts) == 10 and counts.min() >= 990 and counts.max() <= 1010
  # A severity: absent (0) in 80 %, else in [0.6, 1].
  severity = np.where(rng.random(10_000) < 0.8, 0.0, 0.6 + 0.4 * uniform)
  binned = dis.discretize_factor(severity, 10)
  assert np.all(binned[severity == 0] == 0)
  assert np.all(binned[severity > 0] > 0)
  assert len(np.unique(binned)) == 10
  # A factor with few values keeps them as classes.
  np.testing.assert_array_equal(
      dis.discretize_factor(np.array([2.0, 5.0, 2.0, 7.0]), 10), [0, 1, 0, 2])


def test_constant_factor_is_a_clear_error():
  factors = np.zeros((50, 1), np.int64)
  with pytest.raises(ValueError, match=r"factors \['heart_size'\] are constant"):
    dis.mig(np.random.default_rng(0).normal(size=(50, 3)), factors,
            ['heart_size'])
