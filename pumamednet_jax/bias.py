"""Bias audit and mitigation in the latent space, on the phantom's confounder.

  python -m pumamednet_jax.bias --workdir W --out DIR \
      [--confounder support_device] [--target Pneumothorax] \
      [--config configs/default.py --config.phantom.confounder_strength=0.8]

The paper (Sec. 3.3) says latents tied to a bias can be ignored or randomly
changed, giving a model without the bias and without retraining. This
measures it where the truth is known: the phantom's support device, drawn
with a probability that depends on a finding. The checkpoint of W encodes
(z = the encoder mean) the training split and the phantom's audit splits;
then, without touching the encoder:

  audit       the target's AUC on the i.i.d. test split (the training
              confounder strength), the de-confounded and the anti-correlated
              test splits, with bootstrap intervals; the AUC of the confounder
              alone as a score of the target; a linear probe's AUC of the
              confounder from z (fitted on validation_deconfounded, measured
              on test_deconfounded); the latents ranked by how well each
              alone tells the confounder (on validation_deconfounded).
  mitigated   the same, with the `num_latents` top-ranked latents set to
              their training mean (ignored), drawn from their training
              marginal (randomised), or left out of a target head refitted on
              the training split (refitted); with the confounder's linear
              direction erased (projected), and erased under a refitted head
              (projected_refitted). refitted_all, a head refitted on all
              latents, is the reference of the refitted rows.

Writes DIR/bias.json, DIR/bias.md and DIR/confounder_latents.png (the top
latents and the erased direction traversed from an image without the device).
The config must be the training run's (the data set and its settings).
"""

import dataclasses
import datetime
import json
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from absl import logging
from matplotlib import figure
from ml_collections import config_flags
from sklearn import metrics

from input_pipeline import heads as heads_lib
from input_pipeline import labels as labels_lib
from input_pipeline import phantom
from pumamednet_jax import confounder as confounder_lib
from pumamednet_jax import inference
from pumamednet_jax import models
from pumamednet_jax import platform as platform_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_SPLIT = 'train'
# Where the confounder's latents, probe and eraser are fitted.
FIT_SPLIT = 'validation_deconfounded'
# bias.json key prefix -> the test split it is measured on.
TEST_SPLITS = {'iid': 'test', 'deconfounded': 'test_deconfounded',
               'anticorrelated': 'test_anticorrelated'}
SPLITS = (TRAIN_SPLIT, FIT_SPLIT, *TEST_SPLITS.values())
KEYS = ('iid_auc', 'deconfounded_auc', 'anticorrelated_auc',
        'confounder_only_auc', 'probe_auc', 'nonlinear_probe_auc')
METHODS = {
    'ignored': 'the top latents set to their training mean',
    'randomised': 'the top latents drawn from their training marginal',
    'refitted': 'a logistic head refitted on the other latents',
    'refitted_all': 'no mitigation: a logistic head refitted on all latents '
                    '(what the refitted rows compare with)',
    'projected': "the confounder's linear direction erased",
    'projected_refitted': 'erased, under a logistic head refitted on the '
                          'erased training latents',
}
# Latents drawn in the picture, and the traversal's steps in standard
# deviations.
PICTURE_LATENTS = 4
TRAVERSAL = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's codes: encoder means (N, latents), target and confounder."""

  latents: np.ndarray
  target: np.ndarray
  confounder: np.ndarray


Scorer = Callable[[np.ndarray], np.ndarray]  # latents → target scores


# --- The data and the model ---------------------------------------------------


