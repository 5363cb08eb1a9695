"""Evaluates a checkpoint on a split: per-finding AUCs with 95% bootstrap
intervals (the paper's Table 1), ROC curves (Fig. 4), operating thresholds,
calibration, and the correction of each defect.

  python -m pumamednet_jax.evaluate --workdir W [--split test] [--step N] \
      [--out DIR] [--bootstrap 2000] [--config configs/default.py] [--config.…]

writes DIR (default W/report/<split>/): predictions.csv, report.json,
report.md, roc.png and defects.png (`report.write`). The AUCs, thresholds and
calibration are those of the split's images as they are; the same AUCs on
images with the training defects (those of the evaluation during training)
go beside them as `auc_defective`.
"""

import dataclasses
import datetime
import os
import pathlib
import subprocess

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from scipy import stats as scipy_stats

from input_pipeline import heads as heads_lib
from input_pipeline import pipeline
from pumamednet_jax import defect_correction
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import inference
from pumamednet_jax import metrics as metrics_lib
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import report as report_lib
from pumamednet_jax import stats

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The defect table's images: the first examples of the split.
DEFECTS_SUBSET = 512
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Column:
  """One binary score column: a finding of the multi-label head, a binary
  head, or a class of a multi-class head (one vs rest)."""

  name: str  # 'labels/Atelectasis', 'view', 'label/Normal'
  scores: np.ndarray
  targets: np.ndarray  # 0 / 1
  known: np.ndarray  # bool: the target is known
  defective_scores: np.ndarray | None = None


def binary_columns(heads, outputs: dict[str, np.ndarray]) -> list[Column]:
  """The binary columns of every classification head."""
  defective = lambda key: outputs.get(inference.DEFECTIVE + key)
  columns = []
  for head in heads:
    score_key = f'{head.name}/score'
    scores, target = outputs[score_key], outputs[f'{head.name}/target']
    mask = outputs[f'{head.name}/mask'] > 0
    bad = defective(score_key)
    if head.kind == heads_lib.MULTILABEL:
      for i, name in enumerate(head.names):
        columns.append(Column(f'{head.name}/{name}', scores[:, i], target[:, i],
                              mask[:, i], None if bad is None else bad[:, i]))
    elif head.kind == heads_lib.BINARY:
      columns.append(Column(head.name, scores, target, mask, bad))
    elif head.kind == heads_lib.MULTICLASS:
      for i, name in enumerate(head.names):
        columns.append(Column(f'{head.name}/{name}', scores[:, i],
                              (target == i).astype(np.float32), mask,
                              None if bad is None else bad[:, i]))
  return columns


def mean_auc_names(heads) -> list[str]:
  """Columns averaged into `mean_auc`: the findings of the multi-label head
  (not No Finding, as in the paper's Table 1), or else the classes of the
  multi-class head, or else the binary heads (as `metrics.eval_report`)."""
  for kind in (heads_lib.MULTILABEL, heads_lib.MULTICLASS):
    for head in heads:
      if head.kind == kind:
        names = (metrics_lib.finding_names(head) if kind == heads_lib.MULTILABEL
                 else head.names)
        return [f'{head.name}/{n}' for n in names]
  return [h.name for h in heads if h.kind == heads_lib.BINARY]


def _missing_class(column: Column) -> str | None:
  known = column.targets[column.known]
  if not np.any(known > 0.5):
    return 'no positive example'
  if not np.any(known < 0.5):
    return 'no negative example'
  return None


def _interval(values: np.ndarray) -> tuple[float, float]:
  return stats.interval(values, LEVEL)


