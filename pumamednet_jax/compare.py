"""Compares trained runs on one split: the paper's Table 2.

  python -m pumamednet_jax.compare --workdirs A B ... [--split test] --out DIR

For the multi-class head of each run's checkpoint (the best by validation
mean AUC, or else the latest; all runs must have one of the same classes,
scored on the same examples): per-class precision, recall, F1 and support,
accuracy and the macro (one-vs-rest) AUC with a 95% bootstrap interval; for
every run after the first, the paired bootstrap of its AUC minus the first
run's (interval and two-sided p-value); the number of parameters and the
training loop's images/s. The images are scored as they
are (no defects). Writes DIR/compare.json and DIR/compare.md.
"""

import glob
import json
import os

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from sklearn import metrics as sk_metrics

from input_pipeline import heads as heads_lib
from input_pipeline import pipeline
from pumamednet_jax import defects as defects_lib
from pumamednet_jax import inference
from pumamednet_jax import models
from pumamednet_jax import parallel
from pumamednet_jax import stats
from pumamednet_jax import train

LEVEL = 0.95


def run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir}: no {train.CONFIG_FILE} (not a '
                            'training run of this project?)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _multiclass_head(model_config, workdir: str) -> heads_lib.HeadSpec:
  for head in model_config.heads:
    if head.kind == heads_lib.MULTICLASS:
      return head
  raise ValueError(f'{workdir}: the model has no multi-class head (heads: '
                   f'{[h.name for h in model_config.heads]}); compare scores '
                   'a 3-class set such as covid3')


def predictions(workdir: str, split: str):
  """(model config, head, targets (n,), probabilities (n, K)) of the run's
  checkpoint (`inference.load_checkpoint`'s choice) on `split`, its images
  as they are."""
  config = run_config(workdir)
  mesh = jax.sharding.Mesh(jax.local_devices()[:1], (parallel.AXIS,))
  checkpoint = inference.load_checkpoint(workdir, mesh)
  model_config = checkpoint.model_config
  head = _multiclass_head(model_config, workdir)
  sources = pipeline.get_sources(config)
  pipeline.prepare(sources)
  score = inference.make_score_fn(
      mesh, model_config, defects_lib.DefectConfig.from_config(config),
      config.seed, policy=checkpoint.policy, defective=False)
  batches = pipeline.create_eval_batches(
      sources, model_config.heads, split=split,
      image_size=model_config.image_size, global_batch_size=config.batch_size,
      num_examples_limit=0, process_index=0, process_count=1)
  outputs = inference.score_split(score, checkpoint.params, batches, mesh)
  known = outputs[f'{head.name}/mask'] > 0
  return (model_config, head, outputs[f'{head.name}/target'][known].astype(int),
          outputs[f'{head.name}/score'][known])


def train_images_per_second(workdir: str, batch_size: int) -> float | None:
  """The training loop's images/s: clu's `steps_per_sec` reports × batch
  size, the median of those after the first (which holds the compilation)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rates = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'steps_per_sec':
          rates.append(float(tf.make_ndarray(value.tensor)))
  if not rates:
    return None
  return float(np.median(rates[1:] or rates)) * batch_size


def macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
  return float(sk_metrics.roc_auc_score(
      targets, probs, multi_class='ovr', average='macro',
      labels=np.arange(probs.shape[1])))


def bootstrap_aucs(targets: np.ndarray, probs: list[np.ndarray],
                   num_resamples: int, seed: int) -> np.ndarray:
  """(resamples, runs) macro AUCs, every run on the same resamples of the
  examples (so differences are paired), each holding every class and its
  rest: the mean of the one-vs-rest `stats.auc_statistic`s."""
  num_classes = probs[0].shape[1]
  onehot = targets[:, None] == np.arange(num_classes)
  resampling = stats.Resampling(
      len(targets), events=np.concatenate([onehot, ~onehot], axis=1),
      num_resamples=num_resamples, seed=seed)

  def macro(p):
    per_class = [stats.auc_statistic(p[:, c], onehot[:, c])
                 for c in range(num_classes)]
    return lambda weights: np.mean([f(weights) for f in per_class], axis=0)

  replicates = stats.bootstrap({str(i): macro(p) for i, p in enumerate(probs)},
                               resampling)
  return np.stack([replicates[str(i)] for i in range(len(probs))], axis=1)


def compare(workdirs: list[str], split: str = 'test', num_resamples: int = 1000,
            seed: int = 0) -> dict:
  """The comparison of `workdirs` on `split` as JSON (module docstring)."""
  if len(set(workdirs)) != len(workdirs):
    raise ValueError(f'--workdirs: a run is listed twice: {workdirs}')
  runs = {w: predictions(w, split) for w in workdirs}
  first = workdirs[0]
  _, head, targets, _ = runs[first]
  for workdir, (_, other_head, other_targets, _) in runs.items():
    if other_head.names != head.names or not np.array_equal(other_targets,
                                                             targets):
      raise ValueError(f'{workdir} and {first} were not scored on the same '
                       f'examples and classes of split {split!r} (their data '
                       'or heads differ)')
  aucs = bootstrap_aucs(targets, [runs[w][3] for w in workdirs], num_resamples,
                        seed)
  labels = np.arange(len(head.names))
  result = {}
  for i, workdir in enumerate(workdirs):
    model_config, _, _, probs = runs[workdir]
    predicted = np.argmax(probs, axis=-1)
    precision, recall, f1, support = sk_metrics.precision_recall_fscore_support(
        targets, predicted, labels=labels, zero_division=0)
    low, high = stats.interval(aucs[:, i], LEVEL)
    entry = {
        'arch': model_config.arch,
        'params': models.num_params(model_config),
        'train_images_per_s': train_images_per_second(
            workdir, run_config(workdir).batch_size),
        'num_examples': int(len(targets)),
        'accuracy': float(sk_metrics.accuracy_score(targets, predicted)),
        'macro_auc': {'value': macro_auc(targets, probs), 'ci_low': low,
                      'ci_high': high},
        'per_class': {name: {'precision': float(precision[c]),
                             'recall': float(recall[c]), 'f1': float(f1[c]),
                             'support': int(support[c])}
                      for c, name in enumerate(head.names)},
    }
    if i:
      difference = aucs[:, i] - aucs[:, 0]
      low, high = stats.interval(difference, LEVEL)
      entry['macro_auc_minus_first'] = {
          'first': first,
          'value': entry['macro_auc']['value'] - result[first]['macro_auc']['value'],
          'ci_low': low, 'ci_high': high,
          # Two-sided paired bootstrap p-value of "no difference".
          'p_value': float(min(1.0, 2 * min(np.mean(difference <= 0),
                                            np.mean(difference >= 0)))),
      }
    result[workdir] = entry
  return result


def markdown(result: dict, split: str, num_resamples: int) -> str:
  """Table 2 (per class) and a summary table of `compare`'s result."""
  lines = [f'# Comparison on the {split} split', '',
           '| Run | Class | Precision | Recall | F1 | Support |',
           '|---|---|---:|---:|---:|---:|']
  for workdir, entry in result.items():
    for name, row in entry['per_class'].items():
      lines.append(f'| {workdir} | {name} | {row["precision"]:.3f} | '
                   f'{row["recall"]:.3f} | {row["f1"]:.3f} | {row["support"]} |')
  lines += ['', f'Macro AUC with 95% bootstrap intervals ({num_resamples} '
            'resamples of the examples); Δ AUC: paired bootstrap against the '
            'first run. Images/s: the training loop.', '',
            '| Run | Model | Parameters | Train images/s | Accuracy | '
            'Macro AUC (95% CI) | Δ AUC (95% CI) | p |',
            '|---|---|---:|---:|---:|---|---|---:|']
  for workdir, entry in result.items():
    auc = entry['macro_auc']
    speed = entry['train_images_per_s']
    diff = entry.get('macro_auc_minus_first')
    diff_text = ('—', '—') if diff is None else (
        f'{diff["value"]:+.3f} ({diff["ci_low"]:+.3f}, {diff["ci_high"]:+.3f})',
        f'{diff["p_value"]:.3f}')
    lines.append(
        f'| {workdir} | {entry["arch"]} | {entry["params"]:,} | '
        f'{"—" if speed is None else f"{speed:.0f}"} | {entry["accuracy"]:.3f} | '
        f'{auc["value"]:.3f} ({auc["ci_low"]:.3f}, {auc["ci_high"]:.3f}) | '
        f'{diff_text[0]} | {diff_text[1]} |')
  return '\n'.join(lines) + '\n'


def write(workdirs: list[str], out: str, split: str = 'test',
          num_resamples: int = 1000, seed: int = 0) -> dict:
  """Compares the runs and writes OUT/compare.json and OUT/compare.md."""
  result = compare(workdirs, split, num_resamples, seed)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'compare.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, 'compare.md'), 'w') as f:
    f.write(markdown(result, split, num_resamples))
  return result


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_list('workdirs', None, 'Training workdirs to compare '
                    '(the first is the reference of the paired test).')
  flags.DEFINE_string('split', 'test', 'Split to score.')
  flags.DEFINE_string('out', None, 'Folder of compare.json and compare.md.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples.')


def main(argv):
  # Space-separated workdirs after --workdirs arrive as extra arguments.
  workdirs = list(flags.FLAGS.workdirs or []) + list(argv[1:])
  if not workdirs:
    raise app.UsageError('--workdirs A B ...: the runs to compare')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  result = write(workdirs, flags.FLAGS.out, flags.FLAGS.split, flags.FLAGS.bootstrap)
  print(markdown(result, flags.FLAGS.split, flags.FLAGS.bootstrap))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['out'])
  app.run(main)
