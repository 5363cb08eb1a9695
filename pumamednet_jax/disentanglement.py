"""Disentanglement metrics of a code against known generating factors.

MIG, DCI, SAP and the FactorVAE score as disentanglement_lib defines them
(Locatello et al. 2019), in numpy and scikit-learn; that library itself pins
TensorFlow 1 and gin. A code is (examples, latents), the encoder mean; factors
are (examples, factors), with a mask of which factors are categorical (their
values are class labels) and which are ordered (continuous, or a severity).

Where a metric needs discrete factors (MIG's mutual information), ordered
factors are cut into `FACTOR_BINS` equal-frequency bins (quantiles of the
sample); a value that alone holds more than a bin's share of the sample (a
severity's 0, 'absent') is a bin of its own. Latents are cut into
`LATENT_BINS` equal-width bins, as disentanglement_lib's histogram
discretizer.

Every score lies in [0, 1]; the defaults (10,000 training and 5,000 test
points, FactorVAE batches of 64, latents with std < 0.05 pruned) are
disentanglement_lib's.
"""

from collections.abc import Callable

import numpy as np
from joblib import Parallel, delayed
from scipy import stats
from sklearn import ensemble
from sklearn import metrics as sk_metrics
from sklearn import svm

NUM_TRAIN = 10_000
NUM_TEST = 5_000
LATENT_BINS = 20
FACTOR_BINS = 10
# Latents whose encoder mean varies less than this are collapsed to the prior.
ACTIVE_STD = 0.05
FACTOR_VAE_BATCH = 64
FACTOR_VAE_TRAIN_VOTES = 10_000
FACTOR_VAE_EVAL_VOTES = 5_000


def discretize_latents(codes: np.ndarray,
                       num_bins: int = LATENT_BINS) -> np.ndarray:
  """Each latent cut into `num_bins` equal-width bins over its range."""
  binned = np.zeros(codes.shape, np.int64)
  for i in range(codes.shape[1]):
    edges = np.histogram_bin_edges(codes[:, i], num_bins)
    binned[:, i] = np.digitize(codes[:, i], edges[1:-1])
  return binned


def discretize_factor(values: np.ndarray,
                      num_bins: int = FACTOR_BINS) -> np.ndarray:
  """Class labels of one factor: its values if it takes at most `num_bins`,
  else equal-frequency bins, with each value that holds more than a bin's
  share of the sample (an atom, e.g. a severity's 0) a bin of its own."""
  values = np.asarray(values, np.float64)
  distinct, classes = np.unique(values, return_inverse=True)
  if len(distinct) <= num_bins:
    return classes
  counts = np.bincount(classes)
  atoms = distinct[counts > len(values) / num_bins]
  binned = np.full(len(values), -1, np.int64)
  for index, atom in enumerate(atoms):
    binned[values == atom] = index
  rest = binned < 0
  num_rest_bins = num_bins - len(atoms)
  edges = np.quantile(values[rest], np.linspace(0, 1, num_rest_bins + 1)[1:-1])
  binned[rest] = len(atoms) + np.searchsorted(edges, values[rest], side='right')
  return binned


def discretize_factors(factors: np.ndarray, categorical: np.ndarray,
                       num_bins: int = FACTOR_BINS) -> np.ndarray:
  """`discretize_factor` of every column; categorical columns keep their
  classes whatever their number."""
  return np.stack([
      np.unique(column, return_inverse=True)[1] if is_categorical else
      discretize_factor(column, num_bins)
      for column, is_categorical in zip(factors.T, categorical)], axis=1)


def mutual_information(binned_codes: np.ndarray,
                       binned_factors: np.ndarray) -> np.ndarray:
  """(latents, factors) mutual information in nats (scikit-learn's)."""
  return np.array([[sk_metrics.mutual_info_score(factor, latent)
                    for factor in binned_factors.T]
                   for latent in binned_codes.T])


def entropies(binned_factors: np.ndarray) -> np.ndarray:
  """Entropy of each discrete factor in nats (its mutual information with itself)."""
  return np.array([sk_metrics.mutual_info_score(factor, factor)
                   for factor in binned_factors.T])