def head_rows(columns: list[Column], threshold_columns: dict[str, Column],
              replicates: dict[str, np.ndarray], split: str,
              threshold_split: str) -> dict[str, dict]:
  """report.json's `heads`: one row per binary column."""
  rows = {}
  for column in columns:
    known = column.known
    targets, scores = column.targets[known], column.scores[known]
    row = {'n_pos': int(np.sum(targets > 0.5)), 'n_neg': int(np.sum(targets < 0.5))}
    missing = _missing_class(column)
    if missing:
      rows[column.name] = {**row, 'auc': None,
                           'note': f'n/a: {missing} in the {split} split'}
      continue
    row['auc'] = stats.auc(scores, targets)
    row['ci_low'], row['ci_high'] = _interval(replicates[column.name])
    if column.defective_scores is not None:
      row['auc_defective'] = stats.auc(column.defective_scores[known], targets)
      (row['auc_defective_ci_low'],
       row['auc_defective_ci_high']) = _interval(
           replicates[inference.DEFECTIVE + column.name])
    if row['auc'] == 1.0:
      row['auc_lower_bound'] = stats.separable_auc_lower_bound(
          row['n_pos'], row['n_neg'], LEVEL)
      row['note'] = (
          'the score separates every positive from every negative, so every '
          'resample does too and the bootstrap interval has no width; a '
          f"one-sided {LEVEL:.0%} lower bound is {row['auc_lower_bound']:.4f} "
          f"(Clopper–Pearson over {min(row['n_pos'], row['n_neg'])} disjoint "
          'positive–negative pairs)')
    row['ece'] = stats.expected_calibration_error(scores, targets)
    reference = threshold_columns[column.name]
    missing = _missing_class(reference)
    if missing:
      row.update(threshold=None, sensitivity=None, specificity=None,
                 note=f'no threshold: {missing} in the {threshold_split} split')
    else:
      row['threshold'] = stats.youden_threshold(
          reference.scores[reference.known], reference.targets[reference.known])
      row['sensitivity'], row['specificity'] = stats.operating_point(
          scores, targets, row['threshold'])
    rows[column.name] = row
  return rows


def mean_auc(rows: dict[str, dict], names: list[str],
             replicates: dict[str, np.ndarray], prefix: str = '',
             key: str = 'auc') -> dict | None:
  """The mean AUC over the named columns that have one, with the interval
  of its per-resample means."""
  names = [n for n in names if n in rows and rows[n].get(key) is not None]
  if not names:
    return None
  per_resample = np.mean([replicates[prefix + n] for n in names], axis=0)
  low, high = _interval(per_resample)
  return {'value': float(np.mean([rows[n][key] for n in names])),
          'ci_low': low, 'ci_high': high, 'num_labels': len(names)}


def age_row(outputs: dict[str, np.ndarray], heads,
            replicates: dict[str, np.ndarray]) -> dict | None:
  for head in heads:
    if head.kind == heads_lib.REGRESSION:
      known = outputs[f'{head.name}/mask'] > 0
      pred = outputs[f'{head.name}/score'][known]
      true = outputs[f'{head.name}/target'][known]
      if len(true) < 2:
        return None
      low, high = _interval(replicates[f'mae/{head.name}'])
      constant = np.ptp(pred) == 0 or np.ptp(true) == 0  # r is undefined
      return {'mae': float(np.mean(np.abs(pred - true))), 'mae_ci_low': low,
              'mae_ci_high': high,
              'pearson_r': None if constant else float(
                  scipy_stats.pearsonr(pred, true).statistic)}
  return None


def bootstrap_statistics(columns: list[Column], outputs, heads) -> dict:
  """The statistics whose intervals the report gives, over one resampling."""
  statistics = {}
  for column in columns:
    if _missing_class(column):
      continue
    statistics[column.name] = stats.auc_statistic(
        column.scores, column.targets, column.known)
    if column.defective_scores is not None:
      statistics[inference.DEFECTIVE + column.name] = stats.auc_statistic(
          column.defective_scores, column.targets, column.known)
  for head in heads:
    if head.kind == heads_lib.REGRESSION:
      error = np.abs(outputs[f'{head.name}/score'] - outputs[f'{head.name}/target'])
      statistics[f'mae/{head.name}'] = stats.mean_statistic(
          error, outputs[f'{head.name}/mask'] > 0)
  return statistics


