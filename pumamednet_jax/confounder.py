"""A confounder in the latent space: find it, read it, ignore it, erase it.

Pure numpy and scikit-learn on latent codes (rows = images), so the
mechanics are tested on synthetic latents with a known confounder direction:

  rank_latents     latents ordered by how well each alone tells the confounder
  probe_auc        a held-out linear probe's AUC of the confounder from z
  nonlinear_probe_auc  the same with gradient-boosted trees: what erasing a
                   linear direction leaves behind
  ignore           chosen latents set to a constant (their training mean)
  randomise        chosen latents redrawn from their marginal
  fit_eraser       removes the one direction along which a linear classifier
                   reads the confounder (LEACE for a binary concept)
  auc_interval     a target's AUC with a stratified bootstrap interval
"""

import dataclasses

import numpy as np
from sklearn import ensemble
from sklearn import linear_model
from sklearn import metrics
from sklearn import pipeline
from sklearn import preprocessing

from pumamednet_jax import stats

# Ridge added to the covariance (relative to its mean variance) before it is
# inverted: latents the prior has collapsed have almost no variance.
COVARIANCE_RIDGE = 1e-6


def _check_binary(values: np.ndarray, name: str) -> np.ndarray:
  values = np.asarray(values).astype(int).ravel()
  if set(np.unique(values)) != {0, 1}:
    raise ValueError(f'{name} needs both values 0 and 1, got '
                     f'{sorted(set(np.unique(values)))}')
  return values


def rank_latents(latents: np.ndarray,
                 confounder: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Latents ordered by how well each alone separates the confounder.

  The score of a latent is |2 AUC − 1| (Somers' D) of its value as a score of
  the confounder: 0 for no relation, 1 for a perfect split, whatever the sign.

  Returns:
    (order, scores): latent indices, most tied first, and every latent's
    score (indexed by latent).
  """
  confounder = _check_binary(confounder, 'confounder')
  aucs = np.array([metrics.roc_auc_score(confounder, column)
                   for column in np.asarray(latents).T])
  scores = np.abs(2 * aucs - 1)
  return np.argsort(-scores, kind='stable'), scores


def latent_signs(latents: np.ndarray, confounder: np.ndarray) -> np.ndarray:
  """+1 where a latent is larger with the confounder, else −1."""
  confounder = _check_binary(confounder, 'confounder').astype(bool)
  difference = latents[confounder].mean(axis=0) - latents[~confounder].mean(
      axis=0)
  return np.where(difference >= 0, 1.0, -1.0)


def linear_probe(latents: np.ndarray, confounder: np.ndarray, *,
                 seed: int = 0) -> pipeline.Pipeline:
  """A logistic regression of the confounder on standardised latents."""
  probe = pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(max_iter=2000, random_state=seed))
  return probe.fit(latents, _check_binary(confounder, 'confounder'))


def probe_auc(fit_latents: np.ndarray, fit_confounder: np.ndarray,
              test_latents: np.ndarray, test_confounder: np.ndarray, *,
              seed: int = 0) -> float:
  """AUC on a held-out set of a linear probe of the confounder from z.

  0.5 when z no longer tells the confounder linearly; constant latents (an
  ignored latent) carry nothing and are harmless.
  """
  probe = linear_probe(fit_latents, fit_confounder, seed=seed)
  return float(metrics.roc_auc_score(
      _check_binary(test_confounder, 'test confounder'),
      probe.predict_proba(test_latents)[:, 1]))


def nonlinear_probe_auc(fit_latents: np.ndarray, fit_confounder: np.ndarray,
                        test_latents: np.ndarray, test_confounder: np.ndarray,
                        *, seed: int = 0) -> float:
  """AUC on a held-out set of gradient-boosted trees reading the confounder
  from z: 0.5 only when no function of z, linear or not, tells it."""
  probe = ensemble.HistGradientBoostingClassifier(random_state=seed).fit(
      fit_latents, _check_binary(fit_confounder, 'confounder'))
  return float(metrics.roc_auc_score(
      _check_binary(test_confounder, 'test confounder'),
      probe.predict_proba(test_latents)[:, 1]))


def ignore(latents: np.ndarray, columns, values: np.ndarray) -> np.ndarray:
  """A copy of `latents` with `columns` set to `values` (one per latent)."""
  ignored = np.array(latents, np.float32, copy=True)
  columns = np.asarray(columns, int)
  ignored[:, columns] = np.asarray(values, np.float32)[columns]
  return ignored


def randomise(latents: np.ndarray, columns, pool: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
  """A copy of `latents` with each of `columns` drawn, independently per
  latent and image, from that latent's values in `pool` (its marginal)."""
  randomised = np.array(latents, np.float32, copy=True)
  for column in np.asarray(columns, int):
    randomised[:, column] = pool[rng.integers(0, len(pool), len(latents)),
                                 column]
  return randomised


@dataclasses.dataclass(frozen=True)
class Eraser:
  """z ↦ z − direction · reading(z): the confounder's linear signal removed.

  `reading` = weights · (z − mean) is the linear discriminant's reading of
  the confounder, scaled so the two classes' means differ by 1, and
  `direction` is the difference of those means: after erasure both classes
  have the same mean, so no linear classifier reads the confounder (on the
  data the eraser was fitted on).
  """

  mean: np.ndarray
  weights: np.ndarray
  direction: np.ndarray

  def reading(self, latents: np.ndarray) -> np.ndarray:
    return (np.asarray(latents, np.float64) - self.mean) @ self.weights

  def __call__(self, latents: np.ndarray) -> np.ndarray:
    erased = (np.asarray(latents, np.float64)
              - np.outer(self.reading(latents), self.direction))
    return erased.astype(np.float32)


def fit_eraser(latents: np.ndarray, confounder: np.ndarray) -> Eraser:
  """The eraser of a binary confounder's linear signal in `latents`.

  LEACE (Belrose et al., 2023, "LEACE: Perfect linear concept erasure in
  closed form") for a binary concept: the cross-covariance of z and the
  concept is the class-mean difference δ, and the least-squares eraser is
  the oblique projection z − δ δᵀΣ⁻¹(z − μ) / δᵀΣ⁻¹δ. Written here in
  numpy: the authors' package needs PyTorch, which the analysis does not.
  """
  confounder = _check_binary(confounder, 'confounder').astype(bool)
  latents = np.asarray(latents, np.float64)
  mean = latents.mean(axis=0)
  delta = latents[confounder].mean(axis=0) - latents[~confounder].mean(axis=0)
  covariance = np.cov(latents, rowvar=False)
  ridge = COVARIANCE_RIDGE * max(np.trace(covariance) / len(covariance),
                                 1e-12)
  solved = np.linalg.solve(covariance + ridge * np.eye(len(covariance)), delta)
  return Eraser(mean=mean, weights=solved / float(delta @ solved),
                direction=delta)


def auc_interval(targets: np.ndarray, scores: np.ndarray, *,
                 num_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
  """AUC and its percentile bootstrap interval (`stats`' bootstrap,
  stratified by class: every resample keeps the split's class counts)."""
  targets = _check_binary(targets, 'targets').astype(np.float32)
  scores = np.asarray(scores, np.float64).ravel()
  resampling = stats.Resampling(
      len(scores), events=np.stack([targets > 0.5, targets < 0.5], axis=1),
      num_resamples=num_resamples, seed=seed)
  replicates = stats.bootstrap({'auc': stats.auc_statistic(scores, targets)},
                               resampling)['auc']
  low, high = stats.interval(replicates, level)
  return stats.auc(scores, targets), low, high
