"""The evaluation report of a trained checkpoint (pumamednet_jax.evaluate)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import metrics as sk_metrics

from configs import default
from input_pipeline import pipeline
from pumamednet_jax import evaluate
from input_pipeline import heads as heads_lib
from pumamednet_jax import report as report_lib
from pumamednet_jax import stats
from pumamednet_jax import train
from e2e_support import REPO_ROOT, shrink


@pytest.fixture(scope='module')
def trained(phantom_data_dir, tmp_path_factory):
  """A tiny run trained through `train_and_evaluate` (which writes the test
  report at its end): (config, workdir)."""
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir))
  workdir = tmp_path_factory.mktemp('evaluate') / 'run'
  train.train_and_evaluate(config, str(workdir))
  return config, workdir


def read_predictions(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def test_training_ends_with_the_test_report(trained):
  _, workdir = trained
  for name in report_lib.FILES:
    assert (workdir / 'report' / 'test' / name).stat().st_size > 0
  report = json.loads((workdir / 'report' / 'test' / 'report.json').read_text())
  assert report['split'] == 'test' and report['num_examples'] == 32


def test_evaluate_writes_a_report_that_predictions_reproduce(trained, tmp_path):
  config, workdir = trained
  out = tmp_path / 'report'
  report = evaluate.evaluate(config, str(workdir), 'test', out_dir=str(out),
                             num_resamples=500)
  for name in report_lib.FILES:
    assert (out / name).stat().st_size > 0
  saved = json.loads((out / 'report.json').read_text())
  assert saved['heads'] == json.loads(json.dumps(report['heads']))
  assert saved['num_examples'] == 32 and saved['step'] == 4
  assert saved['bootstrap']['resamples'] == 500
  assert saved['threshold_split'] == 'validation'

  rows = read_predictions(out / 'predictions.csv')
  assert len(rows) == 32
  # Targets belong to the ids they are written beside.
  builder = pipeline.get_builder(config)
  truth = {ex['id'].decode(): ex['labels'] for ex in tfds.as_numpy(
      builder.as_dataset(split='test', decoders=tfds.decode.PartialDecoding(
          {'id': True, 'labels': True})))}
  for row in rows:
    assert float(row['target/labels/Effusion']) == truth[row['id']][4]

  checked = 0
  for name, head in saved['heads'].items():
    targets = np.array([float(r[f'target/{name}']) for r in rows])
    probs = np.array([float(r[f'prob/{name}']) for r in rows])
    if head['auc'] is None:
      assert head['note'].startswith('n/a: no ')
      assert min(head['n_pos'], head['n_neg']) == 0
      continue
    assert head['auc'] == pytest.approx(
        sk_metrics.roc_auc_score(targets, probs), abs=1e-6)
    defective = np.array([float(r[f'prob_defective/{name}']) for r in rows])
    assert head['auc_defective'] == pytest.approx(
        sk_metrics.roc_auc_score(targets, defective), abs=1e-6)
    assert head['ci_low'] <= head['auc'] <= head['ci_high']
    assert head['ci_high'] > head['ci_low']
    assert (head['auc_defective_ci_low'] <= head['auc_defective'] <=
            head['auc_defective_ci_high'])
    assert (head['n_pos'], head['n_neg']) == (int(targets.sum()),
                                              int((1 - targets).sum()))
    assert 0 <= head['ece'] <= 1
    checked += 1
  assert checked >= 10
  for key in ('mean_auc', 'mean_auc_defective'):
    mean = saved[key]
    assert mean['ci_low'] <= mean['value'] <= mean['ci_high'] > mean['ci_low']
  age = saved['age']
  assert age['mae_ci_low'] <= age['mae'] <= age['mae_ci_high'] > age['mae_ci_low']
  ages = np.array([float(r['target/age']) for r in rows])
  predicted = np.array([float(r['pred/age']) for r in rows])
  assert age['mae'] == pytest.approx(np.mean(np.abs(ages - predicted)), rel=1e-5)

  conditions = saved['defects']['conditions']
  assert list(conditions) == [
      'none', 'rotate_5', 'rotate_10', 'rotate_15', 'flip', 'blur_0.5',
      'blur_1', 'blur_1.5', 'equalize', 'autocontrast', 'all']
  assert conditions['none']['ssim_defective'] is None
  for name, row in conditions.items():
    for measure in ('ssim_defective', 'psnr_defective', 'ssim_reconstruction',
                    'psnr_reconstruction'):
      value = row[measure]
      if value is not None:
        assert value['ci_low'] <= value['mean'] <= value['ci_high'], name
        assert value['ci_high'] > value['ci_low'], (name, measure)
  # Stronger rotations leave less of the clean image.
  assert (conditions['rotate_5']['ssim_defective']['mean'] >
          conditions['rotate_10']['ssim_defective']['mean'] >
          conditions['rotate_15']['ssim_defective']['mean'])
  markdown = (out / 'report.md').read_text()
  assert '| **Mean AUC**' in markdown and 'Paper' not in markdown


def _head_rows(heads, outputs, num_resamples):
  """evaluate.head_rows of `outputs` (the test split, thresholds from the
  same columns), and the bootstrap replicates behind them."""
  columns = evaluate.binary_columns(heads, outputs)
  resampling = stats.Resampling(
      len(columns[0].targets), events=evaluate.class_events(columns),
      num_resamples=num_resamples)
  replicates = stats.bootstrap(
      evaluate.bootstrap_statistics(columns, outputs, heads), resampling)
  rows = evaluate.head_rows(columns, {c.name: c for c in columns}, replicates,
                            'test', 'validation')
  return rows, replicates


def test_a_label_without_positives_is_na_and_the_rest_is_written():
  heads = (heads_lib.HeadSpec('labels', heads_lib.MULTILABEL, ('A', 'B')),)
  rng = np.random.default_rng(0)
  target = np.zeros((50, 2), np.float32)
  target[::3, 0] = 1  # B has no positive
  score = rng.random((50, 2)).astype(np.float32)
  outputs = {'labels/score': score, 'labels/target': target,
             'labels/mask': np.ones_like(target)}
  rows, replicates = _head_rows(heads, outputs, num_resamples=200)
  assert rows['labels/B'] == {'n_pos': 0, 'n_neg': 50, 'auc': None,
                              'note': 'n/a: no positive example in the test split'}
  assert rows['labels/A']['auc'] == pytest.approx(
      sk_metrics.roc_auc_score(target[:, 0], score[:, 0]))
  mean = evaluate.mean_auc(rows, ['labels/A', 'labels/B'], replicates)
  assert mean['num_labels'] == 1 and mean['value'] == rows['labels/A']['auc']


def test_a_perfectly_separated_head_says_why_its_interval_has_no_width():
  heads = (heads_lib.HeadSpec('view', heads_lib.BINARY, ('PA', 'AP')),)
  target = np.r_[np.zeros(30), np.ones(20)].astype(np.float32)
  score = (target + np.random.default_rng(0).random(target.shape) * 0.5)
  outputs = {'view/score': score.astype(np.float32), 'view/target': target,
             'view/mask': np.ones_like(target)}
  row = _head_rows(heads, outputs, num_resamples=100)[0]['view']
  assert row['auc'] == row['ci_low'] == row['ci_high'] == 1.0
  assert row['auc_lower_bound'] == pytest.approx(0.05 ** (1 / 20))
  assert 'no width' in row['note'] and '20 disjoint' in row['note']


def test_paper_table_asset_names_its_source():
  table = report_lib.paper_table()
  assert 'doi:10.13053/CyS-27-4-4777' in table['source']
  ours = table['auc']['PumaMedNet']
  assert len(ours) == 16 and ours['mean'] == 0.794 and ours['Hernia'] == 0.834
  findings = [v for k, v in ours.items() if k not in ('mean', 'No Finding')]
  assert np.mean(findings) == pytest.approx(ours['mean'], abs=1e-3)


def test_bad_input_errors(trained, tmp_path, phantom_data_dir):
  config, workdir = trained
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 3 .*'
                     r'available steps: \[2, 4\]'):
    evaluate.evaluate(config, str(workdir), 'test', step=3,
                      out_dir=str(tmp_path / 'a'))
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    evaluate.evaluate(config, str(tmp_path / 'empty'), 'test',
                      out_dir=str(tmp_path / 'b'))
  with pytest.raises(ValueError, match="split 'tset' not in cxr_phantom"):
    evaluate.evaluate(config, str(workdir), 'tset', out_dir=str(tmp_path / 'c'))
  other = shrink(default.get_config(), data_dir=str(phantom_data_dir),
                 head_features=('labels',))
  with pytest.raises(ValueError, match="has heads .*'view'.* pass the config"):
    evaluate.evaluate(other, str(workdir), 'test', out_dir=str(tmp_path / 'd'))
  assert not any((tmp_path / n).exists() for n in 'abcd')


def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pumamednet_jax.evaluate',
       f'--workdir={tmp_path / "nothing"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('evaluate: no checkpoint in ') and 'nothing' in last
