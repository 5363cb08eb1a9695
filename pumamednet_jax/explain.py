r"""Explanations of a checkpoint, and how faithful they are (paper Figs. 5, 6).

  python -m pumamednet_jax.explain --workdir W --out DIR [--config C] \
      [--split validation] [--num_images 8] [--attributes health,age,...] \
      [--heads Cardiomegaly,...] [--step N]

Three kinds of edit of an image's latent mean z, each decoded frame by frame:
interpolation z + α(z̄₁ − z̄₀) between the mean latents of an attribute's
groups (Fig. 5), traversal of one latent over ±3 standard deviations, for
the latents most relevant to a head (Fig. 6), and latent shift (`latent.py`;
`predict --explain`). DIR receives:

  interpolation_<attribute>.png  rows are images, columns α from −2 to 2, the
      model's probability of the attribute under each frame;
  traversal_<head>.png  the head's 3 most relevant latents, each traversed;
  relevance.json, relevance.png  every latent's relevance to every head, by
      two methods (gradient × std and one-latent ablation), ranked;
  explain.json  faithfulness figures, measured with independent judges
      (`judge.py`) that never see the model's edits or its classifier:
        interpolation/<attribute>: rho_model, rho_judge (median over images
          of Spearman's ρ between α and the probability), specificity
          (median over images of the largest |Δp| of the judges' other
          attributes over |Δp| of the target, α = −2 → 2);
        ablation/<head>: the head's AUC drop with its 5 most relevant latents
          set to their means, and with 5 random ones (mean of 20 draws);
        traversal/Cardiomegaly: ρ between the step of its most relevant
          latent and the judge's heart size, and the specificity as above;
        judge/<attribute>: the judges' held-out AUC (R² for heart_size);
  index.html  one page, images inlined: pick an image and an edit, drag the
      slider through the frames and watch every head's probability.

The probability under a frame is the model's score of the decoded frame
encoded again: what the model says of the picture shown.
"""

import dataclasses
import json
import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from input_pipeline import pipeline
from pumamednet_jax import checkpoints
from pumamednet_jax import explain_figures
from pumamednet_jax import faithfulness
from pumamednet_jax import judge as judge_lib
from pumamednet_jax import inference
from pumamednet_jax import latent as latent_lib
from pumamednet_jax import models
from pumamednet_jax import parallel

ALPHAS = tuple(np.round(np.linspace(-2.0, 2.0, 9), 3))
STEPS = tuple(np.round(np.linspace(-3.0, 3.0, 7), 3))
DEFAULT_ATTRIBUTES = ('health', 'age', 'sex', 'view', 'Cardiomegaly')
DEFAULT_HEADS = ('Cardiomegaly', 'No Finding', 'sex', 'view',
                 'age_above_median')
TOP_LATENTS = 3  # latents traversed per head
RELEVANCE_METHOD = 'gradient'
FIGURE_TRAVERSAL_IMAGES = 3  # images per traversal figure
CARDIOMEGALY = 'Cardiomegaly'


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to explain and on how many examples."""
  split: str = 'validation'
  num_images: int = 8  # images shown in the figures and the page
  attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
  heads: tuple[str, ...] = DEFAULT_HEADS
  step: int | None = None
  num_eval: int = 64  # images over which faithfulness is measured
  num_reference: int = 0  # examples of directions and relevance (0: all)
  judge_split: str = 'test'
  num_judge: int = 2000  # examples the judges are fitted and measured on
  relevance: str = RELEVANCE_METHOD  # the ranking the figures use
  seed: int = 0


def check_heads(names, outputs) -> None:
  valid = [o.name for o in outputs]
  unknown = [name for name in names if name not in valid]
  if unknown:
    raise ValueError(f'unknown head(s) {", ".join(map(repr, unknown))}; '
                     f'valid: {", ".join(valid)}')


def _edit(model: latent_lib.LatentModel, latents: np.ndarray):
  """(N, A, D) latents → frames (N, A, S, S) and their scores (N, A, K)."""
  count, steps = latents.shape[:2]
  frames = model.decode(latents.reshape(count * steps, -1))
  scores = model.frame_scores(frames)
  return (frames.reshape(count, steps, *frames.shape[1:]),
          scores.reshape(count, steps, -1))


def load(workdir: str, config, step: int | None):
  """The latent model of a checkpoint (`step`, or else the best by
  validation mean AUC, or else the latest) on one device, and its data
  set's builder."""
  sources = pipeline.get_sources(config)
  if len(sources) != 1:
    raise ValueError('explain reads one data set; config.dataset is '
                     f'{config.dataset!r}')
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]),
                           (parallel.AXIS,))
  checkpoint = inference.load_checkpoint(workdir, mesh, step,
                                         compute_from=config)
  models.require_pumamednet(
      checkpoint.model_config, workdir, 'the explanations need a latent code '
      'and a decoder (a PumaMedNet checkpoint)')
  if checkpoint.model_config.image_size != config.image_size:
    raise ValueError(
        f'the checkpoint in {checkpoints.checkpoint_dir(workdir)} reads '
        f'{checkpoint.model_config.image_size} px images but '
        f'config.image_size is {config.image_size}; pass the config it was '
        'trained with')
  pipeline.prepare(sources)
  model = latent_lib.LatentModel(checkpoint.model_config, checkpoint.params,
                                 checkpoint.policy)
  return model, sources[0].builder, checkpoint.step