def mig(codes: np.ndarray, binned_factors: np.ndarray,
        factor_names=None) -> tuple[float, np.ndarray, np.ndarray]:
  """Mutual information gap (Chen et al. 2018).

  Per factor, the gap between the two latents most informative about it,
  divided by the factor's entropy. Returns (mean over factors, per factor,
  the (latents, factors) mutual information divided by each factor's entropy).
  """
  if codes.shape[1] < 2:
    raise ValueError(f'MIG needs at least 2 latents, got {codes.shape[1]}')
  entropy = entropies(binned_factors)
  if np.any(entropy <= 0):
    names = factor_names or range(binned_factors.shape[1])
    constant = [str(n) for n, h in zip(names, entropy) if h <= 0]
    raise ValueError(f'factors {constant} are constant in the sample of '
                     f'{len(codes)}; draw more samples')
  information = mutual_information(discretize_latents(codes), binned_factors)
  top = np.sort(information, axis=0)[::-1]
  per_factor = (top[0] - top[1]) / entropy
  return float(per_factor.mean()), per_factor, information / entropy


def _entropy_score(weights: np.ndarray) -> np.ndarray:
  """1 − entropy of each row of `weights` (normalised), in base of its length."""
  return 1.0 - stats.entropy(weights.T + 1e-11, base=weights.shape[1])


def dci_disentanglement(importance: np.ndarray) -> float:
  """Per latent, 1 − entropy of its importance over the factors, weighted by
  the latent's share of the total importance (Eastwood & Williams 2018)."""
  per_latent = _entropy_score(importance)
  if importance.sum() == 0:
    importance = np.ones_like(importance)
  return float(np.sum(per_latent * importance.sum(axis=1) / importance.sum()))


def dci_completeness(importance: np.ndarray) -> float:
  """Per factor, 1 − entropy of its importance over the latents, weighted."""
  return dci_disentanglement(importance.T)


def _fit_gradient_boosting(x_train, y_train, x_test, y_test, categorical: bool):
  """Importances of the features for one factor, and the test score."""
  if categorical:
    model = ensemble.GradientBoostingClassifier(random_state=0)
    model.fit(x_train, y_train)
    score = float(np.mean(model.predict(x_test) == y_test))
  else:
    model = ensemble.GradientBoostingRegressor(random_state=0)
    model.fit(x_train, y_train)
    score = max(0.0, float(sk_metrics.r2_score(y_test, model.predict(x_test))))
  return np.abs(model.feature_importances_), score


def dci(codes_train: np.ndarray, factors_train: np.ndarray,
        codes_test: np.ndarray, factors_test: np.ndarray,
        categorical: np.ndarray, *, active_std: float = ACTIVE_STD,
        n_jobs: int = 1) -> dict[str, object]:
  """DCI disentanglement, completeness and informativeness.

  Importances are scikit-learn's impurity importances of gradient-boosted
  trees (default settings, as disentanglement_lib): a classifier for a
  categorical factor, whose informativeness is its test accuracy (as
  disentanglement_lib); a regressor for an ordered one (Eastwood & Williams'
  regression setting; a classifier over its bins would fit one tree per bin
  and stage), whose informativeness is its test R² (clipped at 0).
  Informativeness is the mean over factors. Latents with std < `active_std`
  get importance 0 and are left out of the fits (they would only slow them).
  """
  active = codes_train.std(axis=0) >= active_std

  def features(codes):
    # With no active latent the trees see one constant feature: the prior.
    return codes[:, active] if active.any() else np.zeros((len(codes), 1))

  fits = Parallel(n_jobs=n_jobs, prefer='threads')(
      delayed(_fit_gradient_boosting)(features(codes_train), factors_train[:, j],
                                      features(codes_test), factors_test[:, j],
                                      bool(categorical[j]))
      for j in range(factors_train.shape[1]))
  importance = np.zeros((codes_train.shape[1], factors_train.shape[1]))
  if active.any():
    for j, (weights, _) in enumerate(fits):
      importance[active, j] = weights
  scores = np.array([score for _, score in fits])
  return {
      'disentanglement': dci_disentanglement(importance),
      'completeness': dci_completeness(importance),
      'informativeness': float(scores.mean()),
      'informativeness_per_factor': scores,
      'importance': importance,
  }


