"""Times the parts of `pumamednet_jax.evaluate` at ChestX-ray14's size.

  python scripts/bench_evaluate.py [--examples 25596] [--patients 2797] \
      [--resamples 2000] [--image_size 256]

The bootstrap on synthetic scores (15 labels with rare and common
prevalences, 3 metadata heads, clean and defective scores, age MAE, by
patient), and the model's scoring and defect-table rates with random
weights of the paper preset. Prints wall and CPU time (the CPU time bounds
the wall time of an unshared machine).
"""

import os
import resource
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

_EXAMPLES = flags.DEFINE_integer('examples', 25_596, 'Examples of the split.')
_PATIENTS = flags.DEFINE_integer('patients', 2_797, 'Patients of the split.')
_RESAMPLES = flags.DEFINE_integer('resamples', 2_000, 'Bootstrap resamples.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Image side in pixels.')
_BATCH = 32
# Illustrative prevalences of the 15 labels, from a Hernia-rare 0.4% to a
# No Finding-common 38%.
_PREVALENCE = (0.13, 0.04, 0.07, 0.04, 0.18, 0.04, 0.01, 0.004, 0.24, 0.07,
               0.06, 0.04, 0.02, 0.10, 0.38)


def _cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def bench_bootstrap():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = _EXAMPLES.value
  patients = rng.integers(0, _PATIENTS.value, n)
  prevalence = np.r_[_PREVALENCE, 0.5, 0.5, 0.5]  # + view, sex, age > median
  targets = (rng.random((n, len(prevalence))) < prevalence).astype(np.float32)
  scores = (rng.normal(size=targets.shape) + targets).astype(np.float32)
  error = np.abs(rng.normal(size=n) * 10).astype(np.float32)
  wall, cpu = time.time(), _cpu()
  events = np.concatenate([targets > 0.5, targets < 0.5], axis=1)
  statistics = {'mae': stats.mean_statistic(error)}
  for j in range(targets.shape[1]):
    statistics[f'{j}'] = stats.auc_statistic(scores[:, j], targets[:, j])
    statistics[f'defective/{j}'] = stats.auc_statistic(scores[:, j] + 0.1,
                                                       targets[:, j])
  stats.bootstrap(statistics, stats.Resampling(
      n, groups=patients, events=events, num_resamples=_RESAMPLES.value))
  print(f'bootstrap: {len(statistics)} statistics, {n} examples, '
        f'{_PATIENTS.value} patients, {_RESAMPLES.value} resamples: '
        f'{time.time() - wall:.1f} s wall, {_cpu() - cpu:.1f} s CPU')


def _rate(fn, params, batch, mesh, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import parallel  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(params, parallel.shard_batch(batch, mesh)))
  wall, cpu = time.time(), _cpu()
  for _ in range(repeats):
    jax.block_until_ready(fn(params, parallel.shard_batch(batch, mesh)))
  images = repeats * _BATCH
  return images / (time.time() - wall), images / (_cpu() - cpu)


def bench_model():
  import functools  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import chestxray14  # pylint: disable=g-import-not-at-top
  from input_pipeline import labels  # pylint: disable=g-import-not-at-top
  from pumamednet_jax import defect_correction, defects, inference, models, parallel  # pylint: disable=g-import-not-at-top,line-too-long
  from pumamednet_jax import platform as platform_lib  # pylint: disable=g-import-not-at-top
  from input_pipeline import heads as heads_lib  # pylint: disable=g-import-not-at-top
  config = chestxray14.get_config()
  config.image_size = size = _IMAGE_SIZE.value
  heads = heads_lib.chestxray14_heads()
  mesh = parallel.create_mesh()
  policy = platform_lib.for_mesh(mesh, config.model.conv_impl)
  model_config = models.model_config(config, heads, policy.conv_impl)
  params = parallel.replicate(models.init_params(model_config, 0), mesh)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (_BATCH, size, size, 1), np.uint8),
           'index': np.arange(_BATCH, dtype=np.int32),
           'valid': np.ones(_BATCH, np.float32),
           'labels': np.zeros((_BATCH, len(labels.LABELS)), np.float32),
           **{h: np.zeros(_BATCH, np.float32)
              for h in ('view', 'sex', 'age_above_median', 'age')}}
  defect_config = defects.DefectConfig.from_config(config)
  for name, defective in (('clean + defective', True), ('clean only', False)):
    fn = inference.make_score_fn(mesh, model_config, defect_config, 0,
                                 policy=policy, defective=defective)
    wall, cpu = _rate(fn, params, batch, mesh, repeats=6)
    print(f'score step at {size} px, {name}: {wall:.1f} images/s wall, '
          f'{cpu:.1f} images per CPU-second')
  step = parallel.data_parallel(
      functools.partial(defect_correction.correction_step,
                        model_config=model_config,
                        conditions_=defect_correction.conditions(size),
                        ssim=(7, 1.5, config.loss.ssim_filter),
                        grid_examples=2, policy=policy),
      mesh, out_specs=parallel.SHARDED, donate_state=False,
      compiler_options=policy.compiler_options)
  wall, cpu = _rate(step, params, batch, mesh, repeats=2)
  print(f'defect table at {size} px: {wall:.1f} images/s wall, '
        f'{cpu:.1f} images per CPU-second')
  print(f'load average {os.getloadavg()[0]:.1f}')


def main(argv):
  del argv
  bench_bootstrap()
  bench_model()


if __name__ == '__main__':
  app.run(main)
