"""Shortcut learning and its mitigation, per confounder strength.

  python -m pumamednet_jax.bias_study --config=configs/default.py --out=DIR

Trains the config once per strength of STRENGTHS (phantom.confounder_strength,
the rest unchanged) into DIR/strength_<s> (resuming what is there), audits
and mitigates each with `bias` (DIR/strength_<s>/bias, kept when present),
and writes the table to DIR/bias_study.json and DIR/bias_study.md.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pumamednet_jax import bias
from pumamednet_jax import train

STRENGTHS = (0.0, 0.8, 1.0)
COLUMNS = (('iid_auc', 'i.i.d.'), ('deconfounded_auc', 'de-confounded'),
           ('anticorrelated_auc', 'anti-correlated'),
           ('probe_auc', 'probe (device from z)'),
           ('nonlinear_probe_auc', 'non-linear probe'))


def with_strength(config, strength: float):
  """A copy of `config` whose phantom has this confounder strength."""
  config = config.copy_and_resolve_references()
  config.phantom.confounder_strength = float(strength)
  return config


def strength_dir(out: str, strength: float) -> str:
  return os.path.join(out, f'strength_{strength:g}'.replace('.', 'p'))


def _anticorrelated_by_method(report: dict) -> dict[str, float]:
  return {'none': report['audit']['anticorrelated_auc'],
          **{method: measures['anticorrelated_auc']
             for method, measures in report['mitigated'].items()}}


def table_rows(reports: dict[float, dict]) -> list[dict]:
  """One row per (strength, method): the AUCs, the share of the i.i.d. −
  anti-correlated gap that the method closes, and its anti-correlated AUC
  minus that of the unconfounded model (strength 0), as trained and under
  the same method (a refitted head also moves the unconfounded model)."""
  unconfounded = (_anticorrelated_by_method(reports[0.0]) if 0.0 in reports
                  else {})
  rows = []
  for strength, report in sorted(reports.items()):
    audit = report['audit']
    gap = audit['iid_auc'] - audit['anticorrelated_auc']
    methods = [('none', audit)] + list(report['mitigated'].items())
    for method, measures in methods:
      anti = measures['anticorrelated_auc']
      rows.append({
          'strength': strength, 'method': method,
          **{key: measures[key] for key, _ in COLUMNS},
          'gap_closed': ((anti - audit['anticorrelated_auc']) / gap
                         if gap > 0 else None),
          'anti_vs_unconfounded': (anti - unconfounded['none']
                                   if unconfounded else None),
          'anti_vs_unconfounded_same_method': (
              anti - unconfounded[method] if method in unconfounded
              else None),
      })
  return rows


def markdown_table(rows: list[dict]) -> str:
  header = (['strength', 'method'] + [title for _, title in COLUMNS]
            + ['gap closed', 'anti − unconfounded as trained',
               'anti − unconfounded same method'])
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  def number(value, form):
    return '–' if value is None else format(value, form)
  for row in rows:
    lines.append('| ' + ' | '.join(
        [f"{row['strength']:g}", row['method']]
        + [number(row[key], '.3f') for key, _ in COLUMNS]
        + [number(row['gap_closed'], '.0%'),
           number(row['anti_vs_unconfounded'], '+.3f'),
           number(row['anti_vs_unconfounded_same_method'], '+.3f')]) + ' |')
  return '\n'.join(lines) + '\n'


def run_study(config, out: str, *, strengths=STRENGTHS, num_latents: int = 10,
              num_resamples: int = 1000) -> list[dict]:
  """Trains, audits and mitigates every strength; writes and returns the
  table's rows."""
  os.makedirs(out, exist_ok=True)
  reports = {}
  for strength in strengths:
    run_config = with_strength(config, strength)
    workdir = strength_dir(out, strength)
    train.train_and_evaluate(run_config, workdir)
    saved = os.path.join(workdir, 'bias', 'bias.json')
    if os.path.exists(saved):
      with open(saved) as file:
        reports[float(strength)] = json.load(file)
    else:
      reports[float(strength)] = bias.audit_and_mitigate(
          run_config, workdir, os.path.dirname(saved),
          num_latents=num_latents, num_resamples=num_resamples,
          seed=config.seed)
    logging.info('bias study, strength %g: %s', strength,
                 reports[float(strength)]['audit'])
  rows = table_rows(reports)
  with open(os.path.join(out, 'bias_study.json'), 'w') as file:
    json.dump(rows, file, indent=2)
  with open(os.path.join(out, 'bias_study.md'), 'w') as file:
    file.write(markdown_table(rows))
  return rows


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  config_flags.DEFINE_config_file('config', None, 'Configuration file.',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'Directory of the runs and the table.')
  flags.DEFINE_integer('num_latents', 10, 'Top-ranked latents to ignore.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples per AUC.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  flag = flags.FLAGS
  rows = run_study(flag.config, flag.out, num_latents=flag.num_latents,
                   num_resamples=flag.bootstrap)
  print(markdown_table(rows))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