def phantom_builder(config):
  """The phantom of the config (`render` prepares it)."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  if config.dataset != 'cxr_phantom':
    raise ValueError('config.dataset: the bias audit needs the phantom '
                     f"('cxr_phantom'), whose confounder is known; got "
                     f'{config.dataset!r}')
  return pipeline.get_builder(config)


def render(builder) -> None:
  """Renders the phantom on first use."""
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.prepare(builder)


def _target_of(builder, target: str) -> Callable[[dict], np.ndarray]:
  """The feature to read and a function of a batch → 0/1 target."""
  features = builder.info.features
  if 'labels' in features:
    if target not in labels_lib.FINDINGS:
      raise ValueError(f'--target: {target!r} is not a finding of the '
                       f'phantom ({", ".join(labels_lib.FINDINGS)})')
    index = labels_lib.LABELS.index(target)
    return 'labels', lambda batch: batch['labels'][:, index].astype(int)
  if target not in labels_lib.COVID3_CLASSES:
    raise ValueError(f'--target: {target!r} is not a class of the phantom '
                     f'({", ".join(labels_lib.COVID3_CLASSES)})')
  index = labels_lib.COVID3_CLASSES.index(target)
  return 'label', lambda batch: (batch['label'] == index).astype(int)


def target_head(model_config: models.ModelConfig,
                target: str) -> tuple[heads_lib.HeadSpec, int]:
  """The head that scores `target`, and the target's index in it."""
  for head in model_config.heads:
    if head.kind in (heads_lib.MULTILABEL, heads_lib.MULTICLASS) and (
        target in head.names):
      return head, head.names.index(target)
  raise ValueError(f'--target: no head of the checkpoint scores {target!r} '
                   f'(heads: {[h.name for h in model_config.heads]})')


def _jit(fn, policy: platform_lib.Policy):
  return jax.jit(fn, compiler_options=policy.compiler_options or None)


def encode_split(builder, split: str, encode, *, target: str,
                 confounder: str, batch_size: int = BATCH_SIZE) -> Split:
  """Encoder means, target and confounder of every example of `split`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {builder.info.full_name}; '
                     'prepare the phantom again')
  if confounder not in builder.info.features:
    raise ValueError(f'--confounder: {confounder!r} is not a feature of '
                     f'{builder.info.full_name}')
  target_feature, target_of = _target_of(builder, target)
  wanted = {'image': True, target_feature: True, confounder: True}
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=tfds.decode.PartialDecoding(wanted))
  latents, targets, confounders = [], [], []
  for batch in tfds.as_numpy(ds.batch(batch_size)):
    images = batch['image']
    count = len(images)
    padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
    padded[:count] = images
    latents.append(np.asarray(encode(padded))[:count])
    targets.append(target_of(batch))
    confounders.append(batch[confounder].astype(int))
  return Split(np.concatenate(latents), np.concatenate(targets),
               np.concatenate(confounders))


@dataclasses.dataclass(frozen=True)
class Model:
  """A checkpoint's encoder, decoder and target score, as NumPy functions."""

  step: int
  encode: Callable[[np.ndarray], np.ndarray]  # uint8 (B, S, S, 1) → (B, D)
  decode: Callable[[np.ndarray], np.ndarray]  # (K, D) → (K, S, S) in [0, 1]
  score: Scorer


def load_model(workdir: str, step: int | None, image_size: int,
               target: str) -> Model:
  """The checkpoint's functions, computed in the platform's form."""
  checkpoint = inference.load_on_device(workdir, step)
  model_config, params, policy, step = (
      checkpoint.model_config, checkpoint.params, checkpoint.policy,
      checkpoint.step)
  models.require_pumamednet(
      model_config, workdir, 'the audit and its mitigation need a latent code '
      'and a decoder (a PumaMedNet checkpoint)')
  if model_config.image_size != image_size:
    raise ValueError(
        f'config.image_size = {image_size}, but the checkpoint in {workdir} '
        f'reads {model_config.image_size} px; pass the training config')
  head, index = target_head(model_config, target)

  def encode(params, images):
    model = models.bind(model_config, params)
    inputs = images.astype(jnp.float32) / 255.0
    return models.in_chunks(lambda x: model.encode(x)[0], inputs,
                            policy.inference_chunk(inputs.shape))

  def decode(params, latents):
    return models.bind(model_config, params).decode(latents)[..., 0]

  def score(params, latents):
    output = models.bind(model_config, params).classify(latents)[head.name]
    scores = models.head_scores(head, output)
    return scores if scores.ndim == 1 else scores[:, index]

  encode, decode, score = (_jit(f, policy) for f in (encode, decode, score))
  return Model(
      step=step,
      encode=lambda images: encode(params, images),
      decode=lambda z: np.asarray(decode(params, jnp.asarray(z, jnp.float32))),
      score=lambda z: np.asarray(score(params, jnp.asarray(z, jnp.float32))))


# --- The analysis (latents in, numbers out) ---------------------------------


