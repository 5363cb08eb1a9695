"""The predict command over real and generated files, good and broken."""

import csv
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pydicom
import pytest
from PIL import Image

from configs import default
from input_pipeline import decode
from input_pipeline import labels as labels_lib
from pumamednet_jax import checkpoints
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import inference
from input_pipeline import heads as heads_lib
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import predict
from pumamednet_jax import prediction_table
from pumamednet_jax import torch_convert
from e2e_support import REPO_ROOT, shrink

REAL_PNG = '00000001_000.png'
REAL_DICOM = '1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm'
FAKE_MONOCHROME1 = 'Fake_MONOHR1.dcm'
# The heads of the phantom (ChestX-ray14 variant), as the pipeline makes them.
HEADS = heads_lib.chestxray14_heads()


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> pathlib.Path:
  """An orbax checkpoint of the tiny default model at 64 px."""
  config = shrink(default.get_config())
  model_config = models.model_config(config, HEADS, 'xla')
  workdir = tmp_path_factory.mktemp('run')
  checkpoints.save_params(str(workdir), model_config,
                          jax.device_get(models.init_params(model_config, 3)),
                          step=5)
  return workdir


@pytest.fixture(scope='module')
def acceptance_dir(tmp_path_factory, real_data_dir) -> pathlib.Path:
  """The real PNG and DICOM, an inverted MONOCHROME1 copy of the DICOM, the
  fake MONOCHROME1 file, an empty .png and a text file named .png."""
  folder = tmp_path_factory.mktemp('acceptance')
  real = real_data_dir / 'real_cxr'
  for name in (REAL_PNG, REAL_DICOM, FAKE_MONOCHROME1):
    shutil.copy(real / name, folder / name)
  dataset = pydicom.dcmread(real / REAL_DICOM)
  dataset.set_pixel_data(255 - dataset.pixel_array, 'MONOCHROME1', 8)
  dataset.save_as(folder / 'inverted_monochrome1.dcm')
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'text.png').write_text('This is not a PNG.\n')
  return folder


def read_csv(path) -> dict[str, dict[str, str]]:
  with open(path, newline='') as file:
    return {os.path.basename(row['file']): row for row in csv.DictReader(file)}


def probabilities(row) -> np.ndarray:
  return np.array([float(v) for k, v in row.items() if k.startswith('prob/')])


def run_cli(*args, block_torch=False) -> subprocess.CompletedProcess:
  prefix = "import sys; sys.modules['torch'] = None; " if block_torch else ''
  code = prefix + ('from absl import app; from pumamednet_jax import predict; '
                   'predict._define_flags(); app.run(predict.main)')
  return subprocess.run([sys.executable, '-c', code, *map(str, args)],
                        cwd=REPO_ROOT, capture_output=True, text=True,
                        check=False, timeout=600)


def test_acceptance_folder_from_the_command_line(workdir, acceptance_dir,
                                                 tmp_path):
  out = tmp_path / 'out'
  result = run_cli('--workdir', workdir, '--out', out, acceptance_dir)
  assert result.returncode == 2, result.stderr
  assert 'predict: 6 files, 4 predicted, 2 failed' in result.stdout
  rows = read_csv(out / 'predictions.csv')
  assert len(rows) == 6
  failed = {name for name, row in rows.items() if row['error']}
  assert failed == {'empty.png', 'text.png'}
  for name, row in rows.items():
    values = [v for k, v in row.items() if k.startswith('prob/')]
    assert len(values) == 15 + 4
    if name in failed:
      # The reason preparation gives, and no made-up prediction.
      assert row['error'] == decode.prepare_file(acceptance_dir / name, 64)[1]
      assert all(v == '' for v in values) and row['top_finding'] == ''
    else:
      assert np.all(np.isfinite(probabilities(row)))
      assert row['top_finding'] in labels_lib.FINDINGS
      assert (out / 'corrected' / f'{name}.png').is_file()
  np.testing.assert_allclose(probabilities(rows['inverted_monochrome1.dcm']),
                             probabilities(rows[REAL_DICOM]), atol=1e-6,
                             rtol=0)
  fake_gap = np.abs(probabilities(rows[FAKE_MONOCHROME1]) -
                    probabilities(rows[REAL_DICOM])).max()
  assert fake_gap > 1e-4
  # No evaluation report: the calls say so.
  assert rows[REAL_PNG]['call/Cardiomegaly'] == prediction_table.NO_THRESHOLD
  document = json.loads((out / 'predictions.json').read_text())
  assert len(document['predictions']) == 6
  assert document['predictions'][0].keys() == rows[REAL_PNG].keys()
  assert 'AP' in document['columns']['prob/view']


