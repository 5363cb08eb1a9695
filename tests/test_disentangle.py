"""`disentangle` end to end: a tiny trained checkpoint, scored on the phantom."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import default
from input_pipeline import labels as labels_lib
from input_pipeline import phantom
from pumamednet_jax import disentangle
from pumamednet_jax import train
from e2e_support import shrink

METRICS = ('mig', 'dci_disentanglement', 'dci_completeness',
           'dci_informativeness', 'sap', 'factor_vae')


def test_factors_are_the_phantoms():
  factors = phantom.sample_factors(np.random.default_rng(0))
  for name in disentangle.FACTOR_NAMES:
    assert name in factors or name in labels_lib.FINDINGS


@pytest.mark.parametrize('name', ['age', 'sex', 'Effusion'])
def test_fix_factor_holds_one_factor_and_lets_the_others_vary(name):
  rng = np.random.default_rng(1)
  batch = [phantom.sample_factors(rng) for _ in range(64)]
  # The first example has an effusion, so the fixed severity is not 0.
  severity = np.array(batch[0]['sign_severity'], np.float32)
  severity[labels_lib.FINDINGS.index('Effusion')] = 0.8
  batch[0] = phantom.with_factors(batch[0], sign_severity=severity)
  values = np.array([disentangle.factor_values(f) for f in
                     disentangle.fix_factor(batch, name)])
  column = disentangle.FACTOR_NAMES.index(name)
  assert np.all(values[:, column] == values[0, column])
  others = np.delete(values, column, axis=1)
  assert np.all(others.std(axis=0) > 0)
  if name == 'Effusion':
    assert values[0, column] == pytest.approx(0.8)


def test_disentangle_writes_metrics_and_the_information_map(phantom_data_dir,
                                                            tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(
      shrink(default.get_config(), data_dir=str(phantom_data_dir)), str(workdir))
  out = tmp_path / 'disentangle'
  metrics = disentangle.disentangle(str(workdir), str(out), num_samples=300,
                                    factor_vae_votes=16)
  saved = json.loads((out / 'metrics.json').read_text())
  for name in METRICS:
    assert 0.0 <= saved[name] <= 1.0, name
    assert saved[name] == pytest.approx(metrics[name])
  assert list(saved['mig_per_factor']) == list(disentangle.FACTOR_NAMES)
  assert np.mean(list(saved['mig_per_factor'].values())) == pytest.approx(
      saved['mig'])
  assert saved['num_samples'] == 300 and saved['num_test'] == 150
  assert saved['latent_dim'] == 8
  with Image.open(out / 'mi.png') as image:
    assert image.format == 'PNG' and image.size[0] > 300


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    disentangle.disentangle(str(tmp_path / 'empty'), str(tmp_path / 'out'),
                            num_samples=10, factor_vae_votes=2)
