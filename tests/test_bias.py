"""The bias audit: its analysis on synthetic codes, and the command end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from pumamednet_jax import bias
from pumamednet_jax import bias_study
from pumamednet_jax import train
from e2e_support import REPO_ROOT, config_flags, shrink

NUM_LATENTS = 12
TARGET_LATENT = 0


def _split(count, seed, device_follows):
  """Codes whose latent 0 carries the target and latents 4.. a little of the
  device each; the device follows the target with probability
  `device_follows` (its opposite when negative), else is drawn at 20%."""
  rng = np.random.default_rng(seed)
  target = rng.random(count) < 0.3
  follows = rng.random(count) < abs(device_follows)
  linked = target if device_follows >= 0 else ~target
  device = np.where(follows, linked, rng.random(count) < 0.2)
  latents = rng.standard_normal((count, NUM_LATENTS)).astype(np.float32)
  latents[:, TARGET_LATENT] += 1.5 * target
  latents[:, 4:] += 0.9 * device[:, None]
  return bias.Split(latents, target.astype(int), device.astype(int))


def _shortcut_head(latents):
  """A head trained on confounded data: it reads the device as much as the
  target."""
  device_reading = latents[:, 4:].mean(axis=1)
  return 1 / (1 + np.exp(-(latents[:, TARGET_LATENT] + 2 * device_reading)))


def test_analysis_finds_the_shortcut_and_erasure_removes_it():
  splits = {
      'train': _split(3000, 0, 0.9),
      'validation_deconfounded': _split(2000, 1, 0.0),
      'test': _split(2000, 2, 0.9),
      'test_deconfounded': _split(2000, 3, 0.0),
      'test_anticorrelated': _split(2000, 4, -0.8),
  }
  result = bias.analyse(splits, _shortcut_head, num_latents=3,
                        num_resamples=200)
  audit = result['audit']
  assert set(bias.KEYS) <= set(audit)
  assert audit['iid_auc'] > audit['deconfounded_auc'] > (
      audit['anticorrelated_auc'] + 0.1)
  assert audit['confounder_only_auc'] > 0.8
  assert audit['probe_auc'] > 0.95
  low, high = audit['iid_auc_ci']
  assert low < audit['iid_auc'] < high
  # The ranking puts the device's latents first, the target's last.
  ranked = [item['index'] for item in result['latents']]
  assert set(ranked[:8]) == set(range(4, NUM_LATENTS))
  assert result['ignored_latents'] == ranked[:3]
  mitigated = result['mitigated']
  assert set(mitigated) == set(bias.METHODS)
  # Three of eight device latents ignored: the probe still reads it.
  assert mitigated['ignored']['probe_auc'] > 0.9
  for method in ('projected', 'projected_refitted'):
    assert abs(mitigated[method]['probe_auc'] - 0.5) < 0.05, method
  assert mitigated['refitted_all']['probe_auc'] == audit['probe_auc']
  # The device is a shift of the mean: once erased, no function reads it.
  assert audit['nonlinear_probe_auc'] > 0.9
  assert mitigated['projected']['nonlinear_probe_auc'] < 0.6
  best = mitigated['projected_refitted']
  assert best['anticorrelated_auc'] > audit['anticorrelated_auc'] + 0.1
  assert abs(best['anticorrelated_auc'] - best['deconfounded_auc']) < 0.05
  assert set(result['splits']['test_anticorrelated']) >= {
      'num_examples', 'device_rate_positives', 'device_rate_negatives'}
  with pytest.raises(ValueError, match='--num_latents'):
    bias.analyse(splits, _shortcut_head, num_latents=NUM_LATENTS)


def test_bias_needs_the_phantom(tmp_path):
  config = shrink(default.get_config(), dataset='covid3')
  with pytest.raises(ValueError, match="config.dataset: .*'covid3'"):
    bias.audit_and_mitigate(config, str(tmp_path), str(tmp_path / 'out'))


# The tiny phantom, confounded, with enough test images for an AUC.
OVERRIDES = dict(phantom__num_train=160, phantom__num_validation=64,
                 phantom__num_test=160, phantom__confounder_strength=0.8)


def test_command_audits_a_trained_checkpoint(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  config = shrink(default.get_config(), data_dir=data_dir, **OVERRIDES)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  out = tmp_path / 'bias'
  command = [sys.executable, '-m', 'pumamednet_jax.bias',
             f'--workdir={workdir}', f'--out={out}', '--num_latents=3',
             '--bootstrap=100',
             *config_flags('configs/default.py', data_dir=data_dir,
                           **OVERRIDES)]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| projected:' in result.stdout
  with open(out / 'bias.json') as file:
    report = json.load(file)
  assert set(report['audit']) >= set(bias.KEYS)
  assert set(report['mitigated']) == set(bias.METHODS)
  for row in [report['audit'], *report['mitigated'].values()]:
    for key in bias.KEYS:
      assert 0.0 <= row[key] <= 1.0, key
  assert report['settings']['step'] == 4
  assert report['settings']['confounder_strength'] == 0.8
  assert len(report['latents']) == 8 and len(report['ignored_latents']) == 3
  splits = report['splits']
  assert splits['test']['num_examples'] == 160
  assert splits['validation_deconfounded']['num_examples'] == 64
  # The phantom's rule, in the data the command read.
  assert splits['test_anticorrelated']['device_rate_negatives'] > 0.7
  assert splits['train']['device_rate_positives'] > 0.7
  # The device alone, on the i.i.d. split: P(device | target) 0.84 vs 0.04.
  assert report['audit']['confounder_only_auc'] > 0.8
  assert (out / 'bias.md').read_text().startswith(
      '# Bias audit: support_device and Pneumothorax')
  assert (out / 'confounder_latents.png').stat().st_size > 5000


def _report(iid, anti, mitigated_anti):
  measures = lambda a: {'iid_auc': iid, 'deconfounded_auc': 0.8,
                        'anticorrelated_auc': a, 'probe_auc': 0.7,
                        'nonlinear_probe_auc': 0.75}
  return {'audit': measures(anti),
          'mitigated': {'projected': measures(mitigated_anti)}}


def test_study_table_measures_the_gap_closed_and_the_distance_to_unconfounded():
  rows = bias_study.table_rows({0.8: _report(0.9, 0.6, 0.8),
                                0.0: _report(0.85, 0.84, 0.88)})
  assert [(r['strength'], r['method']) for r in rows] == [
      (0.0, 'none'), (0.0, 'projected'), (0.8, 'none'), (0.8, 'projected')]
  assert rows[3]['gap_closed'] == pytest.approx(2 / 3)
  assert rows[3]['anti_vs_unconfounded'] == pytest.approx(-0.04)
  assert rows[3]['anti_vs_unconfounded_same_method'] == pytest.approx(-0.08)
  assert rows[2]['anti_vs_unconfounded_same_method'] == pytest.approx(-0.24)
  assert rows[2]['gap_closed'] == 0.0
  table = bias_study.markdown_table(rows)
  assert ('| 0.8 | projected | 0.900 | 0.800 | 0.800 | 0.700 | 0.750 | 67% | -0.040 '
          '| -0.080 |') in table
  alone = bias_study.table_rows({1.0: _report(0.9, 0.9, 0.8)})
  assert alone[1]['gap_closed'] is None and alone[1][
      'anti_vs_unconfounded'] is None
  assert '| – | – | – |' in bias_study.markdown_table(alone)


def test_study_trains_audits_and_tabulates_each_strength(tmp_path):
  config = shrink(default.get_config(), data_dir=str(tmp_path / 'tfds'),
                  **OVERRIDES)
  out = tmp_path / 'study'
  rows = bias_study.run_study(config, str(out), strengths=(0.0, 1.0),
                              num_latents=3, num_resamples=50)
  assert len(rows) == 2 * (1 + len(bias.METHODS))
  saved = out / 'strength_1' / 'bias' / 'bias.json'
  report = json.loads(saved.read_text())
  assert report['settings']['confounder_strength'] == 1.0
  assert report['splits']['train']['device_rate_negatives'] == 0.0
  assert (out / 'strength_0' / 'checkpoints').is_dir()
  assert json.loads((out / 'bias_study.json').read_text()) == rows
  assert (out / 'bias_study.md').read_text().count('\n') == len(rows) + 2
  # A second run reuses the runs and the audits.
  modified = saved.stat().st_mtime_ns
  assert bias_study.run_study(config, str(out), strengths=(0.0, 1.0),
                              num_latents=3, num_resamples=50) == rows
  assert saved.stat().st_mtime_ns == modified
