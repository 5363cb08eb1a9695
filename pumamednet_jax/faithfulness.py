"""How faithful explanations are: monotonicity and specificity of edits as
independent judges see them, and whether the latents ranked most relevant
carry what a head reads (ablation)."""

import numpy as np
from scipy import stats

from input_pipeline import heads as heads_lib
from input_pipeline import labels as labels_lib
from pumamednet_jax import judge as judge_lib
from pumamednet_jax import latent as latent_lib
from pumamednet_jax import stats as stats_lib

NUM_ABLATED = 5  # latents set to their means in the ablation test
RANDOM_DRAWS = 20  # draws of random latents it is compared with
ABLATION_CURVE = (1, 2, 5, 10, 20, 50)
# The model's output that scores each metadata attribute's group 1.
MODEL_OUTPUT = {judge_lib.HEALTH: labels_lib.NO_FINDING,
                judge_lib.SEX: 'sex', judge_lib.VIEW: 'view',
                judge_lib.AGE: heads_lib.AGE_ABOVE_MEDIAN}


def model_output(attribute: str, outputs) -> str:
  """The model's output that scores `attribute` (its group 1)."""
  name = MODEL_OUTPUT.get(attribute, attribute)
  names = [o.name for o in outputs]
  if name == heads_lib.AGE_ABOVE_MEDIAN and name not in names:
    name = 'age'
  return name


def attribute_of_output(name: str) -> str | None:
  """The attribute whose labels give output `name` its AUC (or None)."""
  for attribute, output in MODEL_OUTPUT.items():
    if output == name:
      return attribute
  return name if name in labels_lib.FINDINGS else None


def median_rho(steps, values: np.ndarray) -> float:
  """Median over rows of Spearman's ρ between `steps` and the row; a
  constant row counts ρ = 0 (it does not follow the steps)."""
  rhos = []
  for row in values:
    rho = (stats.spearmanr(steps, row).statistic
           if np.ptp(row) > 0 else 0.0)
    rhos.append(0.0 if np.isnan(rho) else rho)
  return float(np.median(rhos))


def specificity(judged: dict[str, np.ndarray], target: str,
                others) -> tuple[float, dict[str, float]]:
  """Median over images of max over `others` of |Δ other| / |Δ target|,
  Δ from the first frame to the last; and the median of each other's."""
  delta = {name: np.abs(judged[name][:, -1] - judged[name][:, 0])
           for name in (target, *others)}
  base = np.maximum(delta[target], 1e-6)
  if not others:
    return 0.0, {}
  ratios = {name: delta[name] / base for name in others}
  worst = np.max(np.stack(list(ratios.values())), axis=0)
  return float(np.median(worst)), {name: float(np.median(r))
                                   for name, r in ratios.items()}


def judge_change(judged: dict[str, np.ndarray]) -> dict[str, float]:
  """Median over images of |last frame − first frame| of every judge."""
  return {name: float(np.median(np.abs(v[:, -1] - v[:, 0])))
          for name, v in judged.items()}


def judge_frames(judges: judge_lib.Judges, frames: np.ndarray
                 ) -> dict[str, np.ndarray]:
  """(N, A, S, S) frames → {judge name: (N, A)}."""
  count, steps = frames.shape[:2]
  return {name: value.reshape(count, steps) for name, value in
          judges.predict(frames.reshape(-1, *frames.shape[2:])).items()}


def _auc(target: np.ndarray, score: np.ndarray) -> float:
  if len(np.unique(target)) < 2:
    return float('nan')
  return stats_lib.auc(score, target)


def greedy_ablation(model, z, target, column: int, count: int):
  """The latents, chosen one at a time with the labels, whose ablation
  lowers the AUC of output `column` most, and the AUC after each choice.

  An optimistic bound on what any ranking of `count` latents can do (it
  sees the labels it is measured on): when even it moves the AUC little,
  the classifier spreads what it reads over many latents.
  """
  mean = z.mean(axis=0)
  chosen = np.zeros(z.shape[1], bool)
  aucs = []
  for _ in range(min(count, z.shape[1])):
    candidates = np.flatnonzero(~chosen)
    masks = np.repeat(chosen[None], len(candidates), axis=0)
    masks[np.arange(len(candidates)), candidates] = True
    scores = model.masked_logits(z, masks, mean)[:, :, column]
    # AUC = Mann-Whitney U / (positives × negatives), for every candidate.
    positive = target.astype(bool)
    u = stats.mannwhitneyu(scores[:, positive], scores[:, ~positive],
                           axis=1).statistic
    candidate_aucs = u / (positive.sum() * (~positive).sum())
    best = int(np.argmin(candidate_aucs))
    chosen[candidates[best]] = True
    aucs.append(float(candidate_aucs[best]))
  return np.flatnonzero(chosen), aucs


