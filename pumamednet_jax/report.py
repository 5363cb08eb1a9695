"""The files of an evaluation: predictions.csv, report.json, report.md,
roc.png (the paper's Fig. 4 layout) and defects.png (Fig. 3's kind of grid)."""

import csv
import functools
import importlib.resources
import json
import math
import os

import matplotlib
matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from sklearn import metrics as sk_metrics

from input_pipeline import heads as heads_lib
from pumamednet_jax import inference
from pumamednet_jax import models

# defects.png only for a model with a decoder.
FILES = ('predictions.csv', 'report.json', 'report.md', 'roc.png',
         'defects.png')
PAPER_TABLE = 'paper_table1.json'
PAPER_COLUMN = 'PumaMedNet'
PAPER_DATASET = 'chestxray14'


@functools.lru_cache(maxsize=1)
def paper_table() -> dict:
  """The paper's Table 1 (committed asset, with its source)."""
  resource = importlib.resources.files('pumamednet_jax') / 'assets' / PAPER_TABLE
  return json.loads(resource.read_text(encoding='utf-8'))


def write(out_dir: str, report: dict, *, heads, outputs, ids, columns, grid,
          conditions) -> None:
  os.makedirs(out_dir, exist_ok=True)
  write_predictions(os.path.join(out_dir, 'predictions.csv'), heads, outputs,
                    ids)
  with open(os.path.join(out_dir, 'report.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1, ensure_ascii=False)
  with open(os.path.join(out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report))
  plot_roc(os.path.join(out_dir, 'roc.png'), report, columns, heads, outputs)
  if grid is not None:  # none without a decoder
    plot_defects(os.path.join(out_dir, 'defects.png'), grid, conditions)


def _number(value) -> str:
  return f'{float(value):.9g}'


def write_predictions(path: str, heads, outputs: dict[str, np.ndarray],
                      ids: dict[str, np.ndarray]) -> None:
  """One row per example: id, patient_id (where the data set has one), and
  per head `target/…` (empty where unknown) and `prob/…` (`pred/age` for a
  regression head), and the probabilities on the defective image."""
  columns = {'id': ids['id']}
  if 'patient_id' in ids:
    columns['patient_id'] = ids['patient_id']
  for head in heads:
    score = outputs[f'{head.name}/score']
    target = outputs[f'{head.name}/target']
    mask = outputs[f'{head.name}/mask'] > 0
    defective = outputs.get(f'{inference.DEFECTIVE}{head.name}/score')
    known = lambda values, m: np.where(m, [_number(v) for v in values], '')
    if head.kind == heads_lib.REGRESSION:
      columns[f'target/{head.name}'] = known(target, mask)
      columns[f'pred/{head.name}'] = [_number(v) for v in score]
      continue
    names = ([None] if head.kind == heads_lib.BINARY else list(head.names))
    for i, name in enumerate(names):
      key = head.name if name is None else f'{head.name}/{name}'
      if head.kind == heads_lib.MULTILABEL:
        t, m = target[:, i], mask[:, i]
      elif head.kind == heads_lib.MULTICLASS:
        t, m = (target == i).astype(np.float32), mask
      else:
        t, m = target, mask
      columns[f'target/{key}'] = known(t, m)
      columns[f'prob/{key}'] = [_number(v) for v in (
          score if name is None else score[:, i])]
      if defective is not None:
        columns[f'prob_defective/{key}'] = [_number(v) for v in (
            defective if name is None else defective[:, i])]
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))


def _ci(value, low, high, digits=3) -> str:
  if value is None:
    return 'n/a'
  return f'{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})'


def _fmt(value, digits=3) -> str:
  return '–' if value is None else f'{value:.{digits}f}'


