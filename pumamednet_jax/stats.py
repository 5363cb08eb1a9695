"""Bootstrap confidence intervals, operating thresholds and calibration.

The bootstrap resamples clusters (patients, or single images where a data
set has no patient ids) within strata, and represents each resample as the
multiplicity of every example, a row of a (resamples, examples) weight
matrix. Statistics are functions of a block of such rows, computed for all
the rows of the block at once (AUC from cumulative weights in score order,
means as matrix products), so
2,000 resamples of 25,000 images take seconds, and every statistic sees the
same resamples (the mean AUC's interval comes from the per-label AUCs of each
resample).

Hand-written rather than `scipy.stats.bootstrap`: that resamples single
observations, unstratified, and calls the statistic with resampled data, so
it can neither resample by patient, nor keep both classes of every label in
each resample, nor share resamples between the labels of a mean.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses

import numpy as np
from sklearn import metrics as sk_metrics

# Resamples per block: bounds the weight matrix (block × examples floats).
BLOCK_SIZE = 200
# Redraws of the resamples that miss a required event before giving up.
MAX_REDRAWS = 1000

Statistic = Callable[[np.ndarray], np.ndarray]  # (r, n) weights → (r,)


@dataclasses.dataclass(frozen=True)
class Resampling:
  """How to resample a split of `n` examples.

  groups: (n,) cluster of each example (patient id), or None: each example
    is its own cluster.
  events: (n, E) booleans that every resample must hold at least once (e.g.
    "positive for label j", "negative for label j"); clusters are stratified
    by the rarest event they hold, so an event that is some stratum's own is
    in every resample, and resamples missing another are drawn again.
  """

  num_examples: int
  groups: np.ndarray | None = None
  events: np.ndarray | None = None
  num_resamples: int = 2000
  seed: int = 0

  @property
  def unit(self) -> str:
    return 'image' if self.groups is None else 'patient'


def _clusters(resampling: Resampling) -> tuple[np.ndarray, int]:
  """(n,) cluster index in 0..G-1 of each example, and G."""
  if resampling.groups is None:
    return np.arange(resampling.num_examples), resampling.num_examples
  _, cluster = np.unique(np.asarray(resampling.groups), return_inverse=True)
  return cluster.ravel(), int(cluster.max()) + 1


def _strata(cluster: np.ndarray, num_clusters: int,
            events: np.ndarray | None) -> np.ndarray:
  """(G,) stratum of each cluster: its rarest event (by clusters holding it);
  clusters holding none share one stratum."""
  stratum = np.full(num_clusters, -1)
  if events is None or not events.size:
    return stratum
  held = np.zeros((num_clusters, events.shape[1]), bool)
  np.logical_or.at(held, cluster, events)
  counts = held.sum(axis=0)
  for event in np.argsort(counts, kind='stable'):
    if counts[event]:
      stratum[held[:, event] & (stratum < 0)] = event
  return stratum


def _draw_counts(rng: np.random.Generator, members: list[np.ndarray],
                 rows: int, num_clusters: int) -> np.ndarray:
  """(rows, G) times each cluster is drawn: each stratum's clusters are drawn
  with replacement, as many as it has."""
  flat = []
  offsets = (np.arange(rows) * num_clusters)[:, None]
  for clusters in members:
    draws = rng.integers(0, len(clusters), size=(rows, len(clusters)))
    flat.append((offsets + clusters[draws]).ravel())
  counts = np.bincount(np.concatenate(flat), minlength=rows * num_clusters)
  return counts.reshape(rows, num_clusters)


def resample_weights(resampling: Resampling,
                     block_size: int = BLOCK_SIZE) -> Iterator[np.ndarray]:
  """Blocks of (r, n) float32 weights: how often each example is in each
  resample. The same `Resampling` gives the same blocks."""
  cluster, num_clusters = _clusters(resampling)
  stratum = _strata(cluster, num_clusters, resampling.events)
  members = [np.flatnonzero(stratum == s) for s in np.unique(stratum)]
  required = (None if resampling.events is None
              else resampling.events[:, resampling.events.any(axis=0)])
  rng = np.random.default_rng(resampling.seed)
  done = 0
  while done < resampling.num_resamples:
    rows = min(block_size, resampling.num_resamples - done)
    counts = _draw_counts(rng, members, rows, num_clusters)
    for _ in range(MAX_REDRAWS):
      missing = (np.zeros(rows, bool) if required is None else
                 np.any(counts[:, cluster] @ required == 0, axis=1))
      if not missing.any():
        break
      counts[missing] = _draw_counts(rng, members, int(missing.sum()),
                                     num_clusters)
    else:
      raise ValueError(f'{MAX_REDRAWS} redraws of the bootstrap still miss a '
                       'class of some label')
    yield counts[:, cluster].astype(np.float32)
    done += rows


def bootstrap(statistics: Mapping[str, Statistic],
              resampling: Resampling) -> dict[str, np.ndarray]:
  """(R,) replicates of each statistic, all over the same resamples."""
  blocks = {name: [] for name in statistics}
  for weights in resample_weights(resampling):
    for name, statistic in statistics.items():
      blocks[name].append(statistic(weights))
  return {name: np.concatenate(parts) for name, parts in blocks.items()}


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval of the replicates."""
  tail = 50 * (1 - level)
  low, high = np.percentile(replicates, [tail, 100 - tail])
  return float(low), float(high)