def explain(workdir: str, out: str, config,
            settings: Settings = Settings()) -> dict:
  """Writes the explanations of the checkpoint in `workdir` to `out` (see
  the module docstring); returns explain.json's content."""
  model, builder, step = load(workdir, config, settings.step)
  median = (pipeline.age_median(builder) if 'age' in builder.info.features
            else None)
  examples = judge_lib.load_examples(builder, settings.split,
                                     settings.num_reference, median)
  judge_lib.check_attributes(settings.attributes, examples)
  check_heads(settings.heads, model.outputs)
  num_eval = min(max(settings.num_eval, settings.num_images),
                 len(examples.images))
  os.makedirs(out, exist_ok=True)
  names = [o.name for o in model.outputs]

  z = model.encode(examples.images)
  relevances = {method: fn(model, z) for method, fn in
                latent_lib.RELEVANCE_METHODS.items()}
  relevance = relevances[settings.relevance]
  relevance_json = faithfulness.relevance_report(model.outputs, relevances)
  relevance_json['method'] = settings.relevance
  _write_json(os.path.join(out, 'relevance.json'), relevance_json)
  explain_figures.relevance_figure(os.path.join(out, 'relevance.png'),
                                   names, relevance, settings.relevance)

  # The judges: fitted on the model's reconstructions of another split.
  judged_attributes = tuple(dict.fromkeys(
      [a for a in judge_lib.JUDGED if a in judge_lib.available(examples)]
      + list(settings.attributes)))
  judge_examples = judge_lib.load_examples(builder, settings.judge_split,
                                           settings.num_judge, median)
  reconstructions = model.decode(model.encode(judge_examples.images))
  judges = judge_lib.fit_judges(reconstructions, judge_examples,
                                judged_attributes, settings.seed)
  logging.info('judges: %s', judges.heldout)

  z_eval = z[:num_eval]
  page_edits = []
  interpolation = {}
  for attribute in settings.attributes:
    direction = latent_lib.group_direction(
        z, judge_lib.values(attribute, examples))
    latents = latent_lib.interpolations(z_eval, direction, ALPHAS)
    frames, scores = _edit(model, latents)
    judged = faithfulness.judge_frames(judges, frames)
    column = names.index(faithfulness.model_output(attribute, model.outputs))
    others = [a for a in judges.names if a not in (
        attribute, judge_lib.HEART_SIZE, *judge_lib.entailed(attribute))]
    worst, each = faithfulness.specificity(judged, attribute, others)
    latent_scores = model.scores(latents.reshape(-1, z.shape[1]))
    interpolation[attribute] = {
        'rho_model': faithfulness.median_rho(ALPHAS, scores[:, :, column]),
        'rho_judge': faithfulness.median_rho(ALPHAS, judged[attribute]),
        'specificity': worst,
        'specificity_by_attribute': each,
        'judge_change': faithfulness.judge_change(judged),
        'rho_model_latent': faithfulness.median_rho(
            ALPHAS, latent_scores[:, column].reshape(num_eval, -1)),
        'model_output': names[column]}
    explain_figures.edit_figure(
        os.path.join(out, f'interpolation_{attribute}.png'),
        examples.images[:settings.num_images] / 255.0,
        frames[:settings.num_images], scores[:settings.num_images, :, column],
        [f'α = {a:+g}' for a in ALPHAS],
        f'{attribute}: z + α (z̄₁ − z̄₀), group 1 = '
        f'{judge_lib.MEANINGS.get(attribute, attribute)}; p = {names[column]}')
    page_edits.append(('attribute', attribute, ALPHAS, frames, scores))

  mean, std = z.mean(axis=0), z.std(axis=0)
  page_latents = []
  for head in settings.heads:
    k = names.index(head)
    top = [int(j) for j in np.argsort(-relevance[k])[:TOP_LATENTS]]
    page_latents.extend(j for j in top if j not in page_latents)
    count = min(FIGURE_TRAVERSAL_IMAGES, settings.num_images)
    rows, row_scores, labels = [], [], []
    for j in top:
      frames, scores = _edit(model, latent_lib.traversals(
          z[:count], j, mean, std, STEPS))
      rows.append(frames)
      row_scores.append(scores[:, :, k])
      labels.extend(f'z{j}, image {i}' for i in range(count))
    explain_figures.edit_figure(
        os.path.join(out, f'traversal_{_file_name(head)}.png'), None,
        np.concatenate(rows), np.concatenate(row_scores),
        [f'{s:+g} sd' for s in STEPS],
        f'{head}: its {len(top)} most relevant latents ({settings.relevance}'
        f' relevance), each set to mean + t·sd; p = {head}', labels)
  for j in page_latents:
    frames, scores = _edit(model, latent_lib.traversals(
        z[:settings.num_images], j, mean, std, STEPS))
    page_edits.append(('latent', f'z{j}', STEPS, frames, scores))

  traversal = {}
  if CARDIOMEGALY in names and judge_lib.HEART_SIZE in judges.names:
    k = names.index(CARDIOMEGALY)
    j = int(np.argmax(relevance[k]))
    frames, _ = _edit(model, latent_lib.traversals(z_eval, j, mean, std,
                                                   STEPS))
    judged = faithfulness.judge_frames(judges, frames)
    others = [a for a in judges.names if a not in (
        CARDIOMEGALY, judge_lib.HEART_SIZE, *judge_lib.entailed(CARDIOMEGALY))]
    # The sign of the latent is arbitrary: ρ is taken along the direction
    # that raises the model's Cardiomegaly score.
    sign = float(np.sign(_mean_gradient_sign(model, z, k, j)))
    worst, each = faithfulness.specificity(judged, CARDIOMEGALY, others)
    traversal[CARDIOMEGALY] = {
        'latent': j, 'direction': sign,
        'rho_judge_heart_size': faithfulness.median_rho(
            sign * np.asarray(STEPS), judged[judge_lib.HEART_SIZE]),
        'rho_judge_cardiomegaly': faithfulness.median_rho(
            sign * np.asarray(STEPS), judged[CARDIOMEGALY]),
        'specificity': worst, 'specificity_by_attribute': each,
        'judge_change': faithfulness.judge_change(judged)}

  result = {
      'interpolation': interpolation,
      'ablation': faithfulness.ablation(model, z, examples, relevance,
                                        settings.seed, greedy=True),
      'ablation_by_method': {
          method: faithfulness.ablation(model, z, examples, r, settings.seed)
          for method, r in relevances.items()},
      'traversal': traversal,
      'judge': judges.heldout,
      'settings': {**dataclasses.asdict(settings), 'num_eval': num_eval,
                   'num_reference': len(examples.images),
                   'num_judge': len(judge_examples.images),
                   'workdir': os.path.abspath(workdir),
                   'checkpoint_step': step,
                   'alphas': list(ALPHAS), 'steps': list(STEPS)},
  }
  result['ablation_summary'] = {
      method: faithfulness.ablation_summary(table)
      for method, table in result['ablation_by_method'].items()}
  _write_json(os.path.join(out, 'explain.json'), result)
  explain_figures.write_page(
      os.path.join(out, 'index.html'), examples.images[:settings.num_images],
      model.decode(z[:settings.num_images]), page_edits, names,
      settings.num_images, result)
  return result


