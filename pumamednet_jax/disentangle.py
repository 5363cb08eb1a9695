"""Disentanglement of a checkpoint's latent space on the phantom's known factors.

  python -m pumamednet_jax.disentangle --workdir W --out DIR [--num_samples N]

Renders phantom chest X-rays (the 'chestxray14' variant, support device
independent of the findings) at the checkpoint's image size, encodes the
clean images with the latest checkpoint of W (the code is the encoder mean),
and scores the code against FACTORS with `disentanglement`'s metrics. Writes
DIR/metrics.json and DIR/mi.png (the latent × factor mutual information).
"""

import functools
import json
import os
import time
from typing import Any

import jax
import matplotlib
import numpy as np
from absl import app
from absl import flags
from absl import logging

from input_pipeline import labels as labels_lib
from input_pipeline import phantom
from pumamednet_jax import disentanglement as dis
from pumamednet_jax import inference
from pumamednet_jax import models

matplotlib.use('Agg')
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

# The phantom's generating factors that are scored, and whether each is
# categorical (else ordered). Cardiomegaly and Effusion are their severities
# (0 when absent); rotation_degrees is the patient's tilt.
FACTORS = (('sex', True), ('age', False), ('view', True),
           ('heart_size', False), ('body_size', False), ('inspiration', False),
           ('exposure', False), ('rotation_degrees', False),
           ('Cardiomegaly', False), ('Effusion', False),
           ('support_device', True))
FACTOR_NAMES = tuple(name for name, _ in FACTORS)
CATEGORICAL = np.array([categorical for _, categorical in FACTORS])
VARIANT = 'chestxray14'
# Examples rendered and encoded at a time (bounds memory at large image sizes).
RENDER_GROUP = 1024
ENCODE_BATCH = 256
# FactorVAE votes by default: each renders and encodes a batch of 64 images,
# so disentanglement_lib's 10,000 + 5,000 would take 960,000 images.
FACTOR_VAE_VOTES = 800


def factor_values(factors: dict[str, Any]) -> list[float]:
  """The FACTORS of one example, in order."""
  return [float(factors['sign_severity'][labels_lib.FINDINGS.index(name)])
          if name in labels_lib.FINDINGS else float(factors[name])
          for name in FACTOR_NAMES]


