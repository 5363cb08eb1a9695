"""The commands on a ResNet-18 checkpoint: predict without reconstructions,
and a clear refusal from those that need PumaMedNet."""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import default
from input_pipeline import decode
from input_pipeline import heads as heads_lib
from input_pipeline import labels as labels_lib
from pumamednet_jax import bias
from pumamednet_jax import checkpoints
from pumamednet_jax import disentangle
from pumamednet_jax import explain
from pumamednet_jax import export_torch
from pumamednet_jax import models
from pumamednet_jax import predict
from pumamednet_jax import report as report_lib
from e2e_support import shrink

REAL_PNG = '00000001_000.png'
HEADS = heads_lib.chestxray14_heads()[:2]  # findings and view


def tiny_config(arch: str, data_dir: str = ''):
  return shrink(default.get_config(), model__arch=arch, data_dir=data_dir)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  """An orbax checkpoint of a ResNet-18 at 64 px (BatchNorm stats included)."""
  model_config = models.model_config(tiny_config(models.RESNET18), HEADS,
                                     'xla')
  workdir = tmp_path_factory.mktemp('resnet18')
  checkpoints.save_params(str(workdir), model_config,
                          jax.device_get(models.init_params(model_config, 3)))
  return workdir


@pytest.fixture(scope='module')
def png(real_data_dir) -> pathlib.Path:
  return real_data_dir / 'real_cxr' / REAL_PNG


def test_predict_gives_probabilities_and_no_corrected_images(workdir, png,
                                                             tmp_path):
  out = tmp_path / 'out'
  summary = predict.predict([png], str(out), workdir=str(workdir),
                            num_workers=0)
  (row,) = summary.rows
  assert row['error'] == '' and row['top_finding'] in labels_lib.FINDINGS
  # The scores of the model in inference mode (BatchNorm's running stats).
  model_config, params = checkpoints.load_params(str(workdir))
  image = decode.load_grayscale(png, 64)[None, ..., None] / np.float32(255)
  _, outputs, _ = models.bind(model_config, params)(image, train=False)
  expected = np.concatenate([
      np.ravel(models.head_scores(head, outputs[head.name]))
      for head in HEADS])
  got = [v for k, v in row.items() if k.startswith('prob/')]
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  assert not (out / predict.CORRECTED_DIR).exists()
  with open(out / 'predictions.csv', newline='') as file:
    (saved,) = csv.DictReader(file)
  assert saved['corrected'] == '' and saved['top_finding'] == row['top_finding']
  document = json.loads((out / 'predictions.json').read_text())
  assert document['model']['arch'] == models.RESNET18
  assert document['predictions'][0]['corrected'] is None
  assert 'does not reconstruct' in document['columns']['corrected']


def test_predict_explain_is_refused_before_any_file_is_read(workdir, png,
                                                            tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match='--explain.*resnet18'):
    predict.predict([png], str(out), workdir=str(workdir), explain=True)
  assert not out.exists()


def _export(workdir, out):
  export_torch.export(workdir, str(out / 'model.safetensors'))


def _disentangle(workdir, out):
  disentangle.disentangle(workdir, str(out), num_samples=10,
                          factor_vae_votes=2)


def _bias(workdir, out):
  bias.audit_and_mitigate(tiny_config(models.RESNET18, str(out / 'tfds')),
                          workdir, str(out / 'bias'))


def _explain(workdir, out):
  explain.explain(workdir, str(out / 'explain'),
                  tiny_config(models.RESNET18, str(out / 'tfds')))


@pytest.mark.parametrize('command', [_export, _disentangle, _bias, _explain])
def test_commands_that_need_pumamednet_refuse_it(workdir, tmp_path, command):
  with pytest.raises(ValueError) as error:
    command(str(workdir), tmp_path)
  message = str(error.value)
  assert 'resnet18' in message and str(workdir) in message, message
  assert 'PumaMedNet' in message, message
  assert list(tmp_path.iterdir()) == []  # Nothing written or rendered.


def test_run_summary_suggests_export_torch_only_for_pumamednet(tmp_path):
  report = {'mean_auc': None, 'mean_auc_defective': None,
            'defects': {'conditions': {}}, 'out_dir': str(tmp_path / 'r')}
  lines = {arch: '\n'.join(report_lib.run_summary_lines(
      report, str(tmp_path), models.model_config(tiny_config(arch), HEADS,
                                                 'xla')))
           for arch in models.ARCHS}
  assert 'pumamednet_jax.export_torch' in lines[models.PUMAMEDNET]
  assert 'image grids' in lines[models.PUMAMEDNET]
  assert 'export_torch' not in lines[models.RESNET18]
  assert 'image grids' not in lines[models.RESNET18]
