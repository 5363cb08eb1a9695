"""The predictions table: its columns, one row's values, the CSV and JSON.

Columns: `file`, `error`, `warning`, `prob/<head>` for every head
(`prob/<head>/<class>` for multi-label and multi-class heads), `call/<Finding>`
for the findings of the multi-label head (1 or 0 at the thresholds of an
evaluation report, `no threshold` without one), `top_finding`, and the paths
of the image outputs. Empty cells in the CSV, nulls in the JSON mark values
that a file does not have (a file that could not be read has no prediction).
"""

import csv
import json
import math
import os

import numpy as np

from input_pipeline import labels as labels_lib
from input_pipeline import heads as heads_lib

CSV_NAME, JSON_NAME = 'predictions.csv', 'predictions.json'
NO_THRESHOLD = 'no threshold'


def load_thresholds(path: str) -> dict[str, float]:
  """{head name: threshold} of an evaluation report's `heads`."""
  try:
    with open(path) as file:
      heads = json.load(file)['heads']
    return {name: float(head['threshold']) for name, head in heads.items()
            if head.get('threshold') is not None and
            math.isfinite(float(head['threshold']))}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    raise ValueError(f'{path}: cannot read thresholds from the evaluation '
                     f'report ({error!r})') from None


def finding_head(heads) -> heads_lib.HeadSpec | None:
  """The head whose classes are findings: multi-label, else multi-class."""
  for kind in (heads_lib.MULTILABEL, heads_lib.MULTICLASS):
    for head in heads:
      if head.kind == kind:
        return head
  return None


def prob_columns(heads) -> list[tuple[str, str, int | None, str]]:
  """(column, head name, class index or None, description) per output."""
  columns = []
  for head in heads:
    if head.kind in (heads_lib.MULTILABEL, heads_lib.MULTICLASS):
      columns += [(f'prob/{head.name}/{name}', head.name, i,
                   f'probability of {name!r}') for i, name in
                  enumerate(head.names)]
    elif head.kind == heads_lib.BINARY:
      names = head.names or ('0', '1')
      columns.append((f'prob/{head.name}', head.name, None,
                      f'probability of {names[-1]!r} (vs {names[0]!r})'))
    else:
      units = 'years' if head.name == 'age' else 'target units'
      columns.append((f'prob/{head.name}', head.name, None,
                      f'predicted value ({units}), not a probability'))
  return columns


def call_columns(heads, thresholds) -> list[tuple[str, str, int, float | None]]:
  """(column, head name, class index, threshold or None) per finding."""
  columns = []
  for head in heads:
    if head.kind == heads_lib.MULTILABEL:
      columns += [(f'call/{name}', head.name, i,
                   thresholds.get(f'{head.name}/{name}'))
                  for i, name in enumerate(head.names)]
  return columns


def column_descriptions(heads, thresholds: dict[str, float],
                        thresholds_source: str | None,
                        outputs: dict[str, str]) -> dict[str, str]:
  """{column: what it holds}, in the tables' order; `outputs` describes the
  columns of the image outputs that follow `top_finding`."""
  descriptions = {
      'file': 'the input file',
      'error': 'why the file could not be read (then it has no prediction)',
      'warning': 'why the image may be a poor input',
  }
  descriptions.update({column: text
                       for column, _, _, text in prob_columns(heads)})
  for column, _, _, threshold in call_columns(heads, thresholds):
    descriptions[column] = (
        f'1 if the probability is >= {threshold:.6g} ({thresholds_source})'
        if threshold is not None else
        f'{NO_THRESHOLD}: no evaluation report gives one')
  descriptions['top_finding'] = (
      'the finding with the highest probability (No Finding excluded); '
      'not a diagnosis')
  descriptions.update(outputs)
  return descriptions


def prediction_row(heads, thresholds: dict[str, float],
                   scores: dict[str, np.ndarray]) -> dict:
  """The prob, call and top_finding values of one image's scores."""
  row = {}
  for column, head, index, _ in prob_columns(heads):
    value = scores[head] if index is None else scores[head][index]
    row[column] = float(value)
  for column, head, index, threshold in call_columns(heads, thresholds):
    row[column] = (NO_THRESHOLD if threshold is None else
                   int(scores[head][index] >= threshold))
  row['top_finding'] = ''
  head = finding_head(heads)
  if head is not None:
    candidates = [i for i, name in enumerate(head.names)
                  if name != labels_lib.NO_FINDING]
    row['top_finding'] = head.names[max(candidates,
                                        key=lambda i: scores[head.name][i])]
  return row


def write_tables(out: str, rows: list[dict], descriptions: dict[str, str],
                 about: dict) -> None:
  """predictions.csv (empty cells where a file has no value) and
  predictions.json (nulls; `about` the model, and what each column holds)."""
  columns = list(descriptions)
  with open(os.path.join(out, CSV_NAME), 'w', newline='') as file:
    writer = csv.DictWriter(file, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({column: row.get(column, '') for column in columns})
  document = {
      **about,
      'columns': descriptions,
      'predictions': [{column: row.get(column) for column in columns}
                      for row in rows],
  }
  with open(os.path.join(out, JSON_NAME), 'w') as file:
    json.dump(document, file, indent=1)
    file.write('\n')
