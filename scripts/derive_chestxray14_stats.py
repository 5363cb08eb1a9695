"""Derives the phantom's label and patient statistics from ChestX-ray14 metadata.

Reads the official NIH `Data_Entry_2017_v2020.csv.gz` (112,120 rows) and writes a
small JSON the phantom samples from:
- `label_sets`: every combination of findings seen at least `--min_combination_count` times,
  with its count ('' = No Finding). Sampling whole combinations keeps the real
  co-occurrence; rarer combinations (a few % of the images) are dropped.
- `prevalence`: the real per-finding prevalence (for reference and the README).
- `sex`, `view`: real proportions; `age_quantiles`: 101 quantiles (0 %..100 %)
  of the age in years, after dropping the few impossible ages (> 100).

  .venv/bin/python -m scripts.derive_chestxray14_stats \
      --chestxray14_csv tests/data/chestxray14/Data_Entry_2017_v2020.csv.gz \
      --stats_json input_pipeline/assets/chestxray14_stats.json
"""

import collections
import csv
import gzip
import json

from absl import app
from absl import flags
import numpy as np

from input_pipeline import labels as labels_lib

_CHESTXRAY14_CSV = flags.DEFINE_string(
    'chestxray14_csv', None,
    'ChestX-ray14 Data_Entry CSV, gzip or plain (the official one: '
    'tests/data/chestxray14/Data_Entry_2017_v2020.csv.gz).')
_STATS_JSON = flags.DEFINE_string(
    'stats_json', 'input_pipeline/assets/chestxray14_stats.json',
    'Output JSON.')
_MIN_COMBINATION_COUNT = flags.DEFINE_integer(
    'min_combination_count', 20,
    'Keep label combinations seen at least this often.')

_MAX_AGE = 100


def read_rows(path: str) -> list[dict[str, str]]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', newline='') as csv_file:
    return list(csv.DictReader(csv_file))


def chestxray14_stats(csv_path: str, min_count: int = 20) -> dict:
  """The statistics written to the JSON (see the module docstring)."""
  rows = read_rows(csv_path)
  combinations = collections.Counter()
  finding_counts = collections.Counter()
  sexes = collections.Counter()
  views = collections.Counter()
  ages = []
  for row in rows:
    findings = sorted(
        f for f in row['Finding Labels'].split('|') if f != labels_lib.NO_FINDING)
    unknown = set(findings) - set(labels_lib.FINDINGS)
    if unknown:
      raise ValueError(f'{csv_path}: unknown findings {sorted(unknown)} '
                       f'in row {row["Image Index"]}')
    combinations['|'.join(findings)] += 1
    finding_counts.update(findings)
    sexes[row['Patient Gender']] += 1
    views[row['View Position']] += 1
    age = float(row['Patient Age'])
    if 0 < age <= _MAX_AGE:
      ages.append(age)

  num_images = len(rows)
  kept = sorted(((combo, count) for combo, count in combinations.items()
                 if count >= min_count), key=lambda item: (-item[1], item[0]))
  kept_images = sum(count for _, count in kept)
  stats = {
      'source': 'NIH ChestX-ray14 Data_Entry_2017_v2020.csv '
                '(scripts/derive_chestxray14_stats.py)',
      'num_images': num_images,
      'min_count': min_count,
      'label_sets_fraction_of_images': round(kept_images / num_images, 4),
      'prevalence': {f: round(finding_counts[f] / num_images, 5)
                     for f in labels_lib.FINDINGS},
      'no_finding': round(combinations[''] / num_images, 5),
      'sex': {s: round(sexes[s] / num_images, 5) for s in labels_lib.SEXES},
      'view': {v: round(views[v] / num_images, 5) for v in labels_lib.VIEWS},
      'age_quantiles': [round(float(q), 2) for q in
                        np.quantile(np.asarray(ages), np.linspace(0, 1, 101))],
      'label_sets': [[combo, count] for combo, count in kept],
  }
  return stats


def main(argv):
  del argv
  stats = chestxray14_stats(_CHESTXRAY14_CSV.value,
                            _MIN_COMBINATION_COUNT.value)
  with open(_STATS_JSON.value, 'w') as out_file:
    json.dump(stats, out_file, indent=1)
    out_file.write('\n')
  print(f'{stats["num_images"]} rows; {len(stats["label_sets"])} label sets '
        f'cover {stats["label_sets_fraction_of_images"]:.1%} of the images '
        f'-> {_STATS_JSON.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['chestxray14_csv'])
  app.run(main)