def auc_statistic(scores: np.ndarray, targets: np.ndarray,
                  known: np.ndarray | None = None) -> Statistic:
  """Weighted ROC AUC (ties count one half), vectorised over resamples: the
  negatives sorted by score once; per resample, each positive's weight times
  the cumulative weight of the negatives below its score."""
  index = np.arange(len(scores)) if known is None else np.flatnonzero(known)
  positive = np.asarray(targets)[index] > 0.5
  pos, neg = index[positive], index[~positive]
  neg = neg[np.argsort(scores[neg], kind='stable')]
  left = np.searchsorted(scores[neg], scores[pos], side='left')
  right = np.searchsorted(scores[neg], scores[pos], side='right')

  def statistic(weights: np.ndarray) -> np.ndarray:
    below = np.zeros((weights.shape[0], len(neg) + 1), np.float32)
    np.cumsum(weights[:, neg], axis=1, out=below[:, 1:])
    pos_weights = weights[:, pos]
    # A positive beats the negatives below it and ties half of those equal.
    wins = np.einsum('rp,rp->r', pos_weights,
                     below[:, left] + below[:, right], dtype=np.float64)
    return 0.5 * wins / (pos_weights.sum(axis=1, dtype=np.float64) *
                         below[:, -1].astype(np.float64))

  return statistic


def mean_statistic(values: np.ndarray,
                   known: np.ndarray | None = None) -> Statistic:
  """Weighted mean of per-example values (over the known ones)."""
  weights_of = (np.ones(len(values), np.float32) if known is None
                else np.asarray(known, np.float32))
  values = np.where(weights_of > 0, values, 0).astype(np.float32)

  def statistic(weights: np.ndarray) -> np.ndarray:
    return (weights @ values) / (weights @ weights_of)

  return statistic


def auc(scores: np.ndarray, targets: np.ndarray) -> float:
  """scikit-learn's ROC AUC."""
  return float(sk_metrics.roc_auc_score(targets > 0.5, scores))


def separable_auc_lower_bound(num_pos: int, num_neg: int,
                              level: float = 0.95) -> float:
  """A one-sided lower confidence bound on the AUC of a score that separates
  every positive from every negative in the sample.

  The bootstrap cannot give one (every resample separates too, so its
  interval has no width). Written by hand (no library has it): pair
  min(num_pos, num_neg) positives with as many negatives, disjointly; each
  pair is ordered correctly with probability AUC, independently, so all k
  are with probability AUC^k, and AUC^k >= 1 − level bounds it (the exact
  Clopper–Pearson bound for k successes in k trials). Conservative: it uses
  k pairs of the num_pos × num_neg.
  """
  pairs = min(num_pos, num_neg)
  if pairs < 1:
    raise ValueError(f'need a positive and a negative, got {num_pos} and '
                     f'{num_neg}')
  return float((1.0 - level) ** (1.0 / pairs))


def youden_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
  """The threshold maximising sensitivity + specificity − 1 (Youden's J);
  an example is called positive when its score is at least the threshold."""
  fpr, tpr, thresholds = sk_metrics.roc_curve(targets > 0.5, scores)
  finite = np.isfinite(thresholds)
  best = np.argmax(np.where(finite, tpr - fpr, -np.inf))
  return float(thresholds[best])


def operating_point(scores: np.ndarray, targets: np.ndarray,
                    threshold: float) -> tuple[float, float]:
  """(sensitivity, specificity) of calling score >= threshold positive."""
  positive = targets > 0.5
  called = scores >= threshold
  return float(np.mean(called[positive])), float(np.mean(~called[~positive]))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray,
                               num_bins: int = 10) -> float:
  """Σ over equal-width probability bins of (bin share) × |observed rate −
  mean probability|. scikit-learn's calibration_curve gives the per-bin
  rates but drops the bin sizes this weighting needs."""
  bins = np.clip((probs * num_bins).astype(int), 0, num_bins - 1)
  count = np.bincount(bins, minlength=num_bins)
  rate = np.bincount(bins, weights=targets > 0.5, minlength=num_bins)
  confidence = np.bincount(bins, weights=probs, minlength=num_bins)
  return float(np.sum(np.abs(rate - confidence)) / len(probs))
