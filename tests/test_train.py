"""End-to-end training on the tiny phantom: artefacts, resume, guards, config errors."""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from pumamednet_jax import checkpoints
from pumamednet_jax import models
from pumamednet_jax import train
from e2e_support import REPO_ROOT, config_flags, shrink


def test_train_and_evaluate_writes_checkpoints_events_and_grids(
    phantom_data_dir, tmp_path):
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir))
  workdir = tmp_path / 'run'
  report = train.train_and_evaluate(config, str(workdir))

  assert 0.0 <= report['mean_auc'] <= 1.0
  assert report['num_examples'] == 32
  for name in ('ssim_reconstruction', 'ssim_defective', 'defect_correction',
               'auc/view', 'auc/sex', 'auc/age_above_median', 'mae/age',
               'auc/labels/Cardiomegaly', 'mean_auc/labels'):
    assert name in report
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert saved == [2, 4]
  assert list(workdir.glob('events.out.tfevents.*'))
  assert (workdir / 'images' / 'grid_0000004.png').exists()
  model_config, params = checkpoints.load_params(str(workdir))
  assert [h.name for h in model_config.heads] == [
      'labels', 'view', 'sex', 'age_above_median', 'age']
  assert models.count_params_tree(params) == models.count_params_tree(
      models.abstract_params(model_config))

  # Running again with the same workdir resumes at the end: evaluation only.
  again = train.train_and_evaluate(config, str(workdir))
  assert again['mean_auc'] == pytest.approx(report['mean_auc'])


def test_nonfinite_steps_are_skipped_then_stop_the_run(phantom_data_dir, tmp_path):
  # An infinite loss weight makes every step's loss non-finite.
  config = shrink(default.get_config(), data_dir=str(phantom_data_dir),
                  num_train_steps=10, checkpoint_every_steps=1,
                  max_consecutive_nonfinite=3, num_grid_images=0)
  config.loss.age_weight = float('inf')
  workdir = tmp_path / 'run'
  with pytest.raises(FloatingPointError, match='max_consecutive_nonfinite'):
    train.train_and_evaluate(config, str(workdir))
  model_config, last_saved = checkpoints.load_params(str(workdir))
  initial = models.init_params(model_config, config.seed)
  # No update reached the parameters, and the run stopped early.
  for saved, init in zip(jax.tree.leaves(last_saved), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(saved, init)
  assert max(int(p.name) for p in (workdir / 'checkpoints').iterdir()
             if p.name.isdigit()) <= 4


@pytest.mark.parametrize('key, value, message', [
    ('image_size', 96, 'config.image_size'),
    ('dataset', 'imagenet', 'config.dataset'),
    ('loss.beta', -1.0, 'config.loss.beta'),
    ('batch_size', 0, 'config.batch_size'),
    ('defects.flip_prob', 1.5, 'config.defects.flip_prob'),
])
def test_bad_config_fails_before_any_compute(tmp_path, key, value, message):
  config = shrink(default.get_config(), **{key.replace('.', '__'): value})
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def run_main(workdir, *flags, wait=True):
  command = [sys.executable, 'main.py', f'--workdir={workdir}', *flags]
  if not wait:
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
  return result


def test_misspelt_config_override_names_the_key(tmp_path):
  result = run_main(tmp_path / 'run', '--config=configs/default.py',
                    '--config.bta=4.0')
  assert result.returncode != 0
  assert 'bta' in result.stderr
  assert not (tmp_path / 'run').exists()


def wait_for_checkpoint(process, workdir, after: int, timeout=300.0) -> int:
  """Waits until a finished checkpoint newer than `after` exists."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.stdout.read()
    directory = workdir / 'checkpoints'
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if (
        directory.exists()) else []
    if steps and max(steps) > after:
      return max(steps)
    time.sleep(0.05)
  raise TimeoutError(f'no checkpoint after step {after} in {workdir}')


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(
    phantom_data_dir, tmp_path):
  flags = config_flags('configs/default.py', data_dir=str(phantom_data_dir),
                       num_train_steps=40, checkpoint_every_steps=2,
                       eval_every_steps=1000, log_every_steps=10,
                       num_grid_images=0, num_eval_examples=8)
  reference = tmp_path / 'uninterrupted'
  result = run_main(reference, *flags)
  assert result.returncode == 0, result.stderr[-3000:]

  resumed = tmp_path / 'interrupted'
  # SIGTERM: the run saves a checkpoint of the step it is at and exits.
  process = run_main(resumed, *flags, wait=False)
  wait_for_checkpoint(process, resumed, after=0)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
  assert 'SIGTERM' in output
  stopped_at = checkpoints.create_manager(str(resumed), read_only=True).latest_step()
  assert 0 < stopped_at < 40
  # SIGKILL: nothing is saved; the next run resumes from the last checkpoint.
  process = run_main(resumed, *flags, wait=False)
  killed_after = wait_for_checkpoint(process, resumed, after=stopped_at)
  process.kill()
  process.communicate(timeout=60)
  assert killed_after < 40
  result = run_main(resumed, *flags)
  assert result.returncode == 0, result.stderr[-3000:]

  _, expected = checkpoints.load_params(str(reference))
  _, actual = checkpoints.load_params(str(resumed))
  for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_array_equal(got, want)