def markdown(report: dict) -> str:
  """report.md: what was evaluated, then the tables of report.json."""
  paper = (paper_table()['auc'][PAPER_COLUMN]
           if report['dataset'] == PAPER_DATASET else None)
  boot = report['bootstrap']
  lines = [
      f"# Evaluation: {report['dataset']}, {report['split']} split",
      '',
      f"{report['num_examples']} examples; checkpoint step {report['step']} of "
      f"`{report['workdir']}`; {report['date']}; commit "
      f"`{report['git_commit'] or 'unknown'}`.",
      '',
      f"AUCs on the images as they are, and on the same images with the "
      f"training defects (\"defective\"). {boot['level']:.0%} intervals: "
      f"{boot['method']} bootstrap by {boot['unit']}, {boot['resamples']} "
      f"resamples (seed {boot['seed']}). Thresholds: Youden's J on the "
      f"{report['threshold_split']} split. ECE: 10 equal-width bins.",
      '',
  ]
  header = ['Head', 'AUC (95% CI)', 'AUC defective (95% CI)']
  if paper:
    header += ['Paper', 'Δ']
  header += ['n+', 'n−', 'Threshold', 'Sensitivity', 'Specificity', 'ECE']
  lines += ['| ' + ' | '.join(header) + ' |',
            '|' + '---|' * len(header)]
  notes = []
  for name, row in report['heads'].items():
    cells = [name, _ci(row['auc'], row.get('ci_low'), row.get('ci_high')),
             _ci(row.get('auc_defective'), row.get('auc_defective_ci_low'),
                 row.get('auc_defective_ci_high'))]
    if paper:
      reference = paper.get(name.split('/', 1)[-1]) if '/' in name else None
      cells += [_fmt(reference),
                '–' if reference is None or row['auc'] is None
                else f"{row['auc'] - reference:+.3f}"]
    cells += [str(row['n_pos']), str(row['n_neg']), _fmt(row.get('threshold')),
              _fmt(row.get('sensitivity')), _fmt(row.get('specificity')),
              _fmt(row.get('ece'))]
    lines.append('| ' + ' | '.join(cells) + ' |')
    if 'note' in row:
      notes.append(f'- {name}: {row["note"]}')
  mean, defective = report['mean_auc'], report['mean_auc_defective']
  if mean:
    cells = [f"**Mean AUC** ({mean['num_labels']} labels)",
             _ci(mean['value'], mean['ci_low'], mean['ci_high']),
             _ci(defective['value'], defective['ci_low'], defective['ci_high'])
             if defective else '–']
    if paper:
      cells += [_fmt(paper['mean']), f"{mean['value'] - paper['mean']:+.3f}"]
    lines.append('| ' + ' | '.join(cells + [''] * (len(header) - len(cells)))
                 + ' |')
  lines += [''] + notes + ([''] if notes else [])
  if paper:
    lines += [f"Paper: the {PAPER_COLUMN} column of {paper_table()['source']}.",
              '']
  age = report['age']
  if age:
    lines += ['## Age', '',
              f"MAE {_ci(age['mae'], age['mae_ci_low'], age['mae_ci_high'], 2)}"
              f" years; Pearson r {_fmt(age['pearson_r'])}.", '']
  defects = report['defects']
  if 'skipped' in defects:
    lines += ['## Defect correction', '', f"None: {defects['skipped']}."]
    return '\n'.join(lines) + '\n'
  lines += ['## Defect correction', '',
            f"Mean SSIM and PSNR (dB) against the clean image, on "
            f"{defects['subset']}.", '',
            '| Defect | SSIM defective | SSIM reconstruction | '
            'PSNR defective | PSNR reconstruction |', '|---|---|---|---|---|']
  for row in defects['conditions'].values():
    cell = lambda m, d=3: ('–' if row[m] is None else
                           _ci(row[m]['mean'], row[m]['ci_low'],
                               row[m]['ci_high'], d))
    lines.append(f"| {row['label']} | {cell('ssim_defective')} | "
                 f"{cell('ssim_reconstruction')} | {cell('psnr_defective', 2)} | "
                 f"{cell('psnr_reconstruction', 2)} |")
  return '\n'.join(lines) + '\n'