def test_outputs_equal_the_eval_step_on_the_same_prepared_images(
    workdir, acceptance_dir, tmp_path):
  names = [REAL_PNG, REAL_DICOM, FAKE_MONOCHROME1, 'inverted_monochrome1.dcm']
  files = [acceptance_dir / name for name in names]
  summary = predict.predict(files, str(tmp_path / 'out'), workdir=str(workdir),
                            batch_size=3, num_workers=0)
  model_config, params = checkpoints.load_params(str(workdir))
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh)
  eval_fn = inference.make_score_fn(
      mesh, dataclasses.replace(model_config, conv_impl=policy.conv_impl),
      defects_lib.DefectConfig(), 0, policy=policy, defective=False)
  size = len(files)
  batch = {
      'image': np.stack([decode.load_grayscale(f, 64) for f in files])[..., None],
      'index': np.arange(size, dtype=np.int32),
      'valid': np.ones(size, np.float32),
      'labels': np.zeros((size, 15), np.float32),
      'view': np.zeros(size, np.int32), 'sex': np.zeros(size, np.int32),
      'age_above_median': np.zeros(size, np.int32),
      'age': np.zeros(size, np.float32),
  }
  outputs = jax.device_get(eval_fn(params, batch))
  for i, row in enumerate(summary.rows):
    assert row['error'] == ''
    expected = np.concatenate([np.ravel(outputs[f'{h.name}/score'][i])
                               for h in model_config.heads])
    got = np.array([v for k, v in row.items() if k.startswith('prob/')])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def _noise(rng, shape):
  return rng.integers(0, 256, shape, dtype=np.uint8)