def class_events(columns: list[Column]) -> np.ndarray:
  """(n, 2C): each example's known positive / negative of every column."""
  events = []
  for column in columns:
    events.append(column.known & (column.targets > 0.5))
    events.append(column.known & (column.targets < 0.5))
  return np.stack(events, axis=1)


def git_commit() -> str | None:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _check_checkpoint(checkpoint: inference.Checkpoint, heads, image_size: int):
  saved = [h.name for h in checkpoint.model_config.heads]
  if saved != [h.name for h in heads]:
    raise ValueError(
        f'the checkpoint of step {checkpoint.step} in {checkpoint.workdir} has '
        f'heads {saved}; the data set of this config gives '
        f'{[h.name for h in heads]}: pass the config it was trained with')
  if checkpoint.model_config.image_size != image_size:
    raise ValueError(
        f'the checkpoint of step {checkpoint.step} in {checkpoint.workdir} is '
        f'for {checkpoint.model_config.image_size} px; config.image_size = '
        f'{image_size}: pass the config it was trained with')


def defects_section(config, checkpoint: inference.Checkpoint, batches, mesh,
                    split: str, patients, num_resamples: int, seed: int):
  """(report.json's `defects`, the defects grid, the conditions): the defect
  correction of the first examples of `split`; for a model without a decoder
  (ResNet-18) an empty table that says why, and no grid."""
  if not models.has_decoder(checkpoint.model_config):
    return {'num_examples': 0, 'conditions': {},
            'skipped': f'the model ({checkpoint.model_config.arch}) has no '
                       'decoder: there is no reconstruction to measure'}, None, ()
  ssim = (config.loss.ssim_filter_size, config.loss.ssim_filter_sigma,
          config.loss.ssim_filter)
  measures, grid = defect_correction.measure(
      checkpoint.params, batches, mesh, checkpoint.model_config, ssim,
      checkpoint.policy)
  subset = len(measures['index'])
  conditions = defect_correction.conditions(config.image_size)
  table = defect_correction.table(
      measures, conditions, stats.Resampling(
          subset, groups=None if patients is None else patients[:subset],
          num_resamples=num_resamples, seed=seed), LEVEL)
  return {'num_examples': subset,
          'subset': f'the first {subset} examples of the {split} split',
          'conditions': table}, grid, conditions