def plot_roc(path: str, report: dict, columns, heads, outputs) -> None:
  """One ROC panel per binary column, AUC and interval in the legend, and
  the predicted-vs-true age scatter (the paper's Fig. 4)."""
  regression = [h for h in heads if h.kind == heads_lib.REGRESSION]
  count = len(columns) + len(regression)
  ncols = min(5, count)
  nrows = math.ceil(count / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 3 * nrows),
                           squeeze=False)
  panels = iter(axes.ravel())
  for column in columns:
    ax = next(panels)
    row = report['heads'][column.name]
    known = column.known
    if row['auc'] is None:
      ax.text(0.5, 0.5, row['note'].replace(': ', ':\n', 1).replace(
          ' in the', '\nin the'), ha='center', va='center', fontsize=7)
    else:
      fpr, tpr, _ = sk_metrics.roc_curve(column.targets[known] > 0.5,
                                         column.scores[known])
      ax.plot(fpr, tpr, lw=1.2, label=(
          f"AUC {row['auc']:.3f}\n({row['ci_low']:.3f}–{row['ci_high']:.3f})"))
      ax.legend(loc='lower right', fontsize=7, frameon=False)
    ax.plot([0, 1], [0, 1], color='0.7', lw=0.8, ls='--')
    ax.set_title(column.name.split('/', 1)[-1], fontsize=9)
    ax.set_xlabel('1 − specificity', fontsize=7)
    ax.set_ylabel('sensitivity', fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_aspect('equal')
  for head in regression:
    ax = next(panels)
    known = outputs[f'{head.name}/mask'] > 0
    true = outputs[f'{head.name}/target'][known]
    pred = outputs[f'{head.name}/score'][known]
    ax.scatter(true, pred, s=2, alpha=0.4)
    if len(true):
      low, high = float(min(true.min(), pred.min())), float(max(true.max(),
                                                                pred.max()))
      ax.plot([low, high], [low, high], color='0.5', lw=0.8, ls='--')
    age = report['age']
    ax.set_title(f"{head.name}: MAE {age['mae']:.1f}" if age else head.name,
                 fontsize=9)
    ax.set_xlabel('true', fontsize=7)
    ax.set_ylabel('predicted', fontsize=7)
    ax.tick_params(labelsize=6)
  for ax in panels:
    ax.axis('off')
  fig.suptitle(f"{report['dataset']} {report['split']} split "
               f"({report['num_examples']} images), step {report['step']}",
               fontsize=10)
  # Fixed margins: tight_layout measures every label, slowly.
  fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.92,
                      wspace=0.45, hspace=0.55)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_defects(path: str, grid: dict[str, np.ndarray], conditions) -> None:
  """Columns: the conditions; rows: for each example the model's input (the
  clean image with the condition's defect), then its reconstruction."""
  examples = next(iter(grid.values())).shape[0]
  fig, axes = plt.subplots(2 * examples, len(conditions),
                           figsize=(1.4 * len(conditions), 1.5 * 2 * examples),
                           squeeze=False)
  for j, condition in enumerate(conditions):
    for e in range(examples):
      for k, kind in enumerate(('input', 'reconstruction')):
        ax = axes[2 * e + k, j]
        ax.imshow(np.clip(grid[condition.name][e, k, ..., 0], 0, 1),
                  cmap='gray', vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if j == 0:
          ax.set_ylabel(kind, fontsize=7)
    axes[0, j].set_title(condition.label.split(' (')[0], fontsize=7)
  fig.subplots_adjust(left=0.05, right=0.99, bottom=0.01, top=0.93,
                      wspace=0.05, hspace=0.05)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def summary_lines(report: dict) -> list[str]:
  """Mean AUC with its interval, defect correction, and where the report is."""
  lines = []
  mean, defective = report['mean_auc'], report['mean_auc_defective']
  if mean:
    line = (f"{report['split']} split, step {report['step']}: mean AUC "
            f"{_ci(mean['value'], mean['ci_low'], mean['ci_high'])} on the "
            'images as they are')
    if defective:
      line += (f", {_ci(defective['value'], defective['ci_low'], defective['ci_high'])}"
               ' with defects')
    lines.append(line)
  every = report['defects']['conditions'].get('all')
  if every:
    lines.append(
        f"defect correction (all defects, {report['defects']['num_examples']} "
        f"images): SSIM {every['ssim_defective']['mean']:.3f} → "
        f"{every['ssim_reconstruction']['mean']:.3f}, PSNR "
        f"{every['psnr_defective']['mean']:.1f} → "
        f"{every['psnr_reconstruction']['mean']:.1f} dB")
  lines.append(f"report: {report['out_dir']}")
  return lines


def run_summary_lines(report: dict, workdir: str,
                      model_config: models.ModelConfig) -> list[str]:
  """The end of a training run: the final report's figures, where the run's
  files are, and the next commands (export_torch only for PumaMedNet, the
  architecture of the PyTorch port)."""
  workdir = os.path.abspath(workdir)
  lines = summary_lines(report) + [
      f'checkpoints: {os.path.join(workdir, "checkpoints")}']
  if models.has_decoder(model_config):  # no grids without a reconstruction
    lines.append(f'image grids: {os.path.join(workdir, "images")}')
  lines += [f'TensorBoard events: {workdir}',
            f'next: tensorboard --logdir {workdir}']
  if model_config.arch == models.PUMAMEDNET:
    lines.append(
        f'next: python -m pumamednet_jax.export_torch --workdir {workdir} '
        f'--output {os.path.join(workdir, "model.safetensors")}')
  return lines