def _squared_correlation(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
  """R² of a one-feature linear regression of `values` on each latent."""
  centred_codes = codes - codes.mean(axis=0)
  centred = values - values.mean()
  covariance = centred @ centred_codes
  variance = (centred_codes**2).sum(axis=0) * (centred**2).sum()
  safe = variance > 1e-12
  return np.where(safe, covariance**2 / np.where(safe, variance, 1.0), 0.0)


def _one_feature_classifier_score(latent_train, y_train, latent_test, y_test):
  """Chance-adjusted balanced test accuracy of a linear classifier on one latent."""
  if np.ptp(latent_train) == 0:
    return 0.0
  classifier = svm.LinearSVC(C=0.01, class_weight='balanced')
  classifier.fit(latent_train[:, None], y_train)
  score = sk_metrics.balanced_accuracy_score(
      y_test, classifier.predict(latent_test[:, None]), adjusted=True)
  return max(0.0, float(score))


def sap(codes_train: np.ndarray, factors_train: np.ndarray,
        codes_test: np.ndarray, factors_test: np.ndarray,
        categorical: np.ndarray) -> tuple[float, np.ndarray]:
  """Separated attribute predictability (Kumar et al. 2018).

  A (latents, factors) matrix of how well each latent alone predicts each
  factor; per factor the gap between its two best latents; their mean.
  Ordered factor: R² of a one-feature linear regression (disentanglement_lib's
  continuous variant). Categorical factor: a one-feature linear classifier
  (LinearSVC, C = 0.01, balanced classes, as disentanglement_lib's discrete
  variant) scored by its balanced test accuracy adjusted for chance, so that
  a latent that knows nothing scores 0 for any number of classes.
  Returns (the score, the matrix).
  """
  scores = np.zeros((codes_train.shape[1], factors_train.shape[1]))
  for j in range(factors_train.shape[1]):
    if categorical[j]:
      scores[:, j] = [_one_feature_classifier_score(
          codes_train[:, i], factors_train[:, j], codes_test[:, i],
          factors_test[:, j]) for i in range(codes_train.shape[1])]
    else:
      scores[:, j] = _squared_correlation(codes_train, factors_train[:, j])
  top = np.sort(scores, axis=0)[::-1]
  return float(np.mean(top[0] - top[1])), scores


# Codes of batches of examples that share one factor: given the factor of
# each batch (an int array), codes of shape (batches, batch size, latents).
FixedFactorCodes = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def factor_vae_votes(codes_with_fixed_factor: FixedFactorCodes,
                     num_factors: int, global_variance: np.ndarray,
                     num_votes: int, rng: np.random.Generator,
                     batches_per_call: int = 16) -> np.ndarray:
  """(factors, latents) votes: per batch sharing one random factor, the
  active latent of least variance relative to its variance over all data."""
  active = np.flatnonzero(np.sqrt(global_variance) >= ACTIVE_STD)
  votes = np.zeros((num_factors, len(global_variance)), np.int64)
  for start in range(0, num_votes, batches_per_call):
    fixed = rng.integers(num_factors, size=min(batches_per_call,
                                               num_votes - start))
    codes = codes_with_fixed_factor(fixed, rng)
    local = codes[:, :, active].var(axis=1, ddof=1)
    chosen = active[np.argmin(local / global_variance[active], axis=1)]
    np.add.at(votes, (fixed, chosen), 1)
  return votes


def factor_vae_score(codes_with_fixed_factor: FixedFactorCodes,
                     num_factors: int, global_variance: np.ndarray,
                     rng: np.random.Generator, *,
                     num_train_votes: int = FACTOR_VAE_TRAIN_VOTES,
                     num_eval_votes: int = FACTOR_VAE_EVAL_VOTES,
                     batches_per_call: int = 16) -> dict[str, float]:
  """The FactorVAE score (Kim & Mnih 2018): the accuracy of a majority-vote
  classifier that names the fixed factor from the latent of least variance.

  `global_variance` is each latent's variance over the data (ddof=1);
  latents with std < ACTIVE_STD never vote. A code with no active latent
  scores 0.
  """
  num_active = int(np.sum(np.sqrt(global_variance) >= ACTIVE_STD))
  if num_active == 0:
    return {'train_accuracy': 0.0, 'eval_accuracy': 0.0, 'num_active': 0}
  votes = lambda count: factor_vae_votes(
      codes_with_fixed_factor, num_factors, global_variance, count, rng,
      batches_per_call)
  train_votes = votes(num_train_votes)
  classifier = np.argmax(train_votes, axis=0)  # factor named by each latent
  latents = np.arange(train_votes.shape[1])
  eval_votes = votes(num_eval_votes)
  accuracy = lambda v: float(v[classifier, latents].sum() / max(v.sum(), 1))
  return {'train_accuracy': accuracy(train_votes),
          'eval_accuracy': accuracy(eval_votes), 'num_active': num_active}