def test_generated_formats_give_finite_probabilities_and_warnings(
    workdir, tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'in'
  (folder / 'a').mkdir(parents=True)
  (folder / 'b').mkdir()
  Image.fromarray(_noise(rng, (80, 70, 3))).save(folder / 'rgb.png')
  Image.fromarray(_noise(rng, (80, 80, 4))).save(folder / 'rgba.png')
  Image.fromarray(rng.integers(0, 4096, (90, 80), dtype=np.uint16)).save(
      folder / 'sixteen.png')
  Image.fromarray(_noise(rng, (64, 64, 4)), mode='CMYK').save(
      folder / 'cmyk.jpg')
  gradient = np.add.outer(np.arange(2500), np.arange(3000)) % 256
  Image.fromarray(gradient.astype(np.uint8)).save(folder / 'large.jpg')
  Image.fromarray(_noise(rng, (20, 20))).save(folder / 'a' / 'image.png')
  Image.fromarray(_noise(rng, (60, 200))).save(folder / 'b' / 'image.png')
  with Image.open(folder / 'sixteen.png') as image:
    assert image.mode.startswith('I')
  with Image.open(folder / 'cmyk.jpg') as image:
    assert image.mode == 'CMYK'

  out = tmp_path / 'out'
  summary = predict.predict([folder], str(out), workdir=str(workdir),
                            num_workers=2)
  rows = {os.path.relpath(r['file'], folder): r for r in summary.rows}
  assert sorted(rows) == ['a/image.png', 'b/image.png', 'cmyk.jpg',
                          'large.jpg', 'rgb.png', 'rgba.png', 'sixteen.png']
  for row in rows.values():
    assert row['error'] == ''
    assert np.all(np.isfinite(probabilities(row)))
  assert 0 <= rows['rgb.png']['prob/view'] <= 1
  assert 'far smaller' in rows['a/image.png']['warning']
  assert 'non-square' in rows['b/image.png']['warning']
  assert rows['rgb.png']['warning'] == rows['large.jpg']['warning'] == ''
  # Two image.png in different folders: two corrected images, each the
  # input (as decoded) beside its reconstruction.
  for name in ('a/image.png', 'b/image.png'):
    corrected = np.asarray(Image.open(out / 'corrected' / f'{name}.png'))
    assert corrected.shape == (64, 128)
    np.testing.assert_array_equal(
        corrected[:, :64], decode.load_grayscale(folder / name, 64))
  assert summary.num_failed == 0


def test_same_relative_paths_from_two_folders_get_distinct_outputs(
    workdir, tmp_path):
  rng = np.random.default_rng(1)
  for folder in ('x', 'y'):
    (tmp_path / folder).mkdir()
    Image.fromarray(_noise(rng, (64, 64))).save(tmp_path / folder / 'image.png')
  summary = predict.predict([tmp_path / 'x', tmp_path / 'y'],
                            str(tmp_path / 'out'), workdir=str(workdir))
  assert [row['corrected'] for row in summary.rows] == [
      'corrected/image.png.png', 'corrected/image.png~2.png']
  assert len(set(map(str, (tmp_path / 'out' / 'corrected').iterdir()))) == 2


def test_existing_results_are_refused_without_overwrite(
    workdir, acceptance_dir, tmp_path):
  out = tmp_path / 'out'
  files = [acceptance_dir / REAL_PNG]
  predict.predict(files, str(out), workdir=str(workdir))
  with pytest.raises(FileExistsError, match='--overwrite'):
    predict.predict(files, str(out), workdir=str(workdir))
  stale = out / 'corrected' / 'stale.png.png'
  stale.write_bytes(b'')
  summary = predict.predict(files, str(out), workdir=str(workdir),
                            overwrite=True)
  assert summary.num_failed == 0 and not stale.exists()


def test_thresholds_of_the_evaluation_report_give_calls(
    workdir, acceptance_dir, tmp_path):
  files = [acceptance_dir / REAL_PNG, acceptance_dir / REAL_DICOM]
  first = predict.predict(files, str(tmp_path / 'first'), workdir=str(workdir))
  png, dicom = first.rows
  # A threshold between the two images' probabilities calls exactly one.
  middle = (png['prob/labels/Effusion'] + dicom['prob/labels/Effusion']) / 2
  report = tmp_path / 'report.json'
  report.write_text(json.dumps({'heads': {
      'labels/Effusion': {'threshold': middle, 'auc': 0.5},
      'view': {'threshold': 0.5}}}))
  second = predict.predict(files, str(tmp_path / 'second'),
                           workdir=str(workdir), report=str(report))
  calls = [row['call/Effusion'] for row in second.rows]
  assert sorted(calls) == [0, 1]
  assert calls[0] == int(png['prob/labels/Effusion'] >= middle)
  assert second.rows[0]['call/Cardiomegaly'] == prediction_table.NO_THRESHOLD


def test_explain_writes_latent_shift_strips(workdir, acceptance_dir, tmp_path):
  out = tmp_path / 'out'
  summary = predict.predict([acceptance_dir / REAL_PNG], str(out),
                            workdir=str(workdir), explain=True)
  row = summary.rows[0]
  strip = np.asarray(Image.open(out / row['explanation']))
  assert strip.shape[1] > 3 * strip.shape[0]  # 8 panels side by side
  assert strip.std() > 0
  # λ = 0 is the reconstruction; the frames follow the gradient of the finding.
  model_config, params = checkpoints.load_params(str(workdir))
  policy = platform_lib.for_platform('cpu')
  head = model_config.heads[0]
  index = head.names.index(row['top_finding'])
  image = decode.load_grayscale(acceptance_dir / REAL_PNG, 64) / 255.0
  frames, probs, probability = jax.jit(functools.partial(
      predict.latent_lib.latent_shift, model_config=model_config,
      head=head, policy=policy))(params, image.astype(np.float32), np.int32(index))
  reconstruction, scores = predict.model_outputs(
      params, decode.load_grayscale(acceptance_dir / REAL_PNG, 64)[None],
      model_config=model_config, policy=policy)
  middle = predict.latent_lib.SHIFTS.index(0.0)
  np.testing.assert_allclose(frames[middle], reconstruction[0], atol=1e-5)
  np.testing.assert_allclose(probability, scores['labels'][0, index],
                             atol=1e-6)
  assert frames.shape == (len(predict.latent_lib.SHIFTS), 64, 64)
  assert np.all((probs >= 0) & (probs <= 1))
  assert np.abs(frames[0] - frames[-1]).max() > 1e-4


def test_exported_weights_predict_without_pytorch(workdir, acceptance_dir,
                                                  tmp_path):
  model_config, params = checkpoints.load_params(str(workdir))
  weights = tmp_path / 'model.safetensors'
  torch_convert.save_safetensors(str(weights), model_config, params)
  files = [acceptance_dir / REAL_PNG, acceptance_dir / 'text.png']
  out = tmp_path / 'out'
  result = run_cli('--weights', weights, '--out', out, *files,
                   block_torch=True)
  assert result.returncode == 2, result.stderr
  from_weights = read_csv(out / 'predictions.csv')
  from_workdir = predict.predict(files, str(tmp_path / 'ref'),
                                 workdir=str(workdir)).rows[0]
  np.testing.assert_allclose(
      probabilities(from_weights[REAL_PNG]),
      [v for k, v in from_workdir.items() if k.startswith('prob/')],
      atol=1e-6, rtol=0)
  assert from_weights['text.png']['error']


def test_bad_arguments_fail_with_a_clear_message(workdir, tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no image files'):
    predict.predict([tmp_path / 'empty'], str(tmp_path / 'out'),
                    workdir=str(workdir))
  Image.fromarray(_noise(np.random.default_rng(2), (64, 64))).save(
      tmp_path / 'image.png')
  with pytest.raises(ValueError, match='either --workdir or --weights'):
    predict.predict([tmp_path / 'image.png'], str(tmp_path / 'out'))
  with pytest.raises(FileNotFoundError, match='step 7'):
    predict.predict([tmp_path / 'image.png'], str(tmp_path / 'out2'),
                    workdir=str(workdir), step=7)