def _mean_gradient_sign(model, z, k, j) -> float:
  return float(model.gradients(z[:256])[:, k, j].mean())


def _file_name(name: str) -> str:
  return name.replace(' ', '_').replace('/', '_')


def _write_json(path: str, data) -> None:
  with open(path, 'w') as file:
    json.dump(data, file, indent=1, allow_nan=True)


# --- Command line -------------------------------------------------------------

def _define_flags():
  """The command's flags (defined only when run as a command)."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__))), 'configs', 'default.py'),
      'The training config (its data set and image size).')
  flags.DEFINE_string('workdir', None, 'Training directory.')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_string('split', 'validation', 'Split explained.')
  flags.DEFINE_integer('num_images', 8,
                       'Images in the figures and the page.')
  flags.DEFINE_list('attributes', list(DEFAULT_ATTRIBUTES),
                    'Attributes interpolated.')
  flags.DEFINE_list('heads', list(DEFAULT_HEADS),
                    'Heads whose relevant latents are traversed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore step.
  settings = Settings(split=flags.FLAGS.split, num_images=flags.FLAGS.num_images,
                      attributes=tuple(flags.FLAGS.attributes),
                      heads=tuple(flags.FLAGS.heads), step=flags.FLAGS.step)
  try:
    result = explain(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.config, settings)
  except (ValueError, FileNotFoundError) as error:
    print(f'explain: {error}', file=sys.stderr)
    return 1
  print(summary_line(result, flags.FLAGS.out))
  return 0


def summary_line(result: dict, out: str) -> str:
  parts = [f'{a}: rho_model {v["rho_model"]:.2f} rho_judge '
           f'{v["rho_judge"]:.2f} specificity {v["specificity"]:.2f}'
           for a, v in result['interpolation'].items()]
  summary = result['ablation_summary'][result['settings']['relevance']]
  return (f'explain: wrote {out}; ' + '; '.join(parts) +
          f'; ablation top5 ≥ 5 × random5 for {summary["passed"]} of '
          f'{summary["findings"]} findings')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