def fix_factor(batch: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
  """The batch with factor `name` of every example set to the first's (a
  finding: its severity and side)."""
  first = batch[0]
  if name not in labels_lib.FINDINGS:
    return [phantom.with_factors(f, **{name: first[name]}) for f in batch]
  index = labels_lib.FINDINGS.index(name)
  fixed = []
  for factors in batch:
    severity = np.array(factors['sign_severity'], np.float32)
    side = np.array(factors['sign_side'], np.uint8)
    severity[index], side[index] = first['sign_severity'][index], first['sign_side'][index]
    fixed.append(phantom.with_factors(factors, sign_severity=severity,
                                      sign_side=side))
  return fixed


def load_encoder(workdir: str):
  """(model config, a function of uint8 images (N, S, S) → encoder means
  (N, latents)) of the checkpoint `inference.load_checkpoint` picks."""
  checkpoint = inference.load_on_device(workdir)
  model_config, params, policy = (checkpoint.model_config, checkpoint.params,
                                  checkpoint.policy)
  models.require_pumamednet(
      model_config, workdir,
      'disentangle: the metrics score a latent code (a PumaMedNet checkpoint)')

  @functools.partial(jax.jit, compiler_options=policy.compiler_options or None)
  def encode(params, images):
    model = models.bind(model_config, params)
    return models.in_chunks(lambda x: model.encode(x)[0], images,
                            policy.inference_chunk(images.shape))

  def encoder(images: np.ndarray) -> np.ndarray:
    means = []
    for start in range(0, len(images), ENCODE_BATCH):
      part = images[start:start + ENCODE_BATCH]
      padded = np.zeros((ENCODE_BATCH, *part.shape[1:], 1), np.float32)
      padded[:len(part), ..., 0] = part / np.float32(255)
      means.append(np.asarray(encode(params, padded))[:len(part)])
    return np.concatenate(means)

  return model_config, encoder


class _Timer:
  """Wall and CPU (all threads of the process) seconds per named phase; on a
  shared machine the CPU seconds say what a phase costs."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.cpu_seconds: dict[str, float] = {}

  @staticmethod
  def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()

  def add(self, name: str, start: tuple[float, float]) -> None:
    wall, cpu = self.now()
    self.seconds[name] = self.seconds.get(name, 0.0) + wall - start[0]
    self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + cpu - start[1]


def plot_information(information: np.ndarray, path: str) -> None:
  """Heat map of the normalised (latents, factors) mutual information, the
  latents grouped by the factor they know most about, most informative first."""
  order = np.lexsort((-information.max(axis=1), information.argmax(axis=1)))
  matrix = information[order].T
  width = max(6.0, 0.13 * matrix.shape[1] + 2.5)
  figure, axes = plt.subplots(figsize=(width, 0.35 * matrix.shape[0] + 1.6))
  image = axes.imshow(matrix, aspect='auto', cmap='viridis', vmin=0,
                      vmax=max(float(matrix.max()), 1e-6),
                      interpolation='nearest')
  axes.set_yticks(range(len(FACTOR_NAMES)), FACTOR_NAMES)
  axes.set_xticks(range(len(order)), [str(i) for i in order], fontsize=6,
                  rotation=90)
  axes.set_xlabel('latent (sorted by the factor it knows most about)')
  axes.set_title('I(latent; factor) / H(factor)')
  figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def disentangle(workdir: str, out: str, *, num_samples: int = dis.NUM_TRAIN,
                factor_vae_votes: int = FACTOR_VAE_VOTES,
                seed: int = 0) -> dict[str, Any]:
  """Scores the latest checkpoint of `workdir`; writes metrics.json and
  mi.png to `out` and returns the metrics.

  `num_samples` examples train the metrics' predictors and half as many test
  them (the examples of the phantom's 'test' split drawn with `seed`);
  FactorVAE uses `factor_vae_votes` training votes and half as many
  evaluation votes.
  """
  if num_samples < 2 or factor_vae_votes < 2:
    raise ValueError('--num_samples and --factor_vae_votes must be >= 2, got '
                     f'{num_samples} and {factor_vae_votes}')
  timer = _Timer()
  begin = timer.now()
  model_config, encoder = load_encoder(workdir)
  timer.add('load', begin)

  def codes_of(factors_list):
    codes = []
    for first in range(0, len(factors_list), RENDER_GROUP):
      start = timer.now()
      images, _ = phantom.render_batch(
          factors_list[first:first + RENDER_GROUP], model_config.image_size)
      timer.add('render', start)
      start = timer.now()
      codes.append(encoder(images))
      timer.add('encode', start)
    return np.concatenate(codes)

  num_test = max(num_samples // 2, 1)
  examples = [phantom.example_factors(seed, 'test', i, VARIANT)
              for i in range(num_samples + num_test)]
  values = np.array([factor_values(f) for f in examples])
  codes = codes_of(examples)
  train = slice(0, num_samples)
  test = slice(num_samples, None)

  start = timer.now()
  binned = dis.discretize_factors(values[train], CATEGORICAL)
  mig, mig_per_factor, information = dis.mig(codes[train], binned,
                                             list(FACTOR_NAMES))
  timer.add('mig', start)
  start = timer.now()
  dci = dis.dci(codes[train], values[train], codes[test], values[test],
                CATEGORICAL, n_jobs=-1)
  timer.add('dci', start)
  start = timer.now()
  sap, _ = dis.sap(codes[train], values[train], codes[test], values[test],
                   CATEGORICAL)
  timer.add('sap', start)

  def fixed_factor_codes(fixed, rng):
    batches = []
    for factor in fixed:
      batch = [phantom.sample_factors(rng, VARIANT)
               for _ in range(dis.FACTOR_VAE_BATCH)]
      batches.extend(fix_factor(batch, FACTOR_NAMES[factor]))
    return codes_of(batches).reshape(len(fixed), dis.FACTOR_VAE_BATCH, -1)

  start = timer.now()
  factor_vae = dis.factor_vae_score(
      fixed_factor_codes, len(FACTORS), codes[train].var(axis=0, ddof=1),
      np.random.default_rng([seed, 1]), num_train_votes=factor_vae_votes,
      num_eval_votes=max(factor_vae_votes // 2, 1))
  timer.add('factor_vae (with its render and encode)', start)

  metrics = {
      'mig': mig,
      'dci_disentanglement': dci['disentanglement'],
      'dci_completeness': dci['completeness'],
      'dci_informativeness': dci['informativeness'],
      'sap': sap,
      'factor_vae': factor_vae['eval_accuracy'],
      'mig_per_factor': dict(zip(FACTOR_NAMES, map(float, mig_per_factor))),
      'dci_informativeness_per_factor': dict(zip(
          FACTOR_NAMES, map(float, dci['informativeness_per_factor']))),
      'num_samples': num_samples,
      'num_test': num_test,
      'factor_vae_votes': {'train': factor_vae_votes,
                           'eval': max(factor_vae_votes // 2, 1)},
      'num_active_latents': int(np.sum(codes[train].std(axis=0)
                                       >= dis.ACTIVE_STD)),
      'latent_dim': model_config.latent_dim,
      'image_size': model_config.image_size,
  }
  os.makedirs(out, exist_ok=True)
  plot_information(information, os.path.join(out, 'mi.png'))
  timer.add('total', begin)
  metrics['seconds'] = {name: round(value, 2) for name, value in
                        timer.seconds.items()}
  metrics['cpu_seconds'] = {name: round(value, 2) for name, value in
                            timer.cpu_seconds.items()}
  with open(os.path.join(out, 'metrics.json'), 'w') as file:
    json.dump(metrics, file, indent=2)
  return metrics


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string('workdir', None, 'Training directory with checkpoints.')
  flags.DEFINE_string('out', None, 'Directory for metrics.json and mi.png.')
  flags.DEFINE_integer('num_samples', dis.NUM_TRAIN,
                       'Examples that train the predictors (half as many test).')
  flags.DEFINE_integer('factor_vae_votes', FACTOR_VAE_VOTES,
                       'FactorVAE training votes of 64 images each (half as '
                       'many evaluation votes).')
  flags.DEFINE_integer('seed', 0, 'Seed of the rendered examples.')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flag = flags.FLAGS
  metrics = disentangle(flag.workdir, flag.out, num_samples=flag.num_samples,
                        factor_vae_votes=flag.factor_vae_votes, seed=flag.seed)
  logging.info('%s', {k: v for k, v in metrics.items() if isinstance(v, float)})
  print(json.dumps({k: round(v, 4) for k, v in metrics.items()
                    if isinstance(v, float)}))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