def refitted_head(latents: np.ndarray, target: np.ndarray,
                  seed: int) -> Scorer:
  """A logistic target head fitted on training latents."""
  head = confounder_lib.linear_probe(latents, target, seed=seed)
  return lambda z: head.predict_proba(z)[:, 1]


def measure(splits: dict[str, Split], transform, score: Scorer, *,
            num_resamples: int, seed: int) -> dict:
  """The KEYS (and the target AUCs' intervals) of latents seen through
  `transform` by the head `score`."""
  row = {}
  for key, name in TEST_SPLITS.items():
    split = splits[name]
    auc, low, high = confounder_lib.auc_interval(
        split.target, score(transform(split.latents)),
        num_resamples=num_resamples, seed=seed)
    row[f'{key}_auc'] = auc
    row[f'{key}_auc_ci'] = [low, high]
  iid = splits[TEST_SPLITS['iid']]
  row['confounder_only_auc'] = float(metrics.roc_auc_score(iid.target,
                                                           iid.confounder))
  return row


def probe_aucs(splits: dict[str, Split], transform, *, seed: int) -> dict:
  """How well the confounder is read (linearly, and by gradient-boosted
  trees) from the latents `transform` leaves."""
  fit, held_out = splits[FIT_SPLIT], splits[TEST_SPLITS['deconfounded']]
  return {key: probe(transform(fit.latents), fit.confounder,
                     transform(held_out.latents), held_out.confounder,
                     seed=seed)
          for key, probe in (('probe_auc', confounder_lib.probe_auc),
                             ('nonlinear_probe_auc',
                              confounder_lib.nonlinear_probe_auc))}


def analyse(splits: dict[str, Split], score: Scorer, *, num_latents: int,
            num_resamples: int = 1000, seed: int = 0) -> dict:
  """The audit, the mitigations and the ranked latents, from the codes."""
  train, fit = splits[TRAIN_SPLIT], splits[FIT_SPLIT]
  num_all = train.latents.shape[1]
  if not 1 <= num_latents < num_all:
    raise ValueError(f'--num_latents must be in [1, {num_all - 1}], got '
                     f'{num_latents}')
  order, ranking_scores = confounder_lib.rank_latents(fit.latents,
                                                      fit.confounder)
  chosen = order[:num_latents]
  kept = np.setdiff1d(np.arange(num_all), chosen)
  eraser = confounder_lib.fit_eraser(fit.latents, fit.confounder)
  means = train.latents.mean(axis=0)
  rng = np.random.default_rng(seed)
  identity = lambda z: z
  views = {
      'none': (identity, score),
      'ignored': (lambda z: confounder_lib.ignore(z, chosen, means), score),
      'randomised': (lambda z: confounder_lib.randomise(
          z, chosen, train.latents, rng), score),
      'refitted': (lambda z: z[:, kept], refitted_head(
          train.latents[:, kept], train.target, seed)),
      'refitted_all': (identity, refitted_head(train.latents, train.target,
                                               seed)),
      'projected': (eraser, score),
      'projected_refitted': (eraser, refitted_head(
          eraser(train.latents), train.target, seed)),
  }
  # Views that share a transform (a refitted head on the same latents) share
  # its probes: the gradient-boosted trees are the slow part.
  # (In view order: the randomised view draws from `rng` on each call.)
  probes, rows = {}, {}
  for name, (transform, head) in views.items():
    rows[name] = measure(splits, transform, head, num_resamples=num_resamples,
                         seed=seed)
    if id(transform) not in probes:  # (the eraser is not hashable)
      probes[id(transform)] = probe_aucs(splits, transform, seed=seed)
    rows[name].update(probes[id(transform)])
  return {
      'audit': rows.pop('none'),
      'mitigated': rows,
      'latents': [{'index': int(i), 'score': float(ranking_scores[i])}
                  for i in order],
      'ignored_latents': [int(i) for i in chosen],
      'splits': {name: split_summary(split) for name, split in splits.items()},
      'eraser': eraser,
  }


def split_summary(split: Split) -> dict:
  target = split.target.astype(bool)
  return {
      'num_examples': int(len(target)),
      'num_positives': int(target.sum()),
      'device_rate_positives': float(split.confounder[target].mean())
                               if target.any() else None,
      'device_rate_negatives': float(split.confounder[~target].mean())
                               if (~target).any() else None,
  }


