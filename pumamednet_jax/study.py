"""What β buys: disentanglement against mean AUC and SSIM gain, per setting.

  python -m pumamednet_jax.study --config=configs/default.py --out=DIR

Trains the config once per setting of SETTINGS into DIR/<setting> (resuming
what is there), scores each with `disentangle` (DIR/<setting>/disentangle,
kept when present), and writes the table to DIR/study.json and DIR/study.md.
"""

import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pumamednet_jax import disentangle
from pumamednet_jax import disentanglement
from pumamednet_jax import train

# Setting name -> config overrides ('a.b' keys).
SETTINGS = {
    'beta1': {'loss.beta': 1.0},
    'beta4': {'loss.beta': 4.0},
    'beta16': {'loss.beta': 16.0},
    # β-TCVAE with β_TC = 6 (β = 1 + tc_weight 5).
    'tc': {'loss.tc_weight': 5.0},
    # γ·|KL − C|, C rising to loss.capacity_max over loss.capacity_steps.
    'capacity': {'loss.capacity_gamma': 100.0},
    'beta0': {'loss.beta': 0.0},
}
COLUMNS = (('mean_auc', 'mean AUC'), ('ssim_gain', 'SSIM gain'),
           ('mig', 'MIG'), ('dci_disentanglement', 'DCI D'),
           ('dci_completeness', 'DCI C'), ('dci_informativeness', 'DCI I'),
           ('sap', 'SAP'), ('factor_vae', 'FactorVAE'))


def with_overrides(config, overrides: dict[str, Any]):
  """A copy of `config` with the 'a.b' keys of `overrides` set."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise KeyError(f'study setting: config.{key} does not exist')
    node[leaf] = value
  return config


def markdown_table(rows: list[dict[str, Any]]) -> str:
  header = ['setting', 'overrides'] + [title for _, title in COLUMNS]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for row in rows:
    overrides = ', '.join(f'{k}={v}' for k, v in row['overrides'].items())
    lines.append('| ' + ' | '.join(
        [row['setting'], overrides] +
        [f'{row[key]:.3f}' for key, _ in COLUMNS]) + ' |')
  return '\n'.join(lines) + '\n'


def run_study(config, out: str, *, settings: dict[str, dict[str, Any]] = None,
              num_samples: int = disentanglement.NUM_TRAIN,
              factor_vae_votes: int = disentangle.FACTOR_VAE_VOTES
              ) -> list[dict[str, Any]]:
  """Trains and scores every setting; writes and returns the table's rows."""
  settings = SETTINGS if settings is None else settings
  os.makedirs(out, exist_ok=True)
  rows = []
  for name, overrides in settings.items():
    workdir = os.path.join(out, name)
    report = train.train_and_evaluate(with_overrides(config, overrides), workdir)
    scores_dir = os.path.join(workdir, 'disentangle')
    saved = os.path.join(scores_dir, 'metrics.json')
    if os.path.exists(saved):
      with open(saved) as file:
        metrics = json.load(file)
    else:
      metrics = disentangle.disentangle(workdir, scores_dir,
                                        num_samples=num_samples,
                                        factor_vae_votes=factor_vae_votes,
                                        seed=config.seed)
    rows.append({
        'setting': name, 'overrides': overrides,
        'mean_auc': float(report['mean_auc']),
        'ssim_gain': float(report['defect_correction']),
        **{key: float(metrics[key]) for key, _ in COLUMNS[2:]},
        'mig_per_factor': metrics['mig_per_factor'],
    })
    logging.info('study %s: %s', name, rows[-1])
  with open(os.path.join(out, 'study.json'), 'w') as file:
    json.dump(rows, file, indent=2)
  with open(os.path.join(out, 'study.md'), 'w') as file:
    file.write(markdown_table(rows))
  return rows


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  config_flags.DEFINE_config_file('config', None, 'Configuration file.',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'Directory of the runs and the table.')
  flags.DEFINE_integer('num_samples', disentanglement.NUM_TRAIN,
                       'Examples per disentangle run (half as many test).')
  flags.DEFINE_integer('factor_vae_votes', disentangle.FACTOR_VAE_VOTES,
                       'FactorVAE training votes per disentangle run.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  flag = flags.FLAGS
  rows = run_study(flag.config, flag.out, num_samples=flag.num_samples,
                   factor_vae_votes=flag.factor_vae_votes)
  print(markdown_table(rows))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
