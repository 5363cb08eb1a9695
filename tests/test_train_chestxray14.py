"""main.py trains the paper preset on a prepared tiny ChestX-ray14 tree."""

import json
import subprocess
import sys

import tensorflow_datasets as tfds

from e2e_support import REPO_ROOT, config_flags
from input_pipeline import chestxray14
from pumamednet_jax import checkpoints


def test_main_trains_chestxray14_and_evaluates_on_test(chestxray14_manual_dir,
                                                       tmp_path):
  data_dir = tmp_path / 'prepared'
  # The tiny tree has 4 broken files in 240 (1.7%), above the 1% default.
  builder = chestxray14.builder(data_dir=data_dir, image_size=64,
                                max_quarantine_fraction=0.05, num_workers=0)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(chestxray14_manual_dir)))
  num_test = builder.info.splits['test'].num_examples

  workdir = tmp_path / 'run'
  flags = config_flags('configs/chestxray14.py', image_size=64,
                       data_dir=str(data_dir), eval_split='test',
                       num_train_steps=3, eval_every_steps=3, num_grid_images=2)
  result = subprocess.run([sys.executable, 'main.py', f'--workdir={workdir}',
                           *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'eval at step 3' in result.stderr
  assert f'eval/num_examples={num_test}' in result.stderr
  assert 'eval/auc/labels/Infiltration' in result.stderr
  model_config, _ = checkpoints.load_params(str(workdir))
  assert model_config.image_size == 64
  assert [h.name for h in model_config.heads] == [
      'labels', 'view', 'sex', 'age_above_median', 'age']
  # The run ends with the test report (the paper's column beside ours,
  # intervals by patient) and a summary of where everything is.
  report_dir = workdir / 'report' / 'test'
  report = json.loads((report_dir / 'report.json').read_text())
  assert report['num_examples'] == num_test
  assert report['bootstrap']['unit'] == 'patient'
  assert '| Paper | Δ |' in (report_dir / 'report.md').read_text()
  assert f'report: {report_dir}' in result.stderr
  assert 'next: tensorboard --logdir' in result.stderr
  assert 'python -m pumamednet_jax.export_torch --workdir' in result.stderr
  header = (report_dir / 'predictions.csv').read_text().splitlines()[0]
  assert header.startswith('id,patient_id,target/labels/Atelectasis,')