# --- The picture and the reports ----------------------------------------------


def traversal_rows(splits: dict[str, Split], result: dict) -> list[tuple]:
  """(label, unit direction, step) of each row of the picture: the top
  latents, oriented towards the confounder, then the erased direction."""
  fit = splits[FIT_SPLIT]
  signs = confounder_lib.latent_signs(fit.latents, fit.confounder)
  spread = splits[TRAIN_SPLIT].latents.std(axis=0)
  num_latents = fit.latents.shape[1]
  rows = []
  for index in result['ignored_latents'][:PICTURE_LATENTS]:
    direction = np.zeros(num_latents, np.float32)
    direction[index] = signs[index]
    rows.append((f'z{index}', direction, float(spread[index])))
  delta = result['eraser'].direction
  unit = (delta / np.linalg.norm(delta)).astype(np.float32)
  rows.append(('erased\ndirection', unit,
               float((fit.latents @ unit).std())))
  return rows


def write_traversals(path: str, model: Model, splits: dict[str, Split],
                     result: dict, seed: int) -> None:
  """The top confounder latents and the erased direction traversed from a
  held-out image without the confounder; each frame's probe P(confounder)."""
  fit, test = splits[FIT_SPLIT], splits[TEST_SPLITS['deconfounded']]
  without = np.flatnonzero((test.confounder == 0) & (test.target == 0))
  base = test.latents[without[0] if len(without) else 0]
  probe = confounder_lib.linear_probe(fit.latents, fit.confounder, seed=seed)
  rows = traversal_rows(splits, result)
  steps = np.asarray(TRAVERSAL, np.float32)
  fig = figure.Figure(figsize=(1.3 * len(steps) + 0.8, 1.5 * len(rows) + 0.6),
                      dpi=110, layout='constrained')
  axes = fig.subplots(len(rows), len(steps), squeeze=False)
  for row, (label, direction, step) in zip(axes, rows):
    latents = base + np.outer(steps * step, direction)
    frames = model.decode(latents)
    device = probe.predict_proba(latents)[:, 1]
    for ax, frame, shift, p in zip(row, frames, steps, device):
      ax.imshow(frame, cmap='gray', vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_xlabel(f'{shift:+g} sd  p={p:.2f}', fontsize=7)
    row[0].set_ylabel(label, fontsize=9)
  fig.suptitle('Confounder latents traversed (p: linear probe of the '
               'confounder)', fontsize=9)
  fig.savefig(path)


def _auc(row: dict, key: str) -> str:
  low, high = row[f'{key}_ci']
  return f'{row[key]:.3f} [{low:.3f}, {high:.3f}]'


def markdown(report: dict) -> str:
  """bias.md: the table, the ranked latents, the splits, the picture."""
  settings = report['settings']
  lines = [
      f"# Bias audit: {settings['confounder']} and {settings['target']}",
      '',
      f"Checkpoint {settings['workdir']} (step {settings['step']}), trained "
      f"at confounder strength {settings['confounder_strength']:g}; "
      f"{settings['date']}. AUCs of {settings['target']} with "
      f"{settings['level']:.0%} bootstrap intervals "
      f"({settings['num_resamples']} stratified resamples).",
      '',
      '| | i.i.d. AUC | de-confounded AUC | anti-correlated AUC | '
      f"probe AUC ({settings['confounder']} from z) | non-linear probe AUC |",
      '|---|---|---|---|---|---|',
  ]
  rows = [('none', report['audit'])] + list(report['mitigated'].items())
  for name, row in rows:
    what = 'as trained' if name == 'none' else METHODS[name]
    lines.append(f'| {name}: {what} | ' + ' | '.join(
        [_auc(row, 'iid_auc'), _auc(row, 'deconfounded_auc'),
         _auc(row, 'anticorrelated_auc'), f"{row['probe_auc']:.3f}",
         f"{row['nonlinear_probe_auc']:.3f}"]) + ' |')
  top = ', '.join(f"z{item['index']} ({item['score']:.2f})"
                  for item in report['latents'][:settings['num_latents']])
  lines += [
      '',
      f"{settings['confounder']} alone scores {settings['target']} with AUC "
      f"{report['audit']['confounder_only_auc']:.3f} on the i.i.d. test split.",
      f"The probe is fitted on {FIT_SPLIT} and measured on "
      f"{TEST_SPLITS['deconfounded']}; 0.5 = the confounder cannot be read "
      '(linearly, or by gradient-boosted trees).',
      '',
      f"Latents most tied to {settings['confounder']} (|2 AUC − 1| on "
      f"{FIT_SPLIT}), the {settings['num_latents']} ignored: {top}.",
      '',
      '| split | images | positives | P(device \\| positive) | '
      'P(device \\| negative) |',
      '|---|---|---|---|---|',
  ]
  for name, split in report['splits'].items():
    rates = [split['device_rate_positives'], split['device_rate_negatives']]
    lines.append(f"| {name} | {split['num_examples']} | "
                 f"{split['num_positives']} | " + ' | '.join(
                     '–' if r is None else f'{r:.2f}' for r in rates) + ' |')
  lines += ['', '![Confounder latents traversed](confounder_latents.png)', '']
  return '\n'.join(lines)


def audit_and_mitigate(config, workdir: str, out: str, *,
                       confounder: str = 'support_device',
                       target: str | None = None, step: int | None = None,
                       num_latents: int = 10, num_resamples: int = 1000,
                       seed: int = 0) -> dict:
  """Audits the checkpoint of `workdir` (`step`, default the latest) for the
  confounder, mitigates it in the latent space; writes bias.json, bias.md
  and confounder_latents.png to `out` and returns bias.json's content."""
  builder = phantom_builder(config)
  target = target or phantom.CONFOUNDER_TARGETS[config.phantom.variant]
  # The model before the phantom is rendered: a checkpoint it cannot use is
  # refused first.
  model = load_model(workdir, step, config.image_size, target)
  render(builder)
  splits = {}
  for name in SPLITS:
    splits[name] = encode_split(builder, name, model.encode, target=target,
                                confounder=confounder)
    logging.info('encoded %s: %d images', name, len(splits[name].target))
  result = analyse(splits, model.score, num_latents=num_latents,
                   num_resamples=num_resamples, seed=seed)
  os.makedirs(out, exist_ok=True)
  write_traversals(os.path.join(out, 'confounder_latents.png'), model, splits,
                   result, seed)
  report = {
      'settings': {
          'workdir': os.path.abspath(workdir), 'step': model.step,
          'dataset': builder.info.full_name, 'confounder': confounder,
          'target': target,
          'confounder_strength': float(config.phantom.confounder_strength),
          'num_latents': num_latents, 'num_resamples': num_resamples,
          'level': 0.95, 'seed': seed,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
      },
      **{key: value for key, value in result.items() if key != 'eraser'},
  }
  with open(os.path.join(out, 'bias.json'), 'w') as file:
    json.dump(report, file, indent=2)
  with open(os.path.join(out, 'bias.md'), 'w') as file:
    file.write(markdown(report))
  return report


# --- Command line --------------------------------------------------------------


def _define_flags():
  """The command's flags (defined only when run as a command)."""
  flags.DEFINE_string('workdir', None, 'Training directory (its checkpoint).')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('confounder', 'support_device',
                      'Binary feature of the phantom that confounds.')
  flags.DEFINE_string('target', None, 'Finding (or class) it confounds; '
                      "default: the phantom's confounder target.")
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('num_latents', 10, 'Top-ranked latents to ignore.')
  flags.DEFINE_integer('bootstrap', 1000, 'Bootstrap resamples.')
  flags.DEFINE_integer('seed', 0, 'Seed of the bootstrap and the probes.')
  config_flags.DEFINE_config_file(
      'config', str(REPO_ROOT / 'configs' / 'default.py'),
      'The training configuration (data set and its settings).',
      lock_config=True)
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  flag = flags.FLAGS
  try:
    report = audit_and_mitigate(
        flag.config, flag.workdir, flag.out, confounder=flag.confounder,
        target=flag.target, step=flag.step, num_latents=flag.num_latents,
        num_resamples=flag.bootstrap, seed=flag.seed)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f'bias: {error}') from None
  print(markdown(report))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