def ablation(model, z, examples, relevance: np.ndarray, seed: int,
             greedy: bool = False) -> dict:
  """Per head with an AUC: the AUC drop with its top NUM_ABLATED latents set
  to their means, against NUM_ABLATED random latents (mean of RANDOM_DRAWS),
  and the AUC after ablating the top k for k in ABLATION_CURVE; with
  `greedy`, also the drop of `greedy_ablation`'s NUM_ABLATED latents."""
  mean = z.mean(axis=0)
  scores = model.logits(z)
  rng = np.random.default_rng(seed)
  dim = z.shape[1]
  random_sets = [rng.choice(dim, min(NUM_ABLATED, dim), replace=False)
                 for _ in range(RANDOM_DRAWS)]
  random_scores = [model.logits(latent_lib.ablate(z, s, mean))
                   for s in random_sets]
  results = {}
  for k, output in enumerate(model.outputs):
    attribute = attribute_of_output(output.name)
    if (output.head.kind == heads_lib.REGRESSION or attribute is None
        or attribute not in judge_lib.available(examples)):
      continue
    target = judge_lib.values(attribute, examples)
    base = _auc(target, scores[:, k])
    if np.isnan(base):
      continue
    ranked = np.argsort(-relevance[k])
    curve = {}
    for count in (*ABLATION_CURVE, NUM_ABLATED):
      if count <= dim:
        ablated = model.logits(latent_lib.ablate(z, ranked[:count], mean))
        curve[str(count)] = _auc(target, ablated[:, k])
    random_drop = float(np.mean([base - _auc(target, s[:, k])
                                 for s in random_scores]))
    results[output.name] = {
        'auc': base,
        'top5_auc_drop': base - curve[str(min(NUM_ABLATED, dim))],
        'random5_auc_drop': random_drop,
        'top5_latents': [int(j) for j in ranked[:NUM_ABLATED]],
        'auc_with_top_k_ablated': curve}
    if greedy:
      latents, aucs = greedy_ablation(model, z, target, k, NUM_ABLATED)
      results[output.name].update(greedy5_auc_drop=base - aucs[-1],
                                  greedy5_latents=[int(j) for j in latents])
  return results


def relevance_report(outputs, relevances: dict[str, np.ndarray]) -> dict:
  """relevance.json: per method and head, latents ranked by score; and how
  well the methods agree (Spearman's ρ, shared top 5)."""
  report = {'methods': {
      'gradient': 'mean over examples of |d logit / d z_j|, times std(z_j)',
      'ablation': 'mean over examples of |logit(z) - logit(z, z_j := '
                  'mean(z_j))|'}, 'ranking': {}, 'agreement': {}}
  for method, relevance in relevances.items():
    report['ranking'][method] = {
        o.name: [{'latent': int(j), 'score': float(relevance[k, j])}
                 for j in np.argsort(-relevance[k])]
        for k, o in enumerate(outputs)}
  if len(relevances) == 2:
    a, b = relevances.values()
    for k, o in enumerate(outputs):
      shared = set(np.argsort(-a[k])[:NUM_ABLATED]) & set(
          np.argsort(-b[k])[:NUM_ABLATED])
      report['agreement'][o.name] = {
          'spearman': float(stats.spearmanr(a[k], b[k]).statistic),
          'shared_top5': len(shared)}
  return report


def ablation_summary(table: dict) -> dict:
  """How many findings pass top5 ≥ 5 × random5."""
  findings = [name for name in table if name in labels_lib.FINDINGS]
  passed = [name for name in findings
            if table[name]['top5_auc_drop']
            >= 5 * max(table[name]['random5_auc_drop'], 0.0)
            and table[name]['top5_auc_drop'] > 0]
  return {'findings': len(findings), 'passed': len(passed),
          'passed_names': passed}


