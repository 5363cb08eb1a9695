"""Training and evaluation metrics (clu collections, scikit-learn AUC)."""

import math

import numpy as np
from clu import metrics
from sklearn import metrics as sk_metrics

from input_pipeline import heads as heads_lib

NO_FINDING = 'No Finding'


def train_collection(names) -> type[metrics.Collection]:
  """A clu Collection averaging each named scalar the train step returns."""
  return metrics.Collection.create(
      **{name: metrics.Average.from_output(name) for name in names})


def _safe_auc(targets: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC, or NaN where only one class is present."""
  if len(np.unique(targets)) < 2:
    return math.nan
  return float(sk_metrics.roc_auc_score(targets, scores))


def finding_names(head: heads_lib.HeadSpec) -> list[str]:
  """The findings of a multi-label head whose mean AUC is reported (not
  `No Finding`, as in the paper's Table 1 average)."""
  return [name for name in head.names if name != NO_FINDING]


def head_report(head: heads_lib.HeadSpec, outputs: dict[str, np.ndarray],
                valid: np.ndarray) -> dict[str, float]:
  """Eval metrics of one head from gathered per-example outputs."""
  score = outputs[f'{head.name}/score'][valid]
  target = outputs[f'{head.name}/target'][valid]
  mask = outputs[f'{head.name}/mask'][valid] > 0
  report = {}
  if head.kind == heads_lib.MULTILABEL:
    aucs = {}
    for i, name in enumerate(head.names):
      known = mask[:, i]
      aucs[name] = _safe_auc(target[known, i], score[known, i])
      report[f'auc/{head.name}/{name}'] = aucs[name]
    findings = [aucs[n] for n in finding_names(head) if not math.isnan(aucs[n])]
    report[f'mean_auc/{head.name}'] = float(np.mean(findings)) if findings else math.nan
  elif head.kind == heads_lib.BINARY:
    report[f'auc/{head.name}'] = _safe_auc(target[mask], score[mask])
  elif head.kind == heads_lib.MULTICLASS:
    target, score = target[mask].astype(int), score[mask]
    report[f'accuracy/{head.name}'] = float(np.mean(np.argmax(score, -1) == target))
    per_class = [_safe_auc(target == c, score[:, c]) for c in range(len(head.names))]
    for name, auc in zip(head.names, per_class):
      report[f'auc/{head.name}/{name}'] = auc
    known = [a for a in per_class if not math.isnan(a)]
    report[f'mean_auc/{head.name}'] = float(np.mean(known)) if known else math.nan
  else:  # regression, in the target's units (years)
    report[f'mae/{head.name}'] = float(np.mean(np.abs(score[mask] - target[mask])))
  return report


def eval_report(outputs: dict[str, np.ndarray],
                heads: tuple[heads_lib.HeadSpec, ...]) -> dict[str, float]:
  """All eval metrics, including `mean_auc`, the best-checkpoint criterion:
  the mean AUC over the findings of the multi-label head, or else over the
  classes of the multi-class head, or else over the binary heads."""
  valid = outputs['valid'] > 0
  report = {
      'ssim_reconstruction': float(np.mean(outputs['ssim_reconstruction'][valid])),
      'ssim_defective': float(np.mean(outputs['ssim_defective'][valid])),
      'num_examples': float(np.sum(valid)),
  }
  report['defect_correction'] = (report['ssim_reconstruction'] -
                                 report['ssim_defective'])
  for head in heads:
    report.update(head_report(head, outputs, valid))
  candidates = ([f'mean_auc/{h.name}' for h in heads if h.kind == heads_lib.MULTILABEL] or
                [f'mean_auc/{h.name}' for h in heads if h.kind == heads_lib.MULTICLASS] or
                [f'auc/{h.name}' for h in heads if h.kind == heads_lib.BINARY])
  values = [report[c] for c in candidates if not math.isnan(report[c])]
  report['mean_auc'] = float(np.mean(values)) if values else math.nan
  return report
