"""End-to-end training on the tiny phantom: artefacts, resume, guards, config errors."""

import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from configs import default
from input_pipeline import pipeline
from pumamednet_jax import benchmark
from pumamednet_jax import checkpoints
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import platform as platform_lib
from pumamednet_jax import train
from e2e_support import REPO_ROOT, config_flags, shrink


def logged_hparams(workdir):
  """The hyperparameters in the TensorBoard events of `workdir`."""
  (events,) = workdir.glob('events.out.tfevents.*')
  for event in tf.compat.v1.train.summary_iterator(str(events)):
    for value in event.summary.value:
      if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
        data = plugin_data_pb2.HParamsPluginData.FromString(
            value.metadata.plugin_data.content)
        return {key: getattr(hparam, hparam.WhichOneof('kind'))
                for key, hparam in data.session_start_info.hparams.items()}
  raise AssertionError(f'no hyperparameters in {events}')


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
  hparams = logged_hparams(workdir)
  assert hparams == train.hparams(config)
  assert hparams['model.dtype'] == 'float32'
  assert hparams['loss.beta'] == config.loss.beta
  assert hparams['defects.flip_prob'] == config.defects.flip_prob
  assert hparams['model.channels'] == '(4, 4, 8, 8, 8, 8)'
  assert hparams['validation_fraction'] == 'None'
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
    ('micro_batch_size', 3, 'config.micro_batch_size'),
    ('model.conv_impl', 'bogus', 'config.model.conv_impl'),
])
def test_bad_config_fails_before_any_compute(tmp_path, key, value, message):
  config = shrink(default.get_config(), **{key.replace('.', '__'): value})
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_micro_batches_compute_the_same_step():
  # The SSIM term is left out of the gradient (it is still computed and
  # compared): at init the reconstructions are nearly constant, and float32
  # SSIM (variance = E[x²] − μ²) turns summation-order rounding into ~1%
  # gradient differences. Its micro-batch shares are checked in test_losses.
  config = shrink(default.get_config(), loss__ssim_weight=0.0)
  heads = pipeline.head_specs(pipeline.get_sources(config), config.head_features)
  mesh = jax.sharding.Mesh(jax.devices()[:1], (parallel.AXIS,))
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  batch = benchmark.synthetic_batch(config, heads, config.batch_size)
  # Unknown ages in one half only: the age loss must average over the whole
  # batch's known ages, not over each micro-batch's.
  batch['age_mask'] = np.array([1, 0, 0, 0, 1, 1, 1, 1], np.uint8)
  batch = parallel.shard_batch(batch, mesh)
  # Plain SGD with rate 1: the parameters move by exactly minus the gradient.
  optimizer = optax.sgd(1.0)
  results, loops = {}, {}
  for micro_batch_size in (0, 2):
    config.micro_batch_size = micro_batch_size
    train_fn, _, _ = train.make_steps(config, model_config, mesh, optimizer,
                                      policy)
    state = parallel.replicate(train.create_train_state(
        model_config, optimizer, config.seed), mesh)
    loops[micro_batch_size] = train_fn.lower(state, batch).as_text().count(
        'stablehlo.while')
    results[micro_batch_size] = jax.device_get(train_fn(state, batch))
  # 0 = automatic: a batch of 8 at 64 px is one piece on the CPU; 2 loops.
  assert loops[2] == loops[0] + 1
  (whole_state, whole_metrics), (micro_state, micro_metrics) = results.values()
  assert set(micro_metrics) == set(whole_metrics)
  for name, value in whole_metrics.items():
    np.testing.assert_allclose(micro_metrics[name], value, rtol=1e-5, atol=1e-7,
                               err_msg=name)
  for (path, whole), micro in zip(
      jax.tree_util.tree_leaves_with_path(whole_state.params),
      jax.tree.leaves(micro_state.params)):
    np.testing.assert_allclose(micro, whole, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('image_size, local_size, expected', [
    (64, 32, 16), (64, 8, 8), (128, 32, 8), (256, 32, 2), (512, 32, 1),
    (128, 24, 8), (256, 3, 1)])
def test_automatic_micro_batches_on_the_cpu(image_size, local_size, expected):
  policy = platform_lib.for_devices(jax.devices())
  assert train.micro_batch_size(0, local_size, image_size, policy) == expected
  assert train.micro_batch_size(4, 8, image_size, policy) == 4
  with pytest.raises(ValueError, match='config.micro_batch_size'):
    train.micro_batch_size(3, 8, image_size, policy)


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