def evaluate(config, workdir: str, split: str = 'test', *,
             step: int | None = None, out_dir: str | None = None,
             num_resamples: int = 2000, seed: int = 0) -> dict:
  """Evaluates a checkpoint of `workdir` (`step`, or else the best by
  validation mean AUC, or else the latest) on `split`; writes the report
  files to `out_dir` (default W/report/<split>/) and returns report.json's
  content."""
  if num_resamples < 2:
    raise ValueError(f'--bootstrap must be at least 2, got {num_resamples}')
  sources = pipeline.get_sources(config)
  pipeline.prepare(sources)
  heads = pipeline.head_specs(sources, config.head_features)
  splits = sources[0].builder.info.splits
  if split not in splits:
    raise ValueError(f'split {split!r} not in {config.dataset} (splits: '
                     f'{", ".join(splits.keys())})')
  if pipeline.num_examples(sources, split) == 0:
    raise ValueError(f'split {split!r} of {config.dataset} has no examples')
  mesh = parallel.create_mesh()
  checkpoint = inference.load_checkpoint(workdir, mesh, step,
                                         compute_from=config)
  _check_checkpoint(checkpoint, heads, config.image_size)
  defects = defects_lib.DefectConfig.from_config(config)
  parallel.check_batch_size(config.batch_size)

  def batches(name, limit=0):
    return pipeline.create_eval_batches(
        sources, heads, split=name, image_size=config.image_size,
        global_batch_size=config.batch_size, num_examples_limit=limit,
        process_index=jax.process_index(), process_count=jax.process_count())

  score = inference.make_score_fn(mesh, checkpoint.model_config, defects,
                                  config.seed, policy=checkpoint.policy)
  outputs = inference.score_split(score, checkpoint.params, batches(split), mesh)
  threshold_split = ('validation' if 'validation' in splits and
                     pipeline.num_examples(sources, 'validation') else split)
  if threshold_split == split:
    threshold_outputs = outputs
  else:
    score_clean = inference.make_score_fn(
        mesh, checkpoint.model_config, defects, config.seed,
        policy=checkpoint.policy, defective=False)
    threshold_outputs = inference.score_split(
        score_clean, checkpoint.params, batches(threshold_split), mesh)
  ids = pipeline.example_ids(sources, split)
  patients = ids.get('patient_id')

  columns = binary_columns(heads, outputs)
  threshold_columns = {c.name: c for c in binary_columns(heads, threshold_outputs)}
  resampling = stats.Resampling(
      len(outputs['index']), groups=patients, events=class_events(columns),
      num_resamples=num_resamples, seed=seed)
  replicates = stats.bootstrap(
      bootstrap_statistics(columns, outputs, heads), resampling)
  rows = head_rows(columns, threshold_columns, replicates, split,
                   threshold_split)
  averaged = mean_auc_names(heads)
  defects_table, grid, conditions = defects_section(
      config, checkpoint, batches(split, DEFECTS_SUBSET), mesh, split,
      patients, num_resamples, seed)
  report = {
      'dataset': config.dataset,
      'split': split,
      'num_examples': len(outputs['index']),
      'step': checkpoint.step,
      'workdir': os.path.abspath(workdir),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'git_commit': git_commit(),
      'bootstrap': {'resamples': num_resamples, 'seed': seed,
                    'unit': resampling.unit, 'level': LEVEL,
                    'method': 'percentile, stratified by class'},
      'threshold_split': threshold_split,
      'heads': rows,
      'mean_auc': mean_auc(rows, averaged, replicates),
      'mean_auc_defective': mean_auc(rows, averaged, replicates,
                                     inference.DEFECTIVE, 'auc_defective'),
      'mean_auc_labels': averaged,
      'age': age_row(outputs, heads, replicates),
      'defects': defects_table,
  }
  out_dir = out_dir or os.path.join(workdir, 'report', split)
  if jax.process_index() == 0:
    report_lib.write(out_dir, report, heads=heads, outputs=outputs, ids=ids,
                     columns=columns, grid=grid, conditions=conditions)
    logging.info('wrote the %s report of step %d to %s', split,
                 checkpoint.step, out_dir)
  report['out_dir'] = os.path.abspath(out_dir)
  return report


# --- Command line --------------------------------------------------------


def _define_flags():
  """The command's flags (defined only when run as a command: training
  imports this module beside main.py's flags)."""
  flags.DEFINE_string('workdir', None, 'Training directory.')
  flags.DEFINE_string('split', 'test', 'Split to evaluate.')
  flags.DEFINE_integer(
      'step', None, 'Checkpoint step (default: the best by validation mean '
      'AUC, or else the latest).')
  flags.DEFINE_string('out', None,
                      'Output directory (default: W/report/<split>/).')
  flags.DEFINE_integer('bootstrap', 2000, 'Bootstrap resamples.')
  flags.DEFINE_integer('seed', 0, 'Seed of the bootstrap.')
  config_flags.DEFINE_config_file(
      'config', str(REPO_ROOT / 'configs' / 'default.py'),
      'The training configuration (data set, image size, defects).',
      lock_config=True)
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  flag = flags.FLAGS
  try:
    report = evaluate(flag.config, flag.workdir, flag.split, step=flag.step,
                      out_dir=flag.out, num_resamples=flag.bootstrap,
                      seed=flag.seed)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f'evaluate: {error}') from None
  print('\n'.join(report_lib.summary_lines(report)))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
